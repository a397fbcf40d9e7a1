"""PPO losses and diagnostics, including DPPO's per-denoising-step clip schedule and denoising discount.

Conventions: a minibatch is flat ``(B,)`` (DPPO: B (env step, denoising step) pairs; Gaussian PPO: B env
steps). Denoising index ``k`` runs over the fine-tuned steps in sampling order: ``k = 0`` is the noisiest
fine-tuned step, ``k = K' - 1`` the last one (which produces the action), as in DPPO's chains.

Typical DPPO use per minibatch (``k`` = the denoising index of each element, ``(B,)`` long)::

    adv = normalize_advantages(adv_mb) * denoising_discount(K', gamma_denoising)[k]
    loss_pg, info = ppo_policy_loss(new_logp, old_logp, adv, clip_schedule(K', c_base, c_max)[k])
    loss = loss_pg + vf_coef * value_loss(v, returns_mb, old_v, clip_vloss)

The log-probs passed in are already reduced per sample (DPPO: clamped to [-5, 2] and averaged over the
executed ``act_steps x Da`` elements; CleanRL: summed); the reduction belongs to the policy.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple, Union

import torch

from dpft.errors import DpftError

Reduce = Callable[[torch.Tensor], torch.Tensor]
Clip = Union[float, torch.Tensor]


def _check_k(k_ft: int, what: str) -> int:
    if int(k_ft) != k_ft or int(k_ft) < 1:
        raise DpftError("{}: ft_denoising_steps (K') must be a positive integer, got {}.".format(what, k_ft))
    return int(k_ft)


def clip_schedule(k_ft: int, clip_base: float, clip_max: float, rate: float = 3.0,
                  device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """DPPO's per-denoising-step PPO clip coefficient, exponential from ``clip_base`` to ``clip_max``.

    Shape: ``(K',)`` float32, indexed by the denoising index k (0 = noisiest fine-tuned step).

    Formula (DPPO ``model/diffusion/diffusion_ppo.py`` L57-199, ``dppo.md`` 3.5)::

        c_k = c_base + (c_max - c_base) * (exp(rate * k / (K' - 1)) - 1) / (exp(rate) - 1)

    so ``c_0 = c_base`` and ``c_{K'-1} = c_max``. Deviations: ``K' = 1`` gives ``[c_max]`` (DPPO divides by
    ``K' - 1 = 0`` and ends with NaN clip coefficients); ``rate = 0`` gives the linear limit
    ``c_base + (c_max - c_base) * k / (K' - 1)`` instead of 0/0.
    """
    k_ft = _check_k(k_ft, "clip_schedule")
    if not (float(clip_base) > 0 and float(clip_max) > 0):
        raise DpftError("clip_schedule: clip coefficients must be > 0, got clip_base={} clip_max={}.".format(
            clip_base, clip_max))
    if k_ft == 1:
        return torch.full((1,), float(clip_max), device=device)
    frac = torch.arange(k_ft, dtype=torch.float64) / (k_ft - 1)
    if float(rate) == 0.0:
        shape = frac
    else:
        shape = torch.expm1(float(rate) * frac) / math.expm1(float(rate))
    return (float(clip_base) + (float(clip_max) - float(clip_base)) * shape).to(device=device, dtype=torch.float32)


def denoising_discount(k_ft: int, gamma_denoising: float,
                       device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """Advantage weight per denoising index: ``gamma_denoising ** (K' - 1 - k)``, shape ``(K',)`` float32.

    The last denoising step (k = K' - 1) gets weight 1, the noisiest ``gamma_d ** (K' - 1)``. Source: DPPO
    ``diffusion_ppo.py`` (``dppo.md`` 3.5.2; gym/robomimic 0.99, furniture 0.9), computed here once as a
    table instead of DPPO's per-element list comprehension.
    """
    k_ft = _check_k(k_ft, "denoising_discount")
    if not 0.0 < float(gamma_denoising) <= 1.0:
        raise DpftError("denoising_discount: gamma_denoising must lie in (0, 1], got {}.".format(gamma_denoising))
    exponent = torch.arange(k_ft - 1, -1, -1, dtype=torch.float64)
    return (float(gamma_denoising) ** exponent).to(device=device, dtype=torch.float32)


def _check_same(a: torch.Tensor, b: torch.Tensor, names: str, what: str) -> None:
    if a.shape != b.shape:
        raise DpftError("{}: {} must have the same shape, got {} and {}.".format(
            what, names, tuple(a.shape), tuple(b.shape)))


def ppo_policy_loss(new_logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor,
                    clip: Clip) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, arXiv 1707.06347) with diagnostics.

    Shapes: ``new_logp``, ``old_logp``, ``adv`` ``(B,)`` (any equal shape); ``clip`` a float or a tensor
    broadcastable to them (DPPO: ``clip_schedule(...)[k]``, one coefficient per element).

    Formula (CleanRL ``ppo_continuous_action.py``, DPPO ``diffusion_ppo.py``), ``r = exp(new - old)``::

        loss      = mean(max(-A * r, -A * clip(r, 1 - c, 1 + c)))
        approx_kl = mean((r - 1) - log r)              (k3 estimator, >= 0; CleanRL's ``approx_kl``)
        old_approx_kl = mean(-log r)                    (k1, CleanRL's ``old_approx_kl``)
        clipfrac  = mean(|r - 1| > c)
        ratio     = mean(r)

    Returns ``(loss (), info)``; every ``info`` value is a detached 0-d tensor (no host sync here; call
    ``.item()`` when logging). ``old_logp`` and ``adv`` are treated as constants (detached). With
    ``new_logp == old_logp`` (the first minibatch of an iteration) ``r = 1`` exactly and
    ``loss = -mean(A)``.
    """
    _check_same(new_logp, old_logp, "new_logp and old_logp", "ppo_policy_loss")
    _check_same(new_logp, adv, "new_logp and adv", "ppo_policy_loss")
    if isinstance(clip, torch.Tensor):
        clip_t = clip.to(device=new_logp.device, dtype=new_logp.dtype)
    else:
        if not float(clip) > 0:
            raise DpftError("ppo_policy_loss: clip must be > 0, got {}.".format(clip))
        clip_t = torch.tensor(float(clip), device=new_logp.device, dtype=new_logp.dtype)
    old_logp = old_logp.detach()
    adv = adv.detach()
    logratio = new_logp - old_logp
    ratio = logratio.exp()
    clipped = torch.maximum(torch.minimum(ratio, 1.0 + clip_t), 1.0 - clip_t)
    loss = torch.max(-adv * ratio, -adv * clipped).mean()
    with torch.no_grad():
        info = {
            "approx_kl": ((ratio - 1.0) - logratio).mean(),
            "old_approx_kl": (-logratio).mean(),
            "clipfrac": ((ratio - 1.0).abs() > clip_t).to(ratio.dtype).mean(),
            "ratio": ratio.mean(),
        }
    return loss, info


def value_loss(v: torch.Tensor, returns: torch.Tensor, old_v: Optional[torch.Tensor] = None,
               clip: Optional[float] = None) -> torch.Tensor:
    """Critic regression loss, optionally clipped around the rollout's values.

    Shapes: ``v``, ``returns``, ``old_v`` ``(B,)`` (equal shapes); returns a 0-d tensor.

    Formula: ``0.5 * mean((v - R)^2)`` (DPPO, CleanRL with ``clip_vloss=False``). With ``clip`` (CleanRL's
    ``clip_vloss``, DPPO's unused ``clip_vloss_coef``)::

        v_clip = old_v + clamp(v - old_v, -clip, clip)
        loss   = 0.5 * mean(max((v - R)^2, (v_clip - R)^2))

    The 0.5 is kept so ``vf_coef`` means what it means in both references.
    """
    _check_same(v, returns, "v and returns", "value_loss")
    returns = returns.detach()
    err = (v - returns) ** 2
    if clip is None:
        return 0.5 * err.mean()
    if old_v is None:
        raise DpftError("value_loss: value clipping (clip={}) needs old_v, the values computed at rollout time."
                        .format(clip))
    if not float(clip) > 0:
        raise DpftError("value_loss: clip must be > 0 or None, got {}.".format(clip))
    _check_same(v, old_v, "v and old_v", "value_loss")
    old_v = old_v.detach()
    v_clip = old_v + (v - old_v).clamp(-float(clip), float(clip))
    return 0.5 * torch.max(err, (v_clip - returns) ** 2).mean()


def explained_variance(pred: torch.Tensor, target: torch.Tensor) -> float:
    """``1 - Var(target - pred) / Var(target)`` (population variances), a Python float; NaN if Var(target) = 0.

    Shapes: any equal shapes (flattened). 1 = perfect critic, 0 = no better than the mean, < 0 = worse.
    Source: CleanRL (``np.var``; NaN for a constant target), DPPO logs the same of (V_old, R).
    """
    _check_same(pred, target, "pred and target", "explained_variance")
    pred = pred.detach().reshape(-1).to(torch.float64)
    target = target.detach().reshape(-1).to(torch.float64)
    var_t = target.var(unbiased=False)
    if target.numel() == 0 or float(var_t) == 0.0:
        return float("nan")
    return float(1.0 - (target - pred).var(unbiased=False) / var_t)


def normalize_advantages(adv: torch.Tensor, eps: float = 1e-8, reduce: Optional[Reduce] = None) -> torch.Tensor:
    """``(A - mean(A)) / (std(A) + eps)`` over all elements of ``adv``; same shape and dtype.

    ``std`` is the unbiased (n - 1) standard deviation, as ``torch.std`` in CleanRL and DPPO (per
    minibatch in both). With ``reduce`` (an all-reduce SUM over data-parallel ranks, e.g.
    ``lambda t: (dist.all_reduce(t), t)[1]``) mean and std are those of the global batch: ``(n, sum A,
    sum A^2)`` are reduced in float64. Fewer than two elements in total: std is taken as 0 (CleanRL gives
    NaN), so the result is the centred advantage (zero).
    """
    flat = adv.detach().reshape(-1).to(torch.float64)
    stats = torch.stack([torch.tensor(float(flat.numel()), dtype=torch.float64, device=flat.device),
                         flat.sum(), (flat * flat).sum()])
    if reduce is not None:
        stats = reduce(stats)
        n, total, sq = stats[0], stats[1], stats[2]
        mean = total / n.clamp(min=1.0)
        var = ((sq - n * mean * mean) / (n - 1.0).clamp(min=1.0)).clamp(min=0.0)
        std = torch.where(n > 1, var.sqrt(), torch.zeros_like(var))
    else:
        n = flat.numel()
        mean = flat.mean() if n else torch.zeros((), dtype=torch.float64, device=flat.device)
        std = flat.std() if n > 1 else torch.zeros((), dtype=torch.float64, device=flat.device)
    return (adv - mean.to(adv.dtype)) / (std.to(adv.dtype) + eps)
