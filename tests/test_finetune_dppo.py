"""DPPO on DDIM checkpoints and the frozen base: stochastic (eta 1) training chains whose stored log-probs equal
recomputed ones, deterministic (eta 0) evaluation, ft_denoising_steps checked against ddim_steps, a DDPM
checkpoint switched to DDIM by agent.use_ddim, and the update never runs the frozen base network."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from dpft.errors import DpftError
from tests.test_finetune import _finetuner, _ft, _pretrain, diffusion_run, hopper_data  # noqa: F401


@pytest.fixture(scope="module")
def ddim_run(hopper_data, tmp_path_factory):
    return _pretrain(hopper_data, tmp_path_factory.mktemp("ddim") / "run", "policy.mlp_dims=[16,16,16]",
                     "policy.denoising_steps=10", "policy.use_ddim=true", "policy.ddim_steps=4", "horizon_steps=4",
                     "act_steps=2")


def _collect(t, n_steps=3):
    t.collector.reset([50 + i for i in range(t.env.num_envs)])
    return t.collector.collect(n_steps)


def test_ddim_chains_logprobs_and_deterministic_eval(tmp_path, ddim_run):
    t = _finetuner(tmp_path / "r", "agent=dppo", "checkpoint=%s" % ddim_run, "agent.ft_denoising_steps=4")
    try:
        m = t.model
        assert m.use_ddim and m.num_sampling_steps == 4 and m.ft_denoising_steps == 4 and m.ddim_eta == 1.0
        ro = _collect(t)
        chain, logp = ro.act["chain"], ro.act["logprob"]
        assert chain.shape == (3, 2, 5, 4, 3) and logp.shape == (3, 2, 4, 4, 3)
        obs = {k: v.flatten(0, 1) for k, v in ro.obs.items()}
        with torch.no_grad():
            torch.testing.assert_close(m.chain_log_prob(obs, chain.flatten(0, 1)), logp.flatten(0, 1),
                                       rtol=1e-5, atol=1e-5)
        one = {k: v[:1] for k, v in obs.items()}
        g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
        with torch.no_grad():  # eta 1 while training: two draws differ; eta 0 at evaluation: they do not
            assert not torch.equal(m.sample(one, deterministic=False, generator=g1)[0],
                                   m.sample(one, deterministic=False, generator=g2)[0])
            g1.manual_seed(3)
            m.sample(one, deterministic=True, generator=g1)
            torch.randn((1, 4, 3), generator=g2.manual_seed(3))
            assert torch.equal(g1.get_state(), g2.get_state())  # eta 0: only x_T is drawn, no per-step noise
    finally:
        t.close()
    with pytest.raises(DpftError, match=r"ft_denoising_steps=5 must be between 1 and the policy's 4 sampling steps "
                                        r"\(ddim_steps\)"):
        _finetuner(tmp_path / "bad", "agent=dppo", "checkpoint=%s" % ddim_run, "agent.ft_denoising_steps=5")


def _copy_with_meta(run, dst, **changes):
    """A copy of pretraining run ``run`` whose latest checkpoint's meta.json has ``changes`` applied (meta.json
    is not under the checksums)."""
    import json
    import shutil

    from dpft.checkpoint import find_latest

    shutil.copytree(str(run), str(dst))
    path = os.path.join(find_latest(str(dst)), "meta.json")
    meta = json.load(open(path))
    for key, value in changes.items():
        if key == "ddim_eta":
            meta["policy_spec"]["ddim_eta"] = value
        else:
            meta[key] = value
    with open(path, "w") as f:
        json.dump(meta, f)
    return str(dst)


def test_ddim_eta_is_the_agents_whatever_the_checkpoint_was_pretrained_with(tmp_path, ddim_run):
    run = _copy_with_meta(ddim_run, tmp_path / "eta_run", ddim_eta=0.25)
    for extra, eta in (([], 1.0), (["agent.ddim_eta=0.5"], 0.5)):
        t = _finetuner(tmp_path / ("r%s" % eta), "agent=dppo", "checkpoint=%s" % run, "agent.ft_denoising_steps=4",
                       *extra)
        try:
            assert t.model.use_ddim and t.model.ddim_eta == eta
        finally:
            t.close()
    with pytest.raises(DpftError, match=r"agent.ddim_eta=0.0 must be in \(0, 1\]"):
        _finetuner(tmp_path / "bad", "agent=dppo", "checkpoint=%s" % run, "agent.ddim_eta=0.0")


def test_wrong_kind_hint_names_a_usable_agent_or_the_source(tmp_path, diffusion_run):
    run = _copy_with_meta(diffusion_run, tmp_path / "res_run", policy_type="residual",
                          source_checkpoint="/runs/pretrained")
    with pytest.raises(DpftError, match=r"holds a residual policy .*no agent fine-tunes a residual checkpoint further; "
                                        r"pass the pretrained checkpoint it started from \(/runs/pretrained\)\."):
        _finetuner(tmp_path / "a", "agent=dppo", "checkpoint=%s" % run)
    ft = _copy_with_meta(diffusion_run, tmp_path / "ft_run", ft_denoising_steps=3)  # a DPPO fine-tuned checkpoint
    with pytest.raises(DpftError) as e:
        _finetuner(tmp_path / "b", "agent=ppo", "checkpoint=%s" % ft)
    assert "use agent=dppo or agent=idql." in str(e.value) and "residual_ppo" not in str(e.value)


def test_ddpm_checkpoint_finetuned_with_ddim_rolls_out_as_ddim(tmp_path, diffusion_run):
    import dpft
    from dpft.agents.finetune import finetune

    out = tmp_path / "ft"
    finetune(_ft(out, "agent=dppo", "checkpoint=%s" % diffusion_run, "agent.use_ddim=true", "agent.ddim_steps=3",
                 "agent.ft_denoising_steps=2", "iterations=1"))
    policy = dpft.load_policy(str(out))
    m = policy.model
    assert m.use_ddim and m.num_sampling_steps == 3 and m.ft_denoising_steps == 2
    obs = np.random.default_rng(0).normal(size=(2, 1, 11)).astype(np.float32)
    a1 = policy.act(obs, generator=torch.Generator().manual_seed(0))
    a2 = policy.act(obs, generator=torch.Generator().manual_seed(0))
    assert a1.shape == (2, 2, 3) and np.array_equal(a1, a2)


def test_update_never_runs_the_frozen_base(tmp_path, diffusion_run):
    """DPPO defect fixed: the base denoiser serves only the early sampling steps while acting; the PPO update
    evaluates the fine-tuned copy alone (and changes only its parameters)."""
    t = _finetuner(tmp_path / "r", "agent=dppo", "checkpoint=%s" % diffusion_run, "agent.ft_denoising_steps=2")
    try:
        m = t.model
        ro = _collect(t)
        calls = {"base": 0, "ft": 0}
        hooks = [m.network.register_forward_hook(lambda *a: calls.__setitem__("base", calls["base"] + 1)),
                 m.ft_network.register_forward_hook(lambda *a: calls.__setitem__("ft", calls["ft"] + 1))]
        base_before = {k: v.clone() for k, v in m.network.state_dict().items()}
        ft_before = {k: v.clone() for k, v in m.ft_network.state_dict().items()}
        try:
            info = t.agent.update(ro)
        finally:
            for h in hooks:
                h.remove()
        assert info["grad_steps"] > 0 and info["actor_updated"]
        assert calls["base"] == 0 and calls["ft"] >= info["grad_steps"]  # (+ IN-RIL monitor IL steps)
        assert all(torch.equal(v, m.network.state_dict()[k]) for k, v in base_before.items())
        assert any(not torch.equal(v, m.ft_network.state_dict()[k]) for k, v in ft_before.items())
    finally:
        t.close()
