"""Gaussian PPO details against hand-computed values: the stored old log-prob is the Normal log-density of the
EXECUTED actions only (act_steps of the chunk), summed (CleanRL) or element-averaged and clamped (DPPO); the std
bound holds; a from-scratch run's checkpoint (observation statistics folded into its normalizer) normalizes
observations exactly as the agent did, and its critic and actor heads start from CleanRL's orthogonal init."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.test_finetune import _finetuner, _ft, _pretrain, hopper_data  # noqa: F401


@pytest.fixture(scope="module")
def chunked_run(hopper_data, tmp_path_factory):
    """Chunks of 4 actions, 2 executed."""
    return _pretrain(hopper_data, tmp_path_factory.mktemp("g42") / "run", "policy=gaussian_mlp",
                     "policy.mlp_dims=[16,16]", "horizon_steps=4", "act_steps=2")


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_old_logprob_is_the_density_of_the_executed_actions(tmp_path, chunked_run, reduction):
    t = _finetuner(tmp_path / "r", "agent=ppo", "checkpoint=%s" % chunked_run, "agent.logprob_reduction=%s" % reduction,
                   "agent.init_std=0.15", "agent.logprob_min=-1.5", "agent.logprob_max=0.5")
    try:
        t.collector.reset([5, 6])
        ro = t.collector.collect(2)
        obs = {k: v.flatten(0, 1) for k, v in ro.obs.items()}
        actions = ro.act["action"].flatten(0, 1)  # (4, Ta=4, Da=3), raw samples (not clamped)
        with torch.no_grad():
            mean, std = t.model.distribution(obs)
        assert torch.allclose(std, torch.full_like(std, 0.15))
        elem = torch.distributions.Normal(mean, std).log_prob(actions)[:, :2]  # the executed actions only
        want = elem.sum((1, 2)) if reduction == "sum" else elem.mean((1, 2)).clamp(-1.5, 0.5)  # mean, then clamp
        torch.testing.assert_close(ro.act["logprob"].flatten(0, 1), want, rtol=1e-5, atol=1e-5)
        env_a = t.agent.env_action({"action": ro.act["action"][0]})
        assert env_a.shape == (2, 2, 3) and np.abs(env_a).max() <= 0.8 + 1e-6  # clamped into the data range
    finally:
        t.close()


def test_std_is_bounded(tmp_path, chunked_run):
    t = _finetuner(tmp_path / "r", "agent=ppo", "checkpoint=%s" % chunked_run, "agent.std_min=0.05", "agent.std_max=0.5",
                   "agent.init_std=0.1")
    try:
        obs = {"state": torch.zeros(1, 1, 11)}
        for log_std, want in ((5.0, 0.5), (-9.0, 0.05), (math.log(0.3), 0.3)):
            with torch.no_grad():
                t.model.log_std.fill_(log_std)
            torch.testing.assert_close(t.model.distribution(obs)[1], torch.full((3,), want), rtol=1e-6, atol=1e-7)
    finally:
        t.close()


def test_from_scratch_checkpoint_normalizes_like_the_agent(tmp_path):
    """CleanRL's recipe: orthogonal init (actor head gain 0.01, critic head gain 1, zero biases); running
    observation normalization; the saved normalizer reproduces the agent's normalized observations, so
    load_policy / dpft rollout act as the trained agent did."""
    import dpft
    from dpft.agents.finetune import Finetuner

    out = tmp_path / "scratch"
    args = ["agent=ppo", "env=hopper", "preset=ppo_scratch", "n_steps=64", "envs=2", "iterations=1",
            "agent.batch_size=32", "agent.update_epochs=1"]
    t = Finetuner(_ft(out, *args))
    try:
        a = t.agent
        heads = [[m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1] for net in (t.model, a.critic)]
        for head, gain in zip(heads, (0.01, 1.0)):
            w = head.weight.detach().double()
            rows = min(w.shape)  # orthogonal: W W^T = gain^2 I (on the smaller side)
            gram = w @ w.t() if w.shape[0] == rows else w.t() @ w
            torch.testing.assert_close(gram, gain ** 2 * torch.eye(rows, dtype=torch.float64), rtol=1e-4, atol=1e-6)
            assert float(head.bias.detach().abs().max()) == 0.0
        t.run()
        assert float(a.obs_rms.count) > 100 and not torch.allclose(a.obs_rms.mean, torch.zeros(11, dtype=a.obs_rms.mean.dtype))
        raw = {"obs": np.random.default_rng(1).normal(size=(5, 1, 11)).astype(np.float32) * 3}
        with torch.no_grad():
            want = a.obs_to_model(raw)["state"]
    finally:
        t.close()
    policy = dpft.load_policy(str(out))
    got = policy.normalize_obs(raw)["state"]
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-4)
    assert policy.meta["policy_kind"] == "gaussian"
    with torch.no_grad():  # evaluation acts with the mean, clamped to the env's [-1, 1] box
        mean = policy.model.distribution(policy.normalize_obs(raw))[0]
    np.testing.assert_allclose(policy.act(raw["obs"]), mean.clamp(-1, 1).numpy(), rtol=1e-6, atol=1e-6)


def test_resume_with_a_longer_budget_follows_the_new_linear_schedule(tmp_path):
    """A linear lr schedule re-derived from the new iterations= on resume: the first resumed iteration must run
    at base * (1 - 2/3), not at the old schedule's restored lr (0 after 2 of 2 iterations, a no-op Adam step)."""
    from safetensors.torch import load_file

    from dpft.agents.finetune import Finetuner

    out = tmp_path / "lin"
    args = ["agent=ppo", "env=hopper", "preset=ppo_scratch", "n_steps=32", "envs=1", "agent.batch_size=32",
            "agent.update_epochs=1", "save_every=1", "keep_checkpoints=0"]
    t = Finetuner(_ft(out, *(args + ["iterations=2"])))
    try:
        t.run()
    finally:
        t.close()
    t = Finetuner(_ft(out, *(args + ["iterations=3", "resume=true"])))
    try:
        base = 3.0e-4  # ppo_scratch actor_lr
        for opt in t.agent.optimizers().values():
            assert opt.param_groups[0]["lr"] == pytest.approx(base * (1.0 - 2.0 / 3.0))
        t.run()
    finally:
        t.close()
    w2 = load_file(str(out / "checkpoints" / "step_00000002" / "model.safetensors"))
    w3 = load_file(str(out / "checkpoints" / "step_00000003" / "model.safetensors"))
    assert any(not torch.equal(w2[k], w3[k]) for k in w2)  # the resumed iteration did move the actor


def test_gaussian_logprob_mean_then_clamp_hand_values():
    """Issue 19 item 3: Gaussian PPO averages the log-densities over action steps and dims, then clamps the mean
    (DPPO's gaussian_vpg); the diffusion agent keeps DPPO's per-element clamp."""
    from dpft.agents.onpolicy import clamp_mean, mean_clamp

    logp = torch.tensor([[[3.0, 3.0, -1.0]], [[-9.0, -9.0, -9.0]]])  # (B=2, act_steps=1, Da=3)
    torch.testing.assert_close(mean_clamp(logp, -5.0, 2.0), torch.tensor([5.0 / 3.0, -5.0]))
    torch.testing.assert_close(clamp_mean(logp, -5.0, 2.0), torch.tensor([1.0, -5.0]))


def test_log_std_score_at_std_004_mean_clamp_against_per_element_clamp():
    """At std 0.04 (the ppo_furniture preset's initial std) an element's log-density at the mean is 2.30 > 2: the
    per-element clamp zeroes the gradient of 56% of the elements (those with z^2 < 0.6), which all had a negative
    log-std score z^2 - 1, so the summed score is strongly positive (+923 over 2000 chunks of 4 x 7); the mean clamp
    keeps every row whose mean log-density is below 2 (over 90% of them) and its score sum is the sum of those rows'
    mean(z^2 - 1) (+60: the few cut rows are those with a small mean z^2)."""
    from dpft.agents.onpolicy import clamp_mean, mean_clamp
    from dpft.models.gaussian import normal_log_prob

    z = torch.randn(2000, 4, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    scores = {}
    for name, reduce in (("mean_clamp", mean_clamp), ("clamp_mean", clamp_mean)):
        log_std = torch.tensor(math.log(0.04), dtype=torch.float64, requires_grad=True)
        std = log_std.exp()
        reduce(normal_log_prob(std.detach() * z, std), -5.0, 2.0).sum().backward()
        scores[name] = float(log_std.grad)
    elem_lp = -0.5 * z ** 2 - math.log(0.04) - 0.5 * math.log(2 * math.pi)
    kept_rows = elem_lp.flatten(1).mean(1) <= 2.0
    want_mean_clamp = float(((z ** 2 - 1).flatten(1).mean(1) * kept_rows).sum())
    inside = (elem_lp <= 2.0) & (elem_lp >= -5.0)
    want_clamp_mean = float((((z ** 2 - 1) * inside).flatten(1).mean(1)).sum())
    assert scores["mean_clamp"] == pytest.approx(want_mean_clamp, rel=1e-9, abs=1e-9)
    assert scores["clamp_mean"] == pytest.approx(want_clamp_mean, rel=1e-9)
    assert float((elem_lp > 2.0).double().mean()) == pytest.approx(0.56, abs=0.02)
    assert float(kept_rows.double().mean()) > 0.9  # the mean clamp cuts few rows (those with a small mean z^2)
    assert scores["clamp_mean"] > 900.0 and abs(scores["mean_clamp"]) < 0.1 * scores["clamp_mean"]


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_first_minibatch_ratio_is_exactly_one(tmp_path, chunked_run, reduction):
    """The update's log-density is the sampler's own normal_log_prob, so before any step new == old exactly for the
    samples of the first collection step (the old formula differed by ~1e-7). Later steps of a rollout can differ by
    one float32 ulp of the summed log-prob (seen once in four steps here): the actor's forward pass at collection
    time is not always bit-identical to the same forward pass at update time."""
    t = _finetuner(tmp_path / "r", "agent=ppo", "checkpoint=%s" % chunked_run, "agent.logprob_reduction=%s" % reduction,
                   "agent.init_std=0.17", "envs=16")
    try:
        t.collector.reset(list(range(16)))
        ro = t.collector.collect(1)
        adv, ret = t.agent.advantages(ro)
        flat = {"obs": {k: v.flatten(0, 1) for k, v in ro.obs.items()},
                "act": {k: v.flatten(0, 1) for k, v in ro.act.items()},
                "adv": adv.reshape(-1), "ret": ret.reshape(-1), "v_old": ro.values.reshape(-1)}
        with torch.no_grad():
            _, info = t.agent.policy_loss(ro, flat, torch.arange(16))  # step 0, every env
        assert float(info["ratio"]) == 1.0 and float(info["approx_kl"]) == 0.0
    finally:
        t.close()
