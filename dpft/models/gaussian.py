"""Chunked Gaussian policy: ``a ~ N(tanh(MLP(cond)), diag(std^2))`` over ``(Ta, Da)`` (DPPO's baseline).

The mean is tanh-bounded (so it lies in the normalized action range). The std is a learned,
state-independent parameter per action dimension, shared over the chunk: ``std = exp(clamp(log_std,
log std_min, log std_max))`` (DPPO's ``learn_fixed_std``: a hard clamp, so ``log_std`` gets no gradient while
it sits outside the bounds). Pretraining minimizes the negative log-likelihood of the demonstrated chunk.
Sampled actions are ``mean + std * clip(z, +-randn_clip_value)`` and are not clamped to [-1, 1] (so their
log-prob is exact for PPO); :class:`dpft.policy.Policy` clamps what it sends to the env.

Log-prob reductions (:meth:`GaussianModel.log_prob`): ``"sum"`` over the executed ``(act_steps, Da)``
elements is the chunk's log-density (CleanRL, ResiP); ``"mean"`` averages them (DPPO's Gaussian PPO, which
then clamps the mean to [-5, 2] in the agent: a per-element geometric-mean ratio, hence its small clip
coefficients); ``"none"`` returns the elements.
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from dpft.errors import DpftError
from dpft.models.mlp import MLP, check_action_chunk
from dpft.models.rand import randn as _randn

_HALF_LOG_2PI = math.log(math.sqrt(2 * math.pi))
_HALF_LOG_2PIE = 0.5 * math.log(2 * math.pi * math.e)
REDUCTIONS = ("sum", "mean", "none")


def normal_log_prob(diff: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-element ``log N(value; loc, std)`` from ``diff = value - loc``: the operations of
    ``torch.distributions.Normal.log_prob`` (so the same numbers) without building a distribution object."""
    return -(diff**2) / (2 * std**2) - std.log() - _HALF_LOG_2PI


def reduce_elements(x: torch.Tensor, reduction: str, act_steps: Optional[int], what: str) -> torch.Tensor:
    """``x (B, Ta, Da)`` -> its first ``act_steps`` steps, summed (``(B,)``), averaged (``(B,)``) or kept."""
    if reduction not in REDUCTIONS:
        raise DpftError("{}: reduction={!r}, expected one of {}.".format(what, reduction, ", ".join(REDUCTIONS)))
    if act_steps is not None:
        if not 1 <= int(act_steps) <= x.shape[1]:
            raise DpftError("{}: act_steps={} must be between 1 and horizon_steps = {}.".format(
                what, act_steps, x.shape[1]))
        x = x[:, : int(act_steps)]
    if reduction == "sum":
        return x.sum(dim=(1, 2))
    if reduction == "mean":
        return x.mean(dim=(1, 2))
    return x


class GaussianDist(NamedTuple):
    """``mean (B, Ta, Da)`` and the state-independent ``std (Da,)``; unpacks as ``mean, std = ...``.

    ``loc``/``scale`` (``scale`` expanded to the mean's shape) and per-element :meth:`log_prob` mirror
    ``torch.distributions.Normal``.
    """

    mean: torch.Tensor
    std: torch.Tensor

    @property
    def loc(self) -> torch.Tensor:
        return self.mean

    @property
    def scale(self) -> torch.Tensor:
        return self.std.expand_as(self.mean)

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        """Per-element log-density ``(B, Ta, Da)``."""
        return normal_log_prob(actions - self.mean, self.std)


class GaussianModel(nn.Module):
    """Gaussian policy over action chunks ``(B, Ta, Da)``.

    Args:
        obs_encoder: observation dict -> ``(B, cond_dim)`` (:class:`~dpft.models.ObsEncoder`).
        action_dim: ``Da``.
        horizon_steps: ``Ta`` (1 = no chunking).
        mlp_dims: hidden widths of the mean MLP (default from ``dpft.config.DEFAULT_MLP_DIMS`` when built by
            :func:`~dpft.models.build_policy_model`).
        std_min, std_max: bounds of the std (``0 < std_min <= std_max``; DPPO fine-tuning: 0.01, 0.2).
        init_std: initial std, within the bounds (DPPO: 0.1; furniture 0.04).
        tanh_mean: squash the mean with tanh.
        activation: hidden activation name.
        randn_clip_value: sampled standard-normal noise clipped to this magnitude (DPPO: 3).
    """

    def __init__(
        self,
        obs_encoder: nn.Module,
        action_dim: int,
        horizon_steps: int = 1,
        mlp_dims: Sequence[int] = (256, 256, 256),
        std_min: float = 0.01,
        std_max: float = 1.0,
        init_std: float = 0.1,
        tanh_mean: bool = True,
        activation: str = "mish",
        randn_clip_value: float = 10.0,
    ):
        super().__init__()
        if int(action_dim) < 1 or int(horizon_steps) < 1:
            raise DpftError(
                "The Gaussian policy needs action_dim >= 1 and horizon_steps >= 1, got {} and {}.".format(
                    action_dim, horizon_steps
                )
            )
        if not 0.0 < float(std_min) <= float(init_std) <= float(std_max):
            raise DpftError(
                "The Gaussian policy's stds must satisfy 0 < std_min <= init_std <= std_max (policy.* when "
                "pretraining, agent.* when fine-tuning); got std_min={}, init_std={}, std_max={}.".format(
                    std_min, init_std, std_max)
            )
        if float(randn_clip_value) <= 0:
            raise DpftError("randn_clip_value must be > 0, got {}.".format(randn_clip_value))
        self.obs_encoder = obs_encoder
        self.action_dim = int(action_dim)
        self.horizon_steps = int(horizon_steps)
        self.tanh_mean = bool(tanh_mean)
        self.randn_clip_value = float(randn_clip_value)
        self.log_std_min = math.log(float(std_min))
        self.log_std_max = math.log(float(std_max))
        cond_dim = int(obs_encoder.cond_dim)
        self.mlp = MLP(
            [cond_dim] + [int(d) for d in mlp_dims] + [self.horizon_steps * self.action_dim], activation=activation
        )
        self.log_std = nn.Parameter(torch.full((self.action_dim,), math.log(float(init_std))))

    def std(self) -> torch.Tensor:
        """Current std ``(Da,)``, within ``[std_min, std_max]``."""
        return self.log_std.clamp(self.log_std_min, self.log_std_max).exp()

    def distribution(
        self,
        obs: Optional[Mapping[str, torch.Tensor]] = None,
        generator: Optional[torch.Generator] = None,
        augment: bool = False,
        cond: Optional[torch.Tensor] = None,
    ) -> GaussianDist:
        """``(mean (B, Ta, Da), std (Da,))`` as a :class:`GaussianDist`; pass ``cond`` to skip encoding."""
        if cond is None:
            if obs is None:
                raise DpftError("GaussianModel.distribution needs obs or cond.")
            cond = self.obs_encoder(obs, generator=generator, augment=augment)
        b = cond.shape[0]
        mean = self.mlp(cond).reshape(b, self.horizon_steps, self.action_dim)
        if self.tanh_mean:
            mean = torch.tanh(mean)
        return GaussianDist(mean, self.std())

    def loss(
        self, batch: Mapping[str, object], generator: Optional[torch.Generator] = None
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Negative log-likelihood per action element (mean over B, Ta, Da) of ``batch["actions"]``.

        Returns ``(nll, {"loss", "nll", "action_mse", "std"})`` (detached 0-dim tensors in the dict;
        ``action_mse`` is the squared error of the mean, ``std`` the mean std).
        """
        if "obs" not in batch or "actions" not in batch:
            raise DpftError("A training batch needs keys 'obs' and 'actions', got {}.".format(sorted(batch)))
        actions = batch["actions"]
        check_action_chunk(self.horizon_steps, self.action_dim, actions, "batch['actions']")
        dist = self.distribution(batch["obs"], generator=generator, augment=self.training)
        nll = -dist.log_prob(actions).mean()
        with torch.no_grad():
            info = {
                "loss": nll.detach(),
                "nll": nll.detach(),
                "action_mse": (dist.mean - actions).pow(2).mean(),
                "std": dist.std.mean(),
            }
        return nll, info

    @torch.no_grad()
    def sample(
        self,
        obs: Optional[Mapping[str, torch.Tensor]],
        deterministic: bool = False,
        generator: Optional[torch.Generator] = None,
        return_chain: bool = False,
        cond: Optional[torch.Tensor] = None,
        num_samples: int = 1,
        return_log_prob: bool = False,
    ):
        """Actions ``(B*num_samples, Ta, Da)``: the mean when ``deterministic``, else ``mean + std * clip(z)``.

        Returns ``(actions, None)`` (no denoising chain; ``return_chain`` is accepted for symmetry with
        :class:`~dpft.diffusion.model.DiffusionModel`), or with ``return_log_prob`` ``(actions, None,
        log_prob (B*num_samples, Ta, Da))`` per element (reduce with :func:`reduce_elements` as
        :meth:`log_prob` does). ``num_samples`` candidates per observation are rows ``i*N .. i*N+N-1``.
        """
        num_samples = int(num_samples)
        if num_samples < 1:
            raise DpftError("num_samples must be >= 1, got {}.".format(num_samples))
        mean, std = self.distribution(obs, cond=cond)
        if num_samples > 1:
            mean = mean.repeat_interleave(num_samples, dim=0)
        if deterministic:
            actions = mean
        else:
            z = _randn(mean.shape, generator, mean.device, mean.dtype).clamp_(
                -self.randn_clip_value, self.randn_clip_value
            )
            actions = mean + std * z
        if not return_log_prob:
            return actions, None
        return actions, None, normal_log_prob(actions - mean, std)

    def log_prob(
        self,
        obs: Optional[Mapping[str, torch.Tensor]],
        actions: torch.Tensor,
        cond: Optional[torch.Tensor] = None,
        reduction: str = "sum",
        act_steps: Optional[int] = None,
    ) -> torch.Tensor:
        """``log pi(actions | obs)`` over the first ``act_steps`` (default all ``Ta``) actions of the chunk.

        ``reduction="sum"`` (default): the log-density of those ``act_steps * Da`` elements, ``(B,)``
        (CleanRL, ResiP); ``"mean"``: their average, ``(B,)`` (DPPO's Gaussian PPO, which clamps it to
        [-5, 2] in the agent); ``"none"``: ``(B, act_steps, Da)``.
        """
        check_action_chunk(self.horizon_steps, self.action_dim, actions, "actions")
        lp = self.distribution(obs, cond=cond).log_prob(actions)
        return reduce_elements(lp, reduction, act_steps, "GaussianModel.log_prob")

    def entropy(self, reduction: str = "sum", act_steps: Optional[int] = None) -> torch.Tensor:
        """Entropy (state-independent, 0-dim): ``"sum"`` over ``act_steps`` (default ``Ta``) steps and ``Da``,
        ``act_steps * sum_d (0.5 log(2 pi e) + log std_d)`` (the chunk's entropy); ``"mean"``: per element,
        ``mean_d (0.5 log(2 pi e) + log std_d)`` (DPPO logs this)."""
        per_dim = _HALF_LOG_2PIE + torch.log(self.std())
        steps = self.horizon_steps if act_steps is None else int(act_steps)
        if not 1 <= steps <= self.horizon_steps:
            raise DpftError("GaussianModel.entropy: act_steps={} must be between 1 and horizon_steps = {}.".format(
                act_steps, self.horizon_steps))
        if reduction == "sum":
            return steps * per_dim.sum()
        if reduction == "mean":
            return per_dim.mean()
        raise DpftError("GaussianModel.entropy: reduction={!r}, expected 'sum' or 'mean'.".format(reduction))
