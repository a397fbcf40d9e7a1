"""IDQL's critic losses and candidate selection (Hansen-Estruch et al. 2023, arXiv 2304.10573; DPPO's
``model/diffusion/diffusion_idql.py``), as pure functions on flat batches.

Shapes: a batch of B transitions is ``(B,)``; candidate scores are ``(B, N)`` for N sampled action chunks
per observation, ordered as the sampler returns them with ``num_samples=N`` (obs i's candidates are rows
``i*N .. i*N+N-1`` of the flat ``(B*N, Ta, Da)`` output; :func:`gather_candidates` reads that layout).

One IDQL gradient step on a replay batch (``q_t`` = target twin, ``v`` = ValueNet, ``q`` = TwinQ)::

    with no_grad: u_target = q_t.min_q(obs, chunk)
    loss_v = expectile_loss(u_target - v(obs), tau)                          # V step
    with no_grad: y = twin_q_target(reward, v(next_obs), terminated, gamma)
    loss_q = twin_q_loss(*q(obs, chunk), y)                                  # Q step
    polyak_update(q_t, q, critic_tau)                                        # target step
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from dpft.errors import DpftError

SELECTION_RULES = ("argmax", "expectile", "softmax")


def expectile_loss(diff: torch.Tensor, tau: float) -> torch.Tensor:
    """Asymmetric squared loss of ``diff = min(Q1', Q2')(s, a) - V(s)`` (IQL's expectile regression).

    Shape: ``diff`` any shape; returns a 0-d tensor.

    Formula (Kostrikov et al. 2021, IQL; IDQL; DPPO ``expectile_loss``)::

        L = mean(|tau - 1[diff < 0]| * diff^2)

    so V is pushed up with weight ``tau`` where it lies below Q and down with ``1 - tau`` where it lies
    above; ``tau = 0.5`` is half the MSE. Defaults in the references: DPPO 0.8 (hard-coded), IDQL 0.7
    (locomotion) / 0.9 (AntMaze); here ``tau`` is an argument.
    """
    if not 0.0 < float(tau) < 1.0:
        raise DpftError("expectile_loss: the expectile tau must lie in (0, 1), got {}.".format(tau))
    weight = torch.where(diff < 0, 1.0 - float(tau), float(tau))
    return (weight * diff * diff).mean()


def twin_q_target(reward: torch.Tensor, next_v: torch.Tensor, terminated: torch.Tensor, gamma: float) -> torch.Tensor:
    """Bellman target of both Q heads: ``y = r + gamma * V(s') * (1 - terminated)``, shape ``(B,)``.

    ``next_v`` = V(next_obs) from the online ValueNet under ``no_grad`` (DPPO; IDQL the same with its
    ``mask``). Only termination stops the bootstrap: a truncated transition (time limit) keeps
    ``V(s')`` with ``s'`` the episode's final observation, which is why there is no ``truncated`` argument
    (DPPO's IDQL does the same; CleanRL-style ``done = terminated or truncated`` would be wrong here).
    ``gamma`` is per chunk. The result is detached.
    """
    if reward.shape != next_v.shape or reward.shape != terminated.shape:
        raise DpftError("twin_q_target: reward, next_v and terminated must have the same shape (B,), got {}, {}, {}."
                        .format(tuple(reward.shape), tuple(next_v.shape), tuple(terminated.shape)))
    if not 0.0 <= float(gamma) <= 1.0:
        raise DpftError("twin_q_target: gamma must lie in [0, 1], got {}.".format(gamma))
    alive = 1.0 - terminated.to(device=reward.device).bool().to(reward.dtype)
    return (reward + float(gamma) * next_v.detach().to(reward.dtype) * alive).detach()


def twin_q_loss(q1: torch.Tensor, q2: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean((Q1 - y)^2) + mean((Q2 - y)^2)`` (DPPO ``loss_critic_q``), 0-d; ``y`` detached.

    Shapes: ``(B,)`` each. IDQL's JAX code averages the two heads instead of summing: a factor 2 in the
    gradient, which only rescales the critic learning rate under Adam's normalization.
    """
    target = target.detach()
    return ((q1 - target) ** 2).mean() + ((q2 - target) ** 2).mean()


def select_candidates(q: torch.Tensor, v: Optional[torch.Tensor] = None, rule: str = "argmax",
                      expectile: float = 0.7, temperature: float = 1.0,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Pick one of N candidate chunks per observation from their scores; returns indices ``(B,)`` long.

    Args:
        q: ``(B, N)`` = ``min(Q1', Q2')(s, a_j)`` from the target twin (DPPO and IDQL score with it).
        v: ``(B,)`` = V(s); needed by ``"expectile"``.
        rule:
            - ``"argmax"``: ``argmax_j q`` (IDQL's selection; DPPO at evaluation). Ties take the first.
            - ``"expectile"``: DPPO's training-time re-weighting: weight ``expectile`` where
              ``q_j - v > 0`` else ``1 - expectile`` (DPPO 0.7/0.3, a different number from the 0.8 of the
              V loss), normalized over the N candidates, one draw by ``torch.multinomial``. With every
              candidate on one side of V the draw is uniform.
            - ``"softmax"``: ``p_j = softmax_j((q_j - v) / temperature)`` (= softmax of ``q / temperature``:
              V cancels), one draw; dpft's option (IDQL's unused ``sample_implicit_policy`` /
              ``exp_adv`` weights are ``exp(adv * temperature)``: there ``temperature`` multiplies, here it
              divides, so ``temperature -> 0`` tends to argmax and large values to uniform).
        generator: drives the random draws (its device is used for them; the result is on ``q``'s device).
    """
    if q.dim() != 2 or q.shape[1] < 1:
        raise DpftError("select_candidates: q must be (B, N) with N >= 1 candidate scores, got shape {}."
                        .format(tuple(q.shape)))
    if rule not in SELECTION_RULES:
        raise DpftError("select_candidates: rule must be one of {}, got {!r}.".format(SELECTION_RULES, rule))
    if rule == "argmax":
        return q.argmax(dim=1)
    if rule == "expectile":
        if v is None or tuple(v.shape) != (q.shape[0],):
            raise DpftError("select_candidates: rule 'expectile' needs v of shape ({},), got {}.".format(
                q.shape[0], None if v is None else tuple(v.shape)))
        if not 0.0 < float(expectile) < 1.0:
            raise DpftError("select_candidates: expectile must lie in (0, 1), got {}.".format(expectile))
        weights = torch.where(q - v.to(q.dtype).unsqueeze(1) > 0, float(expectile), 1.0 - float(expectile))
        probs = weights / weights.sum(dim=1, keepdim=True)
    else:
        if not float(temperature) > 0:
            raise DpftError("select_candidates: temperature must be > 0, got {}.".format(temperature))
        probs = torch.softmax(q.to(torch.float64) / float(temperature), dim=1)
    draw_device = q.device if generator is None else generator.device
    return torch.multinomial(probs.to(draw_device), 1, generator=generator).squeeze(1).to(q.device)


def gather_candidates(candidates: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The chosen chunk per observation: ``candidates (B*N, Ta, Da)`` (row-major by obs) or ``(B, N, Ta, Da)``,
    ``index (B,)`` -> ``(B, Ta, Da)``."""
    b = index.shape[0]
    if candidates.dim() == 3:
        if b == 0 or candidates.shape[0] % b:
            raise DpftError("gather_candidates: {} candidate rows do not split into {} observations.".format(
                candidates.shape[0], b))
        candidates = candidates.reshape((b, candidates.shape[0] // b) + tuple(candidates.shape[1:]))
    if candidates.dim() != 4 or candidates.shape[0] != b:
        raise DpftError("gather_candidates: candidates must be (B*N, Ta, Da) or (B, N, Ta, Da) with B={}, got {}."
                        .format(b, tuple(candidates.shape)))
    return candidates[torch.arange(b, device=candidates.device), index.to(candidates.device)]


def candidate_scores(q_min: torch.Tensor, batch: int) -> Tuple[torch.Tensor, int]:
    """Reshape flat scores ``(B*N,)`` (row-major by obs) to ``(B, N)``; returns ``(scores, N)``."""
    if q_min.dim() != 1 or batch < 1 or q_min.shape[0] % batch:
        raise DpftError("candidate_scores: {} scores do not split into {} observations.".format(
            tuple(q_min.shape), batch))
    n = q_min.shape[0] // batch
    return q_min.reshape(batch, n), n
