"""dpft.rl.returns: GAE at truncation/termination, reward scaler, running mean/std, exact state round trip."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dpft.errors import DpftError
from dpft.rl.returns import RunningMeanStd, RunningRewardScaler, gae


def _hand_batch():
    """T=4, N=2. Env 0 truncates after step 1 (V(final_obs)=10, the reset obs has V=1.5); env 1 terminates
    after step 2 (its next value 99 must be ignored)."""
    rewards = torch.tensor([[1.0, 1.0], [2.0, 1.0], [3.0, 1.0], [4.0, 1.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 1.0], [1.0, 1.0], [1.5, 1.0], [2.0, 1.0]], dtype=torch.float64)
    next_values = torch.tensor([[1.0, 1.0], [10.0, 1.0], [2.0, 99.0], [3.0, 2.0]], dtype=torch.float64)
    terminated = torch.tensor([[0, 0], [0, 0], [0, 1], [0, 0]], dtype=torch.bool)
    truncated = torch.tensor([[0, 0], [1, 0], [0, 0], [0, 0]], dtype=torch.bool)
    return rewards, values, next_values, terminated, truncated


def test_gae_hand_values_truncation_and_termination_in_one_batch():
    # gamma = lam = 0.5 -> gamma*lam = 0.25. Env 0:
    #   t3: 4 + .5*3 - 2 = 3.5;  t2: 3 + .5*2 - 1.5 = 2.5, + .25*3.5 = 3.375
    #   t1 (truncated): 2 + .5*10 - 1 = 6 (no carry);  t0: 1 + .5*1 - .5 = 1, + .25*6 = 2.5
    # Env 1: t3: 1 + .5*2 - 1 = 1;  t2 (terminated): 1 - 1 = 0;  t1: .5 + .25*0 = .5;  t0: .5 + .25*.5 = .625
    adv, ret = gae(*_hand_batch(), gamma=0.5, lam=0.5)
    want_adv = torch.tensor([[2.5, 0.625], [6.0, 0.5], [3.375, 0.0], [3.5, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(adv, want_adv, rtol=0, atol=1e-15)
    torch.testing.assert_close(ret, want_adv + _hand_batch()[1], rtol=0, atol=1e-15)


def test_gae_flags_may_be_float_and_terminated_wins_over_truncated():
    r, v, nv, term, trunc = _hand_batch()
    trunc = trunc.clone()
    trunc[2, 1] = True  # both flags set: still no bootstrap from 99
    adv, _ = gae(r, v, nv, term.double(), trunc.float(), gamma=0.5, lam=0.5)
    assert adv[2, 1].item() == 0.0
    assert adv[0, 1].item() == 0.625


def _lambda_return_reference(r, v, nv, term, trunc, gamma, lam):
    """Brute force from the definition: A_t = sum_n (1-lam) lam^(n-1) G_t^(n) - V_t over the steps left in
    the episode segment (the tail weight lam^(L-1) on the longest return), each n-step return bootstrapped
    from next_values at its last step unless that step terminated."""
    T, N = r.shape
    out = np.zeros((T, N))
    for n in range(N):
        for t in range(T):
            end = t  # last step of this episode segment inside the batch
            while end < T - 1 and not (term[end, n] or trunc[end, n]):
                end += 1
            L = end - t + 1
            total = 0.0
            for k in range(1, L + 1):
                g = sum(gamma ** i * r[t + i, n] for i in range(k))
                last = t + k - 1
                if not term[last, n]:
                    g += gamma ** k * (nv[last, n] if last == end else v[last + 1, n])
                weight = (1 - lam) * lam ** (k - 1) if k < L else lam ** (L - 1)
                total += weight * g
            out[t, n] = total - v[t, n]
    return out


def test_gae_matches_brute_force_lambda_returns():
    g = torch.Generator().manual_seed(0)
    T, N = 9, 5
    r = torch.randn(T, N, generator=g, dtype=torch.float64)
    v = torch.randn(T, N, generator=g, dtype=torch.float64)
    term = torch.rand(T, N, generator=g) < 0.15
    trunc = (torch.rand(T, N, generator=g) < 0.15) & ~term
    # next_values: inside an episode = values[t+1]; at a boundary / batch end = a fresh V(final_obs)
    nv = torch.cat([v[1:], torch.zeros(1, N, dtype=torch.float64)])
    fresh = torch.randn(T, N, generator=g, dtype=torch.float64)
    boundary = term | trunc
    boundary[-1] = True
    nv = torch.where(boundary, fresh, nv)
    adv, ret = gae(r, v, nv, term, trunc, gamma=0.9, lam=0.8)
    want = _lambda_return_reference(r.numpy(), v.numpy(), nv.numpy(), term.numpy(), trunc.numpy(), 0.9, 0.8)
    np.testing.assert_allclose(adv.numpy(), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(ret, adv + v)


def test_gae_rejects_mismatched_shapes_and_bad_gamma():
    r, v, nv, term, trunc = _hand_batch()
    with pytest.raises(DpftError, match=r"next_values has \(3, 2\)"):
        gae(r, v, nv[:3], term, trunc, 0.9, 0.9)
    with pytest.raises(DpftError, match="gamma and lam"):
        gae(r, v, nv, term, trunc, 1.5, 0.9)


# ---------------------------------------------------------------- reward scaler

def _numpy_reward_scaler(chunks, gamma, clip, eps=1e-8, count=1e-4):
    """Re-implementation of the documented formula (DPPO's, with gamma given and M2 / N)."""
    mean, var, ret = 0.0, 1.0, None
    outs = []
    for rewards, dones in chunks:
        ret = np.zeros(rewards.shape[1]) if ret is None else ret
        g = np.zeros_like(rewards)
        for t in range(rewards.shape[0]):
            ret = ret * gamma + rewards[t]
            g[t] = ret
            ret = ret * (1 - dones[t])
        b_mean, b_var, b_n = g.mean(), g.var(), g.size
        delta = b_mean - mean
        tot = count + b_n
        mean = mean + delta * b_n / tot
        var = (var * count + b_var * b_n + delta ** 2 * count * b_n / tot) / tot
        count = tot
        outs.append(np.clip(rewards / np.sqrt(var + eps), -clip, clip))
    return outs, mean, var, count


def _random_chunks(seed, n_calls=3, T=7, N=4, scale=3.0):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(T, N)) * scale + 1.0, (rng.random((T, N)) < 0.2).astype(np.float64))
            for _ in range(n_calls)]


def test_reward_scaler_matches_numpy_formula():
    chunks = _random_chunks(1)
    scaler = RunningRewardScaler(num_envs=4, gamma=0.97, clip=2.0)
    got = [scaler(torch.from_numpy(r), torch.from_numpy(d).bool()) for r, d in chunks]
    want, mean, var, count = _numpy_reward_scaler(chunks, 0.97, 2.0)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-12, atol=1e-12)
    assert any((np.abs(w) == 2.0).any() for w in want)  # the clip was exercised
    np.testing.assert_allclose([scaler.stats.mean.item(), scaler.stats.var.item(), scaler.stats.count.item()],
                               [mean, var, count], rtol=1e-12)


def test_reward_scaler_variance_is_population_variance_of_all_returns():
    # independent of the merge: the prior is a pseudo-population of weight 1e-4, mean 0, variance 1
    chunks = _random_chunks(2, n_calls=4)
    scaler = RunningRewardScaler(num_envs=4, gamma=0.9, clip=None)
    for r, d in chunks:
        scaler.update(torch.from_numpy(r), torch.from_numpy(d))
    ret, gs = np.zeros(4), []
    for r, d in chunks:
        for t in range(r.shape[0]):
            ret = ret * 0.9 + r[t]
            gs.append(ret.copy())
            ret = ret * (1 - d[t])
    g = np.concatenate(gs)
    n0 = 1e-4
    mean = g.sum() / (n0 + g.size)
    var = (n0 * 1.0 + n0 * mean ** 2 + ((g - mean) ** 2).sum()) / (n0 + g.size)
    np.testing.assert_allclose(scaler.stats.var.item(), var, rtol=1e-10)
    np.testing.assert_allclose(scaler.ret.numpy(), ret, rtol=0, atol=0)


def test_reward_scaler_reset_rows_and_float32_passthrough():
    scaler = RunningRewardScaler(num_envs=3, gamma=0.5)
    scaler.update(torch.ones(2, 3), torch.zeros(2, 3))
    np.testing.assert_allclose(scaler.ret.numpy(), [1.5, 1.5, 1.5])
    scaler.reset([0, 2])
    np.testing.assert_allclose(scaler.ret.numpy(), [0.0, 1.5, 0.0])
    out = scaler.scale(torch.ones(2, 3, dtype=torch.float32))
    assert out.dtype == torch.float32
    with pytest.raises(DpftError, match=r"num_envs=3"):
        scaler.update(torch.ones(2, 4), torch.zeros(2, 4))


def test_reward_scaler_reduce_equals_one_big_batch():
    # two "ranks" each hold half the envs; an all-reduce SUM of the moments equals one process with all envs
    chunks = _random_chunks(3, n_calls=1, N=4)
    r, d = (torch.from_numpy(x) for x in chunks[0])
    full = RunningRewardScaler(num_envs=4, gamma=0.9)
    full.update(r, d)
    halves = [(r[:, :2], d[:, :2]), (r[:, 2:], d[:, 2:])]
    partial = []  # each rank's local (n, sum g, sum g^2), captured by an identity "all-reduce"
    for rh, dh in halves:
        RunningRewardScaler(num_envs=2, gamma=0.9).update(rh, dh, reduce=lambda t: partial.append(t.clone()) or t)
    for rh, dh in halves:
        rank = RunningRewardScaler(num_envs=2, gamma=0.9)
        rank.update(rh, dh, reduce=lambda t: partial[0] + partial[1])
        torch.testing.assert_close(rank.stats.var, full.stats.var, rtol=1e-12, atol=0)
        torch.testing.assert_close(rank.stats.mean, full.stats.mean, rtol=1e-12, atol=1e-15)


def test_reward_scaler_state_round_trip_is_exact(tmp_path):
    from safetensors.torch import load_file, save_file

    chunks = _random_chunks(4, n_calls=4)
    a = RunningRewardScaler(num_envs=4, gamma=0.999)
    for r, d in chunks[:2]:
        a(torch.from_numpy(r), torch.from_numpy(d))
    save_file(a.state_dict(), str(tmp_path / "scaler.safetensors"))
    b = RunningRewardScaler(num_envs=4, gamma=0.999)
    b.load_state_dict(load_file(str(tmp_path / "scaler.safetensors")))
    for r, d in chunks[2:]:
        out_a = a(torch.from_numpy(r), torch.from_numpy(d))
        out_b = b(torch.from_numpy(r), torch.from_numpy(d))
        assert torch.equal(out_a, out_b)
    for k, v in a.state_dict().items():
        assert v.dtype == torch.float64 and torch.equal(v, b.state_dict()[k]), k
    with pytest.raises(DpftError, match="num_envs=5"):
        RunningRewardScaler(num_envs=5, gamma=0.999).load_state_dict(a.state_dict())
    with pytest.raises(DpftError, match="missing"):
        b.load_state_dict({"mean": a.state_dict()["mean"]})


# ---------------------------------------------------------------- running mean / std

def test_running_mean_std_matches_concatenated_batches_and_round_trips():
    rng = np.random.default_rng(5)
    batches = [rng.normal(loc=[1.0, -2.0, 0.0], scale=[0.5, 3.0, 1.0], size=(n, 3)) for n in (5, 1, 17)]
    rms = RunningMeanStd((3,), count_init=1e-4)
    for b in batches[:2]:
        rms.update(torch.from_numpy(b).float())  # float32 input, float64 statistics
    clone = RunningMeanStd((3,))
    clone.load_state_dict(rms.state_dict())
    for x in (rms, clone):
        x.update(torch.from_numpy(batches[2]))
    assert all(torch.equal(rms.state_dict()[k], clone.state_dict()[k]) for k in ("mean", "var", "count"))
    x = np.concatenate([b.astype(np.float32).astype(np.float64) if i < 2 else b for i, b in enumerate(batches)])
    n0 = 1e-4
    mean = x.sum(0) / (n0 + len(x))
    var = (n0 + n0 * mean ** 2 + ((x - mean) ** 2).sum(0)) / (n0 + len(x))
    np.testing.assert_allclose(rms.mean.numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(rms.var.numpy(), var, rtol=1e-12)
    obs = torch.tensor([[100.0, 0.0, 0.0]])
    norm = rms.normalize(obs, clip=10.0)
    assert norm.dtype == torch.float32 and norm[0, 0].item() == 10.0
    np.testing.assert_allclose(norm[0, 1].item(), (0 - mean[1]) / np.sqrt(var[1] + 1e-8), rtol=1e-6)
    with pytest.raises(DpftError, match=r"\(B, 3\)"):
        rms.update(torch.zeros(4, 2))
    with pytest.raises(DpftError, match="shape"):
        RunningMeanStd((2,)).load_state_dict(rms.state_dict())
