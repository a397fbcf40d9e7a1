"""IDQL modules (dpft/rl/idql.py): candidate selection on fixed critics, one update step's numbers on a
hand-checkable case, the actor step, and the checkpoint round trip through load_policy."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import dpft
from dpft.errors import DpftError
from dpft.models import build_policy_model, policy_spec
from dpft.normalization import MinMaxNormalizer
from dpft.rl import idql as I
from dpft.rl.idql_math import expectile_loss, select_candidates, twin_q_loss, twin_q_target

DO, DA, TA, TO, K = 3, 2, 2, 1, 4
SPEC = {"name": "diffusion_mlp", "mlp_dims": [16, 16, 16], "denoising_steps": K, "time_dim": 4}


def _actor(seed=0):
    torch.manual_seed(seed)
    model = build_policy_model(SPEC, {"state": (DO,)}, DO, [], DA, TA, TO)
    return I.make_idql_actor(model)


def _ac(seed=0, dims=(8, 8, 8)):
    torch.manual_seed(seed + 100)
    return I.IDQLActorCritic(_actor(seed), DO * TO, TA, critic_dims=dims)


def _obs(b, seed=1):
    return {"state": torch.rand(b, TO, DO, generator=torch.Generator().manual_seed(seed)) * 2 - 1}


class FixedQ(nn.Module):
    """min Q'(s, a) = -(sum of the executed chunk - s_0)^2: a known score per candidate."""

    def min_q(self, s, a):
        return -(a.flatten(1).sum(1) - s[:, 0]) ** 2


def test_actor_covers_the_whole_chain_and_refuses_gaussian():
    actor = _actor()
    assert actor.ft_denoising_steps == actor.num_sampling_steps == K
    assert actor.ft_timestep_range() == (0, K)  # the actor loss trains every timestep (DPPO's whole chain)
    assert all(not p.requires_grad for p in actor.network.parameters())
    gauss = build_policy_model({"name": "gaussian_mlp", "mlp_dims": [8]}, {"state": (DO,)}, DO, [], DA, TA, TO)
    with pytest.raises(DpftError, match="diffusion checkpoint"):
        I.make_idql_actor(gauss)


def test_argmax_selection_on_fixed_critics_one_batched_call():
    ac = _ac()
    ac.q_target = FixedQ()
    obs = _obs(5)
    calls = {"enc": 0, "net": 0, "rows": []}
    enc = ac.actor.obs_encoder if ac.actor.ft_obs_encoder is None else ac.actor.ft_obs_encoder
    h1 = enc.register_forward_hook(lambda m, i, o: calls.__setitem__("enc", calls["enc"] + 1))

    def count(m, i, o):
        calls["net"] += 1
        calls["rows"].append(i[0].shape[0])

    h2 = ac.actor.ft_network.register_forward_hook(count)
    chunk, info = ac.select_actions(obs, 7, rule="argmax", deterministic=False,
                                    generator=torch.Generator().manual_seed(3))
    h1.remove()
    h2.remove()
    # each obs encoded once, the 7 candidates of 5 obs in one batch of 35 rows per denoising step
    assert calls["enc"] == 1 and calls["net"] == K and calls["rows"] == [35] * K
    cands = ac.actor.sample(obs, generator=torch.Generator().manual_seed(3), num_samples=7)[0]
    score = -(cands[:, :TA].flatten(1).sum(1) - obs["state"][:, 0, 0].repeat_interleave(7)) ** 2
    want = score.reshape(5, 7).argmax(1)
    assert torch.equal(info["index"], want)
    assert torch.allclose(info["q"], score.reshape(5, 7))
    assert torch.equal(chunk, cands.reshape(5, 7, TA, DA)[torch.arange(5), want])
    assert chunk.shape == (5, TA, DA) and float(chunk.abs().max()) <= 1.0


@pytest.mark.parametrize("rule", ["expectile", "softmax"])
def test_stochastic_rules_use_v_and_the_same_generator(rule):
    ac = _ac()
    ac.q_target = FixedQ()
    obs = _obs(4)
    chunk, info = ac.select_actions(obs, 6, rule=rule, generator=torch.Generator().manual_seed(5),
                                    expectile=0.7, temperature=0.5)
    gen = torch.Generator().manual_seed(5)
    cands = ac.actor.sample(obs, generator=gen, num_samples=6)[0]
    q = (-(cands[:, :TA].flatten(1).sum(1) - obs["state"][:, 0, 0].repeat_interleave(6)) ** 2).reshape(4, 6)
    v = ac.value(obs["state"].flatten(1))
    idx = select_candidates(q, v, rule=rule, expectile=0.7, temperature=0.5, generator=gen)
    assert torch.allclose(info["v"], v) and torch.equal(info["index"], idx)
    assert torch.equal(chunk, cands.reshape(4, 6, TA, DA)[torch.arange(4), idx])


def _constant(net, value):
    """Zero every parameter, last Linear bias = value: the network outputs ``value`` for every input."""
    last = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        last.bias.fill_(value)


def test_update_step_numbers_by_hand():
    """V = 0.5, Q1 = 1, Q2 = 2 everywhere. Expectile 0.8: u = 1 - 0.5 > 0, loss_v = 0.8 * 0.25 = 0.2; only V's
    output bias has a gradient (-0.8), so Adam's first step (lr 0.1) moves it to 0.6. Q target with gamma 0.9:
    transition 0 truncated -> 1 + 0.9 * 0.6 = 1.54, transition 1 terminated -> 2. loss_q = ((1-1.54)^2 + 1)/2
    + ((2-1.54)^2 + 0)/2 = 0.7516; Q1's bias gradient < 0 -> 1.1, Q2's > 0 -> 1.9; Polyak 0.5: 1.05, 1.95."""
    ac = _ac()
    _constant(ac.value, 0.5)
    _constant(ac.q.q1, 1.0)
    _constant(ac.q.q2, 2.0)
    ac.q_target.load_state_dict(ac.q.state_dict())
    st = I.IDQLSettings(gamma=0.9, expectile=0.8, v_lr=0.1, q_lr=0.1, critic_tau=0.5, train_actor=False)
    opts = I.build_optimizers(ac, st)
    assert sorted(opts) == ["q", "value"]
    batch = {"obs": _obs(2), "next_obs": _obs(2, seed=2), "chunk": torch.zeros(2, TA, DA),
             "reward": torch.tensor([1.0, 2.0]), "terminated": torch.tensor([False, True]),
             "truncated": torch.tensor([True, False])}
    actor_before = copy.deepcopy(ac.actor.state_dict())
    info = I.idql_update(ac, opts, batch, st)
    assert info["v_loss"] == pytest.approx(0.2, abs=1e-6)
    assert info["v_loss"] == pytest.approx(float(expectile_loss(torch.tensor([0.5, 0.5]), 0.8)), abs=1e-6)
    y = twin_q_target(torch.tensor([1.0, 2.0]), torch.tensor([0.6, 0.6]), torch.tensor([False, True]), 0.9)
    assert torch.allclose(y, torch.tensor([1.54, 2.0]))
    assert info["target"] == pytest.approx(1.77, abs=1e-5)
    assert info["q_loss"] == pytest.approx(0.7516, abs=1e-5)
    assert info["q_loss"] == pytest.approx(float(twin_q_loss(torch.ones(2), 2 * torch.ones(2), y)), abs=1e-5)
    s = _obs(3, seed=9)["state"].flatten(1)
    a = torch.rand(3, TA * DA)
    assert torch.allclose(ac.value(s), torch.full((3,), 0.6), atol=1e-6)
    q1, q2 = ac.q(s, a)
    assert torch.allclose(q1, torch.full((3,), 1.1), atol=1e-6) and torch.allclose(q2, torch.full((3,), 1.9), atol=1e-6)
    t1, t2 = ac.q_target(s, a)
    assert torch.allclose(t1, torch.full((3,), 1.05), atol=1e-6)
    assert torch.allclose(t2, torch.full((3,), 1.95), atol=1e-6)
    assert "actor_loss" not in info
    assert all(torch.equal(v, ac.actor.state_dict()[k]) for k, v in actor_before.items())  # critic-only


def test_actor_step_is_its_diffusion_loss_on_replay_and_skipped_in_warmup():
    ac = _ac()
    st = I.IDQLSettings(actor_lr=1e-2)
    opts = I.build_optimizers(ac, st)
    batch = {"obs": _obs(6), "next_obs": _obs(6, seed=2), "chunk": torch.rand(6, TA, DA) * 2 - 1,
             "reward": torch.zeros(6), "terminated": torch.zeros(6, dtype=torch.bool),
             "truncated": torch.zeros(6, dtype=torch.bool)}
    before = copy.deepcopy(ac.actor)
    with torch.no_grad():
        want, _ = before.loss({"obs": batch["obs"], "actions": batch["chunk"]},
                              generator=torch.Generator().manual_seed(4), network="ft", t_range=(0, K))
    info = I.idql_update(ac, opts, batch, st, generator=torch.Generator().manual_seed(4), update_actor=True)
    assert info["actor_loss"] == pytest.approx(float(want), rel=1e-6)
    changed = [k for k, v in ac.actor.state_dict().items() if not torch.equal(v, before.state_dict()[k])]
    assert changed and all(k.startswith("ft_") for k in changed)  # the frozen base never moves
    frozen = copy.deepcopy(ac.actor.state_dict())
    info = I.idql_update(ac, opts, batch, st, generator=torch.Generator().manual_seed(4), update_actor=False)
    assert "actor_loss" not in info
    assert all(torch.equal(v, ac.actor.state_dict()[k]) for k, v in frozen.items())


def test_gradient_steps_and_settings_errors():
    assert I.gradient_steps(50 * 300, 1000, 128) == 1920  # DPPO robomimic
    assert I.gradient_steps(40 * 500, 1000, 128) == 2560  # DPPO gym
    assert I.gradient_steps(3, 1000, 1) == 1
    st = I.IDQLSettings.from_mapping({"expectile": 0.7, "critic_dims": [4, 4, 4], "unrelated": 1})
    assert st.expectile == 0.7 and st.selection_expectile == 0.7 and st.critic_dims == (4, 4, 4)
    with pytest.raises(DpftError, match=r"agent.expectile=1.0"):
        I.IDQLSettings.from_mapping({"expectile": 1.0})
    with pytest.raises(DpftError, match=r"agent.selection='best'"):
        I.IDQLSettings.from_mapping({"selection": "best"})


def _save(ac, out, step=5, num_candidates=6):
    normalizer = MinMaxNormalizer({"state": (np.full(DO, -2.0), np.full(DO, 2.0)),
                                   "action": (np.full(DA, -0.5), np.full(DA, 1.5))})
    meta = {"policy": "diffusion_mlp", "obs_keys": ["state"], "low_dim_keys": ["state"], "image_keys": [],
            "obs_shapes": {"state": [DO]}, "obs_dim": DO, "action_dim": DA, "horizon_steps": TA,
            "cond_steps": TO, "act_steps": TA, "env_args": {},
            "policy_spec": dict(policy_spec(SPEC), ft_denoising_steps=K),
            "idql": I.idql_meta(I.IDQLSettings(num_candidates=num_candidates, critic_dims=(8, 8, 8)), ac)}
    return I.save_idql_checkpoint(out, step, ac, normalizer, meta, "agent: idql\n"), normalizer


def test_checkpoint_round_trip_through_load_policy(tmp_path):
    ac = _ac()
    with torch.no_grad():  # critics and target that differ from their initialization and from each other
        for p in ac.q.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for p in ac.actor.ft_network.parameters():
            p.mul_(1.05)
    out = str(tmp_path / "ft")
    _, normalizer = _save(ac, out)
    policy = dpft.load_policy(out)
    assert isinstance(policy, I.IDQLPolicy) and policy.num_candidates == 6 and policy.weights == "model"
    raw = np.random.RandomState(0).uniform(-2, 2, size=(5, DO)).astype(np.float32)
    got = policy.act(raw, deterministic=True, generator=torch.Generator().manual_seed(11))
    # independently: the saved modules choose with argmax of min target Q among 6 deterministic candidates
    ac.eval()
    model_obs = {"state": normalizer.normalize("state", torch.as_tensor(raw)).reshape(5, 1, DO)}
    chunk, info = ac.select_actions(model_obs, 6, rule="argmax", deterministic=True,
                                    generator=torch.Generator().manual_seed(11))
    want = normalizer.unnormalize("action", chunk).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # the critics really choose: one candidate only gives other actions
    policy.num_candidates = 1
    one = policy.act(raw, deterministic=True, generator=torch.Generator().manual_seed(11))
    assert not np.allclose(one, got)
    assert policy.describe()["policy_kind"] == "idql"


def test_checkpoint_without_or_with_damaged_critics_is_named(tmp_path):
    import os

    from dpft.checkpoint import ChecksumError

    ac = _ac()
    out = str(tmp_path / "ft")
    ckpt_dir, _ = _save(ac, out)
    path = os.path.join(ckpt_dir, I.CRITIC_FILE)
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0xFF  # one flipped byte in the last weight
    open(path, "wb").write(bytes(data))
    with pytest.raises(ChecksumError) as e:
        dpft.load_policy(out)
    assert e.value.path == path and "damaged" in str(e.value)
    os.remove(path)
    with pytest.raises(DpftError, match="has no critic.safetensors: the critics"):
        dpft.load_policy(out)


def test_learns_a_contextual_bandit():
    """One-chunk episodes (terminated), reward -(mean(chunk) - 0.8 s_0)^2 from an untrained actor. 8 iterations of
    64 chunks chosen by DPPO's expectile rule, 40 updates each, actor after a 2-iteration warm-up: the argmax of 16
    candidates goes from -0.46 (random critics) to about -0.03, and the actor's own single samples from -0.36 to
    about -0.22 (BC on the chunks the critics chose); about 5 s on one core."""
    from dpft.rl.replay import ChunkReplayBuffer

    ac = _ac(dims=(32, 32, 32))
    st = I.IDQLSettings(batch_size=64, actor_lr=3e-3, v_lr=3e-3, q_lr=3e-3, critic_tau=0.05, num_candidates=16)
    opts = I.build_optimizers(ac, st)
    replay = ChunkReplayBuffer(2000, {"state": ((TO, DO), torch.float32)}, (TA, DA))
    gen = torch.Generator().manual_seed(0)

    def reward(s, a):
        return -((a[:, :TA].flatten(1).mean(1) - 0.8 * s[:, 0, 0]) ** 2)

    def evaluate(n):
        s = torch.rand(256, TO, DO, generator=torch.Generator().manual_seed(99)) * 2 - 1
        a, _ = ac.select_actions({"state": s}, n, generator=torch.Generator().manual_seed(7))
        return float(reward(s, a).mean())

    single0, best0 = evaluate(1), evaluate(16)
    for it in range(8):
        s = torch.rand(64, TO, DO, generator=gen) * 2 - 1
        a, _ = ac.select_actions({"state": s}, st.num_candidates, rule="expectile", generator=gen)
        replay.add({"state": s}, a, reward(s, a), {"state": s}, torch.ones(64, dtype=torch.bool),
                   torch.zeros(64, dtype=torch.bool))
        info = I.idql_updates(ac, opts, replay, 40, st, generator=gen, update_actor=it >= 2)
    single1, best1 = evaluate(1), evaluate(16)
    assert best0 < -0.3 and best1 > -0.08, (best0, best1)
    assert single1 > single0 + 0.08, (single0, single1)
    assert info["grad_steps"] == 40 and info["q_loss"] < 0.01
