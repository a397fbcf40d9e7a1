"""dpft.rl.residual: ResiP's residual policy (zero-init = base, per-env chunk cache, checkpoint round trip)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import dpft
from dpft.checkpoint import save_checkpoint
from dpft.errors import DpftError
from dpft.models import build_policy_model, policy_spec
from dpft.normalization import MinMaxNormalizer
from dpft.policy import Policy
from dpft.rl.residual import (BaseChunkCache, ResidualModel, ResidualPolicy, build_residual_model, residual_meta,
                              residual_spec)

DO, DA, TA, TO = 5, 3, 6, 2


def _meta(spec):
    return {"policy": "diffusion_mlp", "policy_type": "diffusion", "policy_kind": "diffusion", "policy_spec": spec,
            "obs_keys": ["state"], "low_dim_keys": ["state"], "image_keys": [], "obs_shapes": {"state": [DO]},
            "obs_dim": DO, "action_dim": DA, "horizon_steps": TA, "cond_steps": TO, "act_steps": 3, "env_args": {}}


def _normalizer():
    return MinMaxNormalizer({"state": (-2 * np.ones(DO), 2 * np.ones(DO)),
                             "action": (np.array([-1.0, 0.0, 2.0]), np.array([3.0, 1.0, 6.0]))})


def _base(seed=0):
    spec = policy_spec({"name": "diffusion_mlp", "mlp_dims": [32, 32, 32], "denoising_steps": 10, "use_ddim": True,
                        "ddim_steps": 3})
    torch.manual_seed(seed)
    model = build_policy_model(spec, {"state": [DO]}, DO, [], DA, TA, TO)
    return model.eval(), spec


def _residual(act_steps=3, **kw):
    base, spec = _base()
    rspec = residual_spec(hidden_dims=[16, 16], base_act_steps=act_steps, **kw)
    torch.manual_seed(1)
    model = ResidualModel(base, DO, TO, rspec)
    meta = residual_meta(_meta(spec), spec, rspec)
    return model, meta, spec


def _obs(b, seed):
    return np.random.default_rng(seed).uniform(-2, 2, size=(b, TO, DO)).astype(np.float32)


def test_zero_init_gives_the_base_actions_exactly():
    model, meta, spec = _residual(act_steps=3)
    base_policy = Policy(model.base, _normalizer(), dict(_meta(spec), act_steps=3))
    policy = ResidualPolicy(model, _normalizer(), meta)
    head = model.residual.trunk.layers[-1]
    assert head.bias is None and float(head.weight.detach().abs().sum()) == 0.0
    obs = _obs(4, 0)
    chunk = base_policy.predict_chunk(obs, generator=torch.Generator().manual_seed(7))  # (4, Ta, Da)
    policy.reset()
    g = torch.Generator().manual_seed(7)
    got = [policy.act(obs if j == 0 else _obs(4, j), generator=g) for j in range(3)]  # later obs: no re-plan
    np.testing.assert_array_equal(np.concatenate(got, axis=1), chunk[:, :3])
    # stochastic residual: the mean is 0, so actions differ from the base by scale * sigma * noise only
    x = model.residual_input(torch.zeros(2, TO, DO), torch.zeros(2, DA))
    with torch.no_grad():
        res, logp = model.sample_residual(x, deterministic=False, generator=torch.Generator().manual_seed(0))
        lp2 = model.residual.log_prob(x, res)
    z = res / math.exp(-1.0)
    np.testing.assert_allclose(logp.numpy(), (-0.5 * z ** 2 + 1.0 - 0.5 * math.log(2 * math.pi)).sum(-1).numpy(),
                               rtol=1e-6)
    np.testing.assert_allclose(lp2.numpy(), logp.numpy(), rtol=1e-6)


def test_env_action_is_clamped_base_plus_scaled_residual():
    model, meta, _ = _residual()
    base = torch.tensor([[0.5, -0.95, 0.0]])
    res = torch.tensor([[2.0, -1.0, 0.3]])
    np.testing.assert_allclose(model.env_action(base, res).detach().numpy(), [[0.7, -1.0, 0.03]], rtol=1e-6)


def test_cache_replans_every_act_steps_and_reset_rows_only():
    calls = []

    def plan(o):
        calls.append(o["state"][:, 0, 0].tolist())
        b = o["state"].shape[0]
        # chunk step j of a plan made from obs value v: v * 10 + j (so we can read back which plan and step)
        return o["state"][:, :1, :1].expand(b, TA, DA) * 10 + torch.arange(TA, dtype=torch.float32)[None, :, None]

    cache = BaseChunkCache(act_steps=2)
    obs = lambda v: {"state": torch.tensor(v, dtype=torch.float32)[:, None, None].expand(len(v), TO, DO)}
    a0 = cache.step(obs([1.0, 2.0, 3.0]), plan)
    assert a0[:, 0].tolist() == [10.0, 20.0, 30.0] and calls == [[1.0, 2.0, 3.0]]
    a1 = cache.step(obs([4.0, 5.0, 6.0]), plan)  # second step of the same plans
    assert a1[:, 0].tolist() == [11.0, 21.0, 31.0] and len(calls) == 1
    cache.reset([1])
    a2 = cache.step(obs([7.0, 8.0, 9.0]), plan)  # all due (act_steps = 2 reached)
    assert a2[:, 0].tolist() == [70.0, 80.0, 90.0] and calls[-1] == [7.0, 8.0, 9.0]
    cache.reset([1])  # only env 1 re-plans; 0 and 2 continue their chunks
    peek = cache.step(obs([1.5, 2.5, 3.5]), plan, advance=False)
    assert peek[:, 0].tolist() == [71.0, 25.0, 91.0] and calls[-1] == [2.5]
    a3 = cache.step(obs([1.5, 2.5, 3.5]), plan)
    assert a3[:, 0].tolist() == [71.0, 25.0, 91.0] and calls[-1] == [2.5]
    a4 = cache.step(obs([0.1, 0.2, 0.3]), plan)  # 0 and 2 re-plan, 1 takes its second step
    assert a4[:, 0].tolist() == pytest.approx([1.0, 26.0, 3.0]) and calls[-1] == pytest.approx([0.1, 0.3])
    assert cache.plans == 3 + 3 + 1 + 2
    with pytest.raises(DpftError, match="rows must be env indices"):
        cache.reset([5])
    with pytest.raises(DpftError, match="holds 3 envs but got a batch of 2"):
        cache.step(obs([1.0, 2.0]), plan)
    cache.reset()
    assert cache.step(obs([1.0, 2.0]), plan).shape == (2, DA)


def test_policy_reset_rows_replans_only_those_rows():
    model, meta, _ = _residual(act_steps=4)
    policy = ResidualPolicy(model, _normalizer(), meta)
    policy.reset()
    policy.act(_obs(3, 0), seed=0)
    assert policy.cache.plans == 3
    policy.reset([2])
    policy.act(_obs(3, 1), seed=1)
    assert policy.cache.plans == 4 and policy.cache.index.tolist() == [2, 2, 1]
    policy.act(_obs(3, 2), seed=2)
    policy.act(_obs(3, 3), seed=3)
    assert policy.cache.plans == 4 and policy.cache.index.tolist() == [4, 4, 3]
    policy.act(_obs(3, 4), seed=4)  # 0 and 1 re-plan after 4 steps, 2 takes its fourth step
    assert policy.cache.plans == 6 and policy.cache.index.tolist() == [1, 1, 4]


def test_base_parameters_are_a_separate_frozen_group_with_an_il_loss():
    model, _, _ = _residual()
    ids = {id(p) for p in model.residual_parameters()}
    assert ids.isdisjoint({id(p) for p in model.base_parameters()})
    assert all(not p.requires_grad for p in model.base_parameters())
    assert id(model.residual.log_std) not in ids  # fixed log-std (ResiP learn_std false)
    batch = {"obs": {"state": torch.zeros(4, TO, DO)}, "actions": torch.zeros(4, TA, DA)}
    with pytest.raises(DpftError, match="set_base_trainable"):
        model.base_il_loss(batch)
    model.set_base_trainable(True)
    loss, _ = model.base_il_loss(batch, torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is None for p in model.residual.parameters())
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.base.network.parameters())
    model.train()
    assert model.residual.training and not model.base.training
    learn, _, _ = _residual(learn_std=True, init_logstd=-1.0, logstd_min=-2.0, logstd_max=-0.5)
    with torch.no_grad():
        learn.residual.log_std.fill_(0.3)
    np.testing.assert_allclose(learn.residual.std().detach().numpy(), math.exp(-0.5), rtol=1e-6)
    with pytest.raises(DpftError, match="base_act_steps=7 must be <= the base's horizon_steps=6"):
        _residual(act_steps=7)


def test_checkpoint_round_trip_through_load_policy(tmp_path):
    model, meta, _ = _residual(act_steps=2)
    with torch.no_grad():  # a trained residual: non-zero head
        model.residual.trunk.layers[-1].weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
        for p in model.residual.parameters():
            p.add_(0.05)
    out = str(tmp_path / "ft")
    save_checkpoint(out, 3, model.state_dict(), None, _normalizer(), meta, "iterations: 1\n")
    policy = dpft.load_policy(out)
    assert isinstance(policy, ResidualPolicy) and policy.stateful and policy.weights == "model"
    assert policy.meta["policy_kind"] == "residual" and policy.act_steps == 1
    ref = ResidualPolicy(model, _normalizer(), meta)
    for p in (policy, ref):
        p.reset()
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for j in range(5):
        a, b = policy.act(_obs(3, j), generator=g1), ref.act(_obs(3, j), generator=g2)
        assert a.shape == (3, 1, DA)
        np.testing.assert_array_equal(a, b)
        if j == 0:
            base = ref.normalizer.unnormalize("action", ref.cache.chunk[:, 0]).numpy()
            assert np.abs(a[:, 0] - base).max() > 1e-4  # the residual moved the action away from the base
    rebuilt = build_residual_model(policy.meta)
    assert sorted(rebuilt.state_dict()) == sorted(model.state_dict())
