"""dpft.rl.ppo_loss: clip schedule (K'=1, K'=3), denoising discount, clipped loss, value loss, diagnostics."""
from __future__ import annotations

import math

import pytest
import torch

from dpft.errors import DpftError
from dpft.rl.ppo_loss import (
    clip_schedule,
    denoising_discount,
    explained_variance,
    normalize_advantages,
    ppo_policy_loss,
    value_loss,
)


def test_clip_schedule_single_step_is_clip_max_not_nan():
    out = clip_schedule(1, 1e-3, 1e-2)
    assert out.shape == (1,) and out.item() == pytest.approx(1e-2, rel=1e-7)


def test_clip_schedule_three_steps_closed_form():
    out = clip_schedule(3, 1e-3, 1e-2, rate=3.0)
    middle = 1e-3 + 9e-3 * (math.exp(1.5) - 1) / (math.exp(3.0) - 1)  # k = 1 -> t = 1/2
    torch.testing.assert_close(out, torch.tensor([1e-3, middle, 1e-2]), rtol=1e-6, atol=0)
    assert out.dtype == torch.float32


def test_clip_schedule_rate_zero_is_linear_and_equal_coefficients_are_constant():
    torch.testing.assert_close(clip_schedule(5, 0.1, 0.5, rate=0.0), torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5]))
    torch.testing.assert_close(clip_schedule(4, 1e-3, 1e-3), torch.full((4,), 1e-3))
    with pytest.raises(DpftError, match="positive integer, got 0"):
        clip_schedule(0, 1e-3, 1e-2)


def test_denoising_discount_last_step_weight_one():
    torch.testing.assert_close(denoising_discount(3, 0.9), torch.tensor([0.81, 0.9, 1.0]))
    torch.testing.assert_close(denoising_discount(1, 0.5), torch.tensor([1.0]))
    with pytest.raises(DpftError, match="gamma_denoising"):
        denoising_discount(3, 0.0)


def test_ratio_exactly_one_gives_minus_mean_advantage():
    logp = torch.tensor([-1.3, 0.2, -0.7, 1.1], requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5, 3.0])
    loss, info = ppo_policy_loss(logp, logp.detach().clone(), adv, 0.01)
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=0)
    assert info["ratio"].item() == 1.0 and info["approx_kl"].item() == 0.0 and info["clipfrac"].item() == 0.0
    loss.backward()
    torch.testing.assert_close(logp.grad, -adv / 4)  # d/dlogp of -A*exp(logp - old) at ratio 1


def test_policy_loss_hand_values_with_per_element_clip():
    ratios = torch.tensor([1.5, 0.5, 1.1, 0.95], dtype=torch.float64)
    adv = torch.tensor([2.0, -1.0, 1.0, -4.0], dtype=torch.float64)
    clip = torch.tensor([0.2, 0.2, 0.2, 0.01], dtype=torch.float64)
    old = torch.zeros(4, dtype=torch.float64)
    loss, info = ppo_policy_loss(ratios.log(), old, adv, clip)
    # per element max(-A r, -A clip(r)): -2*1.2=-2.4 (clipped); max(0.5, 0.8)=0.8; -1.1 (inside); max(3.8, 3.96)=3.96
    assert loss.item() == pytest.approx((-2.4 + 0.8 - 1.1 + 3.96) / 4, abs=1e-12)
    assert info["clipfrac"].item() == pytest.approx(0.75)  # |r-1| > c for 1.5, 0.5 and 0.95 (c=0.01)
    assert info["ratio"].item() == pytest.approx(ratios.mean().item(), abs=1e-15)
    k3 = ((ratios - 1) - ratios.log()).mean().item()
    assert info["approx_kl"].item() == pytest.approx(k3, abs=1e-15) and k3 > 0
    assert info["old_approx_kl"].item() == pytest.approx(-ratios.log().mean().item(), abs=1e-15)
    assert not any(v.requires_grad for v in info.values())


def test_policy_loss_shape_mismatch_is_an_error():
    with pytest.raises(DpftError, match="same shape"):
        ppo_policy_loss(torch.zeros(3), torch.zeros(4), torch.zeros(3), 0.1)


def test_value_loss_plain_and_clipped_hand_values():
    v = torch.tensor([1.0, 3.0, 0.0])
    ret = torch.tensor([2.0, 2.0, 0.5])
    assert value_loss(v, ret).item() == pytest.approx(0.5 * (1 + 1 + 0.25) / 3)
    old = torch.tensor([0.0, 2.9, 0.0])
    # v_clip = old + clamp(v - old, +-0.5) = [0.5, 3.0, 0.0]; max((v-R)^2, (v_clip-R)^2) = [2.25, 1, 0.25]
    assert value_loss(v, ret, old, clip=0.5).item() == pytest.approx(0.5 * (2.25 + 1 + 0.25) / 3)
    with pytest.raises(DpftError, match="needs old_v"):
        value_loss(v, ret, clip=0.5)


def test_explained_variance_hand_values():
    t = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert explained_variance(t, t) == 1.0
    assert explained_variance(torch.full((4,), 3.0), t) == pytest.approx(0.0)
    assert explained_variance(t - 1.0, t) == pytest.approx(1.0)  # a constant offset is not penalized
    assert explained_variance(-t, t) == pytest.approx(-3.0)  # Var(2t)/Var(t) = 4
    assert math.isnan(explained_variance(t, torch.ones(4)))


def test_normalize_advantages_local_and_global():
    g = torch.Generator().manual_seed(0)
    adv = torch.randn(10, generator=g) * 3 + 2
    out = normalize_advantages(adv)
    torch.testing.assert_close(out, (adv - adv.mean()) / (adv.std() + 1e-8))
    # two "ranks" with halves of different sizes: the SUM all-reduce gives the global statistics on both
    parts = [adv[:3], adv[3:]]
    local = []
    for p in parts:
        normalize_advantages(p, reduce=lambda s: local.append(s.clone()) or s)
    for p, want in zip(parts, (out[:3], out[3:])):
        torch.testing.assert_close(normalize_advantages(p, reduce=lambda s: local[0] + local[1]), want,
                                   rtol=1e-5, atol=1e-6)
    assert normalize_advantages(torch.tensor([5.0])).item() == 0.0
