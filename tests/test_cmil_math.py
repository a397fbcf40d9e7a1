"""CMIL math against hand-computed values and torch.distributions."""
from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from dpft.errors import DpftError
from dpft.rl import cmil_math as cm


def _gauss(seed, shape):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(shape, generator=g)
    std = torch.rand(shape, generator=g) + 0.2
    return mean, std


def test_gaussian_kl_matches_torch_distributions():
    mq, sq = _gauss(0, (4, 3, 5))
    mp, sp = _gauss(1, (4, 3, 5))
    want = kl_divergence(Normal(mq, sq), Normal(mp, sp)).sum(-1)
    assert torch.allclose(cm.gaussian_kl(mq, sq, mp, sp), want, atol=1e-6)
    # one hand value: q = N(1, 1), p = N(0, 2^2): log 2 + (1 + 1) / 8 - 1/2
    v = cm.gaussian_kl(torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([2.0]))
    assert v.item() == pytest.approx(math.log(2.0) + 0.25 - 0.5, abs=1e-6)


def test_kl_balance_value_and_free_nats():
    mq, sq = _gauss(2, (3, 4, 6))
    mp, sp = _gauss(3, (3, 4, 6))
    kl = kl_divergence(Normal(mq, sq), Normal(mp, sp)).sum(-1)
    assert kl.mean().item() > 1.0
    loss, value = cm.kl_balance(mq, sq, mp, sp, balance=0.8, free_nats=1.0)
    # both sides have the same value; only the gradients differ
    assert loss.item() == pytest.approx(kl.mean().item(), rel=1e-6)
    assert torch.allclose(value, kl, atol=1e-6)
    # free nats above the mean KL: the loss is the constant `free`
    big = kl.mean().item() + 5.0
    loss, _ = cm.kl_balance(mq, sq, mp, sp, free_nats=big)
    assert loss.item() == pytest.approx(big)
    # per-element free nats (free_avg=False) differ from clipping the mean
    free = float(kl.median())
    loss_el, _ = cm.kl_balance(mq, sq, mp, sp, free_nats=free, free_avg=False)
    assert loss_el.item() == pytest.approx(torch.clamp(kl, min=free).mean().item(), rel=1e-6)
    loss_avg, _ = cm.kl_balance(mq, sq, mp, sp, free_nats=free, free_avg=True)
    assert loss_avg.item() == pytest.approx(max(kl.mean().item(), free), rel=1e-6)
    with pytest.raises(DpftError, match="balance must be in"):
        cm.kl_balance(mq, sq, mp, sp, balance=1.5)


def test_kl_balance_routes_gradients_by_balance():
    mq, sq = _gauss(4, (5, 4))
    mp, sp = _gauss(5, (5, 4))

    def grads(balance, free=0.0):
        q = mq.clone().requires_grad_(True)
        p = mp.clone().requires_grad_(True)
        loss, _ = cm.kl_balance(q, sq, p, sp, balance=balance, free_nats=free)
        loss.backward()
        return q.grad, p.grad

    kl_full = lambda q, p: kl_divergence(Normal(q, sq), Normal(p, sp)).sum(-1).mean()  # noqa: E731
    q = mq.clone().requires_grad_(True)
    p = mp.clone().requires_grad_(True)
    kl_full(q, p).backward()
    gq, gp = grads(0.8)
    assert torch.allclose(gq, 0.2 * q.grad, atol=1e-6)  # posterior side gets 1 - balance
    assert torch.allclose(gp, 0.8 * p.grad, atol=1e-6)  # prior side gets balance
    gq, gp = grads(1.0)
    assert torch.count_nonzero(gq) == 0 and torch.count_nonzero(gp) > 0
    gq, gp = grads(0.8, free=1e6)  # below free nats: no gradient
    assert torch.count_nonzero(gq) == 0 and torch.count_nonzero(gp) == 0


def test_lambda_returns_hand_values():
    r = torch.tensor([[1.0], [2.0], [3.0]])
    v = torch.tensor([[0.5], [1.0], [1.5], [4.0]])
    g, lam = 0.9, 0.5
    r2 = 3.0 + g * 4.0
    r1 = 2.0 + g * ((1 - lam) * 1.5 + lam * r2)
    r0 = 1.0 + g * ((1 - lam) * 1.0 + lam * r1)
    out = cm.lambda_returns(r, v, g, lam)
    assert out.shape == (3, 1)
    assert torch.allclose(out[:, 0], torch.tensor([r0, r1, r2]), atol=1e-6)
    # lam = 1: discounted Monte Carlo with bootstrap; lam = 0: one-step TD
    mc = cm.lambda_returns(r, v, g, 1.0)[0, 0].item()
    assert mc == pytest.approx(1 + g * 2 + g * g * 3 + g ** 3 * 4.0)
    td = cm.lambda_returns(r, v, g, 0.0)[:, 0]
    assert torch.allclose(td, torch.tensor([1 + g * 1.0, 2 + g * 1.5, 3 + g * 4.0]))
    # per-step discount tensor and T-row values with explicit bootstrap give the same as T+1 rows
    d = torch.full((3, 1), g)
    assert torch.allclose(cm.lambda_returns(r, v[:3], d, lam, bootstrap=v[3]), out)
    # T rows without bootstrap: bootstrap 0 (DreamerV2 default)
    z = cm.lambda_returns(r, v[:3], g, lam)[2, 0].item()
    assert z == pytest.approx(3.0)
    with pytest.raises(DpftError, match="value must have T"):
        cm.lambda_returns(r, v[:2], g, lam)


def test_ensemble_disagreement_fixed_heads():
    # K = 2 heads, 2 latent dims: stds per dim |a - b| / 2
    heads = torch.tensor([[[0.0, 1.0]], [[2.0, 5.0]]])  # (K=2, N=1, S=2)
    u = cm.ensemble_disagreement(heads)
    assert u.shape == (1,)
    assert u.item() == pytest.approx((1.0 + 2.0) / 2)
    # member_dim=-2 layout (N, K, S) gives the same
    assert torch.allclose(cm.ensemble_disagreement(heads.permute(1, 0, 2), member_dim=-2), u)
    same = torch.ones(3, 4, 7)
    assert torch.count_nonzero(cm.ensemble_disagreement(same)) == 0


def test_cmil_reward_both_forms():
    logits = torch.tensor([0.0, 2.0, -1.0])
    u = torch.tensor([0.1, 0.0, 0.2])
    code = cm.cmil_reward(logits, u, alpha=10.0, form="code")
    assert torch.allclose(code, torch.tensor([0.5 - 1.0, 1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(1.0)) - 2.0]))
    paper = cm.cmil_reward(logits, u, alpha=10.0, form="paper")
    d = torch.sigmoid(logits)
    assert torch.allclose(paper, torch.log(d) - torch.log(1 - d) - 10.0 * u, atol=1e-5)
    assert torch.allclose(cm.cmil_reward(d, u, 10.0, "paper", from_probs=True), paper, atol=1e-4)
    assert torch.allclose(cm.cmil_reward(logits.unsqueeze(-1), u, 10.0), code)
    with pytest.raises(DpftError, match="form must be"):
        cm.cmil_reward(logits, u, form="log")


def test_discriminator_loss_seeded_noise_matches_direct_formula():
    w = torch.tensor([[0.3], [-0.2], [0.1]])
    disc = lambda x: x @ w  # noqa: E731
    e = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    p = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    loss, m = cm.discriminator_loss(e, p, disc, sigma=2.5, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    ne = 2.5 * torch.randn(4, 3, generator=g)
    np_ = 2.5 * torch.randn(6, 3, generator=g)
    de = torch.sigmoid(disc(e + ne))
    dp = torch.sigmoid(disc(p + np_))
    want = -torch.log(de).mean() - torch.log(1 - dp).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert m["disc_expert_prob"].item() == pytest.approx(de.mean().item(), rel=1e-5)
    # sigma = 0: no noise
    loss0, _ = cm.discriminator_loss(e, p, disc, sigma=0.0)
    want0 = -torch.log(torch.sigmoid(disc(e))).mean() - torch.log(1 - torch.sigmoid(disc(p))).mean()
    assert loss0.item() == pytest.approx(want0.item(), rel=1e-5)
    with pytest.raises(DpftError, match="same width"):
        cm.discriminator_loss(e, p[:, :2], disc)


def test_pair_state_next_action_and_imagined_reward():
    feat = torch.arange(4.0).reshape(4, 1, 1)  # (H+1=4, N=1, F=1)
    act = 10 + torch.arange(4.0).reshape(4, 1, 1)
    pair = cm.pair_state_next_action(feat, act, time_dim=0)
    assert pair.shape == (3, 1, 2)
    assert pair[:, 0].tolist() == [[0.0, 11.0], [1.0, 12.0], [2.0, 13.0]]
    ens = torch.zeros(4, 1, 2, 1)
    ens[2, 0, 1, 0] = 2.0  # disagreement 1.0 at state 2 -> transition 1 -> 2
    r = cm.imagined_reward(torch.zeros(3, 1), ens, alpha=10.0)
    assert torch.allclose(r[:, 0], torch.tensor([0.5, 0.5 - 10.0, 0.5]))
