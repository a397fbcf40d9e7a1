"""Chunked Gaussian policy: ``a ~ N(tanh(MLP(cond)), diag(std^2))`` over ``(Ta, Da)`` (DPPO's baseline).

The mean is tanh-bounded (so it lies in the normalized action range); the std is a learned,
state-independent parameter per action dimension (shared over the chunk), ``std = exp(clamp(log_std,
log std_min, log std_max))``. Pretraining minimizes the negative log-likelihood of the demonstrated chunk.
Sampled actions are ``mean + std * clip(z, +-randn_clip_value)`` and are not clamped to [-1, 1] (so their
log-prob is exact for PPO); environment adapters clip to the action space.
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.distributions import Normal

from dpft.errors import DpftError
from dpft.models.mlp import check_action_chunk
from dpft.models.mlp import MLP


def _randn(shape: Sequence[int], generator: Optional[torch.Generator], device, dtype=torch.float32) -> torch.Tensor:
    """Standard normal drawn on the generator's device (a CPU generator can drive a GPU model)."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype).to(device)


class GaussianModel(nn.Module):
    """Gaussian policy over action chunks ``(B, Ta, Da)``.

    Args:
        obs_encoder: observation dict -> ``(B, cond_dim)`` (:class:`~dpft.models.ObsEncoder`).
        action_dim: ``Da``.
        horizon_steps: ``Ta`` (1 = no chunking).
        mlp_dims: hidden widths of the mean MLP.
        std_min, std_max: bounds of the std (``0 < std_min <= std_max``).
        init_std: initial std, within the bounds.
        tanh_mean: squash the mean with tanh.
        activation: hidden activation name.
        randn_clip_value: sampled standard-normal noise clipped to this magnitude.
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
                "GaussianModel needs action_dim >= 1 and horizon_steps >= 1, got {} and {}.".format(
                    action_dim, horizon_steps
                )
            )
        if not 0.0 < float(std_min) <= float(init_std) <= float(std_max):
            raise DpftError(
                "GaussianModel needs 0 < std_min <= init_std <= std_max, got std_min={}, init_std={}, "
                "std_max={}.".format(std_min, init_std, std_max)
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
        obs: Mapping[str, torch.Tensor],
        generator: Optional[torch.Generator] = None,
        augment: bool = False,
        cond: Optional[torch.Tensor] = None,
    ) -> Normal:
        """``Normal`` with ``loc`` and ``scale`` of shape ``(B, Ta, Da)``; pass ``cond`` to skip encoding."""
        if cond is None:
            cond = self.obs_encoder(obs, generator=generator, augment=augment)
        b = cond.shape[0]
        mean = self.mlp(cond).reshape(b, self.horizon_steps, self.action_dim)
        if self.tanh_mean:
            mean = torch.tanh(mean)
        return Normal(mean, self.std().expand_as(mean))

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
                "action_mse": (dist.loc - actions).pow(2).mean(),
                "std": self.std().mean(),
            }
        return nll, info

    @torch.no_grad()
    def sample(
        self,
        obs: Mapping[str, torch.Tensor],
        deterministic: bool = False,
        generator: Optional[torch.Generator] = None,
        return_chain: bool = False,
    ) -> Tuple[torch.Tensor, None]:
        """Actions ``(B, Ta, Da)``: the mean when ``deterministic``, else ``mean + std * clip(z)``.

        Returns ``(actions, None)`` (no denoising chain; ``return_chain`` is accepted for API symmetry
        with :class:`~dpft.diffusion.model.DiffusionModel`).
        """
        dist = self.distribution(obs)
        if deterministic:
            return dist.loc, None
        z = _randn(dist.loc.shape, generator, dist.loc.device, dist.loc.dtype).clamp_(
            -self.randn_clip_value, self.randn_clip_value
        )
        return dist.loc + dist.scale * z, None

    def log_prob(
        self, obs: Mapping[str, torch.Tensor], actions: torch.Tensor, cond: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """``log pi(actions | obs)`` summed over ``(Ta, Da)``: ``(B,)``."""
        check_action_chunk(self.horizon_steps, self.action_dim, actions, "actions")
        return self.distribution(obs, cond=cond).log_prob(actions).sum(dim=(1, 2))

    def entropy(self) -> torch.Tensor:
        """Entropy of one chunk (state-independent): ``Ta * sum_d (0.5 log(2 pi e) + log std_d)``."""
        return self.horizon_steps * (0.5 * math.log(2 * math.pi * math.e) + torch.log(self.std())).sum()
