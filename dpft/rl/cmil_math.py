"""CMIL math (Kolev et al., conservative model-based imitation learning) as pure tensor functions.

Sources: the paper (eqs. 8-10) and the reference TF2 code ``victorkolev/cmil`` (DreamerV2-based), as read in
``/work/shared/reference/inril_resip_furniture_cmil.md`` section 5. Where the two differ the function
offers both and names the default:

- :func:`kl_balance`: DreamerV2's ``EnsembleRSSM.kl_loss`` with ``forward=False`` (CMIL keeps DreamerV2's
  defaults: balance 0.8, free 1.0, ``free_avg=True``).
- :func:`lambda_returns`: DreamerV2's ``common.lambda_return`` (time-major, bootstraps at the end).
- :func:`ensemble_disagreement`: the reference's ``ensemble_mean.std(-2).mean(-1)`` (population std).
- :func:`cmil_reward`: ``form="code"`` = ``D - alpha * u`` with ``D = sigmoid(logit)`` (the reference code,
  ``unc_penalty = -10``); ``form="paper"`` = ``log D - log(1 - D) - alpha * u`` (eq. 10) = ``logit - alpha * u``.
- :func:`discriminator_loss`: BCE of eq. 8 with Gaussian instance noise on expert and policy inputs (no
  gradient penalty: the reference's default ``wgan: False`` uses none).

Shapes use B batch, T time, N flattened batch, H horizon, K ensemble members, S latent dims.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple, Union

import torch
from torch.nn import functional as F

from dpft.errors import DpftError
from dpft.models.rand import randn as _randn


def gaussian_kl(mean_q: torch.Tensor, std_q: torch.Tensor, mean_p: torch.Tensor, std_p: torch.Tensor) -> torch.Tensor:
    """KL(q || p) of diagonal Gaussians, summed over the last dim: ``(..., S) -> (...)``.

    ``sum_i log(std_p/std_q) + (std_q^2 + (mean_q - mean_p)^2) / (2 std_p^2) - 1/2`` (closed form).
    """
    var_q = std_q.pow(2)
    var_p = std_p.pow(2)
    kl = torch.log(std_p) - torch.log(std_q) + (var_q + (mean_q - mean_p).pow(2)) / (2.0 * var_p) - 0.5
    return kl.sum(-1)


def kl_balance(
    post_mean: torch.Tensor,
    post_std: torch.Tensor,
    prior_mean: torch.Tensor,
    prior_std: torch.Tensor,
    balance: float = 0.8,
    free_nats: float = 1.0,
    free_avg: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """DreamerV2 KL balancing with free nats. Inputs ``(..., S)``; returns ``(loss 0-d, kl (...))``.

    With ``sg`` = stop-gradient and KLs summed over S::

        prior_side = KL(sg(post) || prior)      # trains the prior (dynamics)
        post_side  = KL(post || sg(prior))      # trains the posterior (representation)
        free_avg=True  (DreamerV2 default):  loss = balance * max(mean(prior_side), free)
                                                   + (1 - balance) * max(mean(post_side), free)
        free_avg=False:                      max(., free) per element, then the mean

    This is ``kl_loss(post, prior, forward=False, balance, free, free_avg)`` of DreamerV2: there
    ``mix = 1 - balance`` weights ``KL(post || sg(prior))``. Note ``max(mean, free)`` clips the *batch
    mean*: below ``free`` nats no gradient flows at all. ``kl`` is ``KL(post || prior)`` per element
    (detached from nothing; it is ``post_side``'s value), for logging.
    """
    if not 0.0 <= float(balance) <= 1.0:
        raise DpftError("kl_balance: balance must be in [0, 1], got {}.".format(balance))
    prior_side = gaussian_kl(post_mean.detach(), post_std.detach(), prior_mean, prior_std)
    post_side = gaussian_kl(post_mean, post_std, prior_mean.detach(), prior_std.detach())
    free = float(free_nats)
    if free_avg:
        loss_prior = torch.clamp(prior_side.mean(), min=free)
        loss_post = torch.clamp(post_side.mean(), min=free)
    else:
        loss_prior = torch.clamp(prior_side, min=free).mean()
        loss_post = torch.clamp(post_side, min=free).mean()
    loss = float(balance) * loss_prior + (1.0 - float(balance)) * loss_post
    return loss, post_side


def lambda_returns(
    reward: torch.Tensor,
    value: torch.Tensor,
    discount: Union[torch.Tensor, float],
    lam: float,
    bootstrap: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """TD(lambda) targets, DreamerV2's ``lambda_return`` on time-major tensors. Returns ``(T, B)``.

    Args:
        reward: ``(T, B)``, ``r_t`` of the transition from state t.
        value: ``(T + 1, B)`` = ``V(s_0..s_T)`` (the last row is the bootstrap, as DreamerV2's
            ``target()`` passes ``value[:-1]`` and ``bootstrap=value[-1]``), or ``(T, B)`` = ``V(s_0..s_{T-1})``
            with the final bootstrap given by ``bootstrap`` (zeros when ``None``, DreamerV2's default).
        discount: ``(T, B)`` or a float, ``d_t`` multiplying what follows step t.
        lam: lambda (1 = discounted Monte Carlo with bootstrap, 0 = one-step TD).

    Recursion::

        R_t = r_t + d_t * ((1 - lam) * V_{t+1} + lam * R_{t+1}),   R_T = V_T = bootstrap
    """
    if reward.dim() < 1:
        raise DpftError("lambda_returns: reward must be time-major (T, ...), got a 0-d tensor.")
    t_len = reward.shape[0]
    if value.shape[0] == t_len + 1:
        if bootstrap is not None:
            raise DpftError("lambda_returns: value has T + 1 rows (its last row is the bootstrap); do not pass "
                            "bootstrap as well.")
        boot = value[-1]
        values = value[:-1]
    elif value.shape[0] == t_len:
        values = value
        boot = torch.zeros_like(value[-1]) if bootstrap is None else bootstrap
    else:
        raise DpftError("lambda_returns: value must have T + 1 = {} or T = {} rows, got shape {}.".format(
            t_len + 1, t_len, tuple(value.shape)))
    if tuple(values.shape) != tuple(reward.shape):
        raise DpftError("lambda_returns: reward {} and value rows {} must have the same shape.".format(
            tuple(reward.shape), tuple(values.shape)))
    if not torch.is_tensor(discount):
        discount = torch.full_like(reward, float(discount))
    next_values = torch.cat([values[1:], boot.unsqueeze(0)], 0)
    inputs = reward + discount * next_values * (1.0 - lam)
    out = []
    last = boot
    for t in range(t_len - 1, -1, -1):
        last = inputs[t] + discount[t] * lam * last
        out.append(last)
    return torch.stack(out[::-1], 0)


def ensemble_disagreement(head_means: torch.Tensor, member_dim: int = 0) -> torch.Tensor:
    """Std over ensemble members of the prior means, averaged over latent dims.

    ``head_means`` has the members on ``member_dim`` and the latent dims last, e.g. ``(K, ..., S)`` with
    ``member_dim=0`` or the RSSM's ``ens_mean`` ``(H + 1, N, K, S)`` with ``member_dim=-2``. Returns the shape
    without those two dims. Population std (``unbiased=False``), as ``tf.math.reduce_std`` in the reference.
    """
    nd = head_means.dim()
    dim = member_dim % nd
    if dim == nd - 1:
        raise DpftError("ensemble_disagreement: member_dim must not be the last (latent) dim.")
    return head_means.std(dim=dim, unbiased=False).mean(-1)


def cmil_reward(
    disc_logits: torch.Tensor,
    disagreement: torch.Tensor,
    alpha: float = 10.0,
    form: str = "code",
    from_probs: bool = False,
) -> torch.Tensor:
    """CMIL reward from discriminator outputs and ensemble disagreement ``u`` (same shapes).

    - ``form="code"`` (default, the reference code): ``D - alpha * u`` with ``D = sigmoid(logit)``, the
      Bernoulli mean (``policy_d.mean() + unc_penalty * disag``, ``unc_penalty = -alpha = -10``).
    - ``form="paper"`` (eq. 10): ``log D - log(1 - D) - alpha * u``, computed as ``logit - alpha * u``
      (the same value, without the log of a probability near 0 or 1).

    ``from_probs=True`` takes probabilities D in (0, 1) instead of logits (clamped to [1e-6, 1 - 1e-6]
    for the paper form).
    """
    if form not in ("code", "paper"):
        raise DpftError("cmil_reward: form must be 'code' or 'paper', got {!r}.".format(form))
    if disc_logits.dim() and disc_logits.shape[-1] == 1 and disc_logits.dim() == disagreement.dim() + 1:
        disc_logits = disc_logits.squeeze(-1)
    if from_probs:
        probs = disc_logits
        logits = torch.logit(probs.clamp(1e-6, 1.0 - 1e-6))
    else:
        logits = disc_logits
        probs = torch.sigmoid(disc_logits)
    base = probs if form == "code" else logits
    return base - float(alpha) * disagreement


def add_instance_noise(x: torch.Tensor, sigma: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``x + sigma * N(0, 1)`` (``sigma`` is the std; the reference's ``discriminator_noise`` is 2.5 —
    the paper writes sigma^2 = 2.5, we follow the code value as a std)."""
    if float(sigma) == 0.0:
        return x
    return x + float(sigma) * _randn(x.shape, generator, x.device, x.dtype)


def discriminator_loss(
    expert_inputs: torch.Tensor,
    policy_inputs: torch.Tensor,
    disc: Callable[[torch.Tensor], torch.Tensor],
    sigma: float = 2.5,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Eq. 8 with instance noise: ``-mean log D(e + n_e) - mean log(1 - D(p + n_p))``.

    Inputs ``(..., F + A)`` (state feature and the action taken from it, see :func:`pair_state_next_action`);
    ``disc`` returns logits ``(..., 1)`` or ``(...)``. The expert noise is drawn before the policy noise from
    ``generator``. Each side is averaged over its own samples, then the two means are summed. No gradient
    penalty (the reference uses none with ``wgan: False``). Returns ``(loss, metrics)`` with detached 0-d
    tensors ``disc_loss``, ``disc_expert_prob``, ``disc_policy_prob``, ``disc_expert_acc``, ``disc_policy_acc``.
    """
    if expert_inputs.shape[-1] != policy_inputs.shape[-1]:
        raise DpftError("discriminator_loss: expert and policy inputs must have the same width, got {} and {}.".format(
            expert_inputs.shape[-1], policy_inputs.shape[-1]))
    e = add_instance_noise(expert_inputs, sigma, generator)
    p = add_instance_noise(policy_inputs, sigma, generator)
    le = disc(e)
    lp = disc(p)
    loss_e = F.binary_cross_entropy_with_logits(le, torch.ones_like(le))
    loss_p = F.binary_cross_entropy_with_logits(lp, torch.zeros_like(lp))
    loss = loss_e + loss_p
    with torch.no_grad():
        metrics = {
            "disc_loss": loss.detach(),
            "disc_expert_prob": torch.sigmoid(le).mean(),
            "disc_policy_prob": torch.sigmoid(lp).mean(),
            "disc_expert_acc": (le > 0).float().mean(),
            "disc_policy_acc": (lp < 0).float().mean(),
        }
    return loss, metrics


def pair_state_next_action(feat: torch.Tensor, action: torch.Tensor, time_dim: int = 0) -> torch.Tensor:
    """``cat(feat_t, action_{t+1})`` along the last dim for ``t = 0 .. T-2`` (the reference discriminator input).

    With DreamerV2's alignment ``action[t]`` led *to* state t, so ``action[t + 1]`` is the action taken
    *from* state t. ``time_dim=0`` for imagined seqs ``(H + 1, N, .)``, ``1`` for posteriors ``(B, T, .)``.
    Returns ``(..., T - 1, ..., F + A)``.
    """
    t = feat.shape[time_dim]
    if action.shape[time_dim] != t:
        raise DpftError("pair_state_next_action: feat and action need the same time length, got {} and {}.".format(
            t, action.shape[time_dim]))
    f = feat.narrow(time_dim, 0, t - 1)
    a = action.narrow(time_dim, 1, t - 1)
    return torch.cat([f, a], -1)


def imagined_reward(
    disc_logits: torch.Tensor, ens_mean: torch.Tensor, alpha: float = 10.0, form: str = "code"
) -> torch.Tensor:
    """Reward of each imagined transition ``t -> t + 1``: ``(H, N)``.

    ``disc_logits`` ``(H, N)`` or ``(H, N, 1)`` = D on ``pair_state_next_action(seq["feat"], seq["action"])``;
    ``ens_mean`` ``(H + 1, N, K, S)`` = ``seq["ens_mean"]``; the disagreement of the prior that produced
    state ``t + 1`` is used (the reference's ``disag_rew[1:]``).
    """
    u = ensemble_disagreement(ens_mean, member_dim=-2)[1:]
    return cmil_reward(disc_logits, u, alpha=alpha, form=form)


__all__ = [
    "add_instance_noise",
    "cmil_reward",
    "discriminator_loss",
    "ensemble_disagreement",
    "gaussian_kl",
    "imagined_reward",
    "kl_balance",
    "lambda_returns",
    "pair_state_next_action",
]
