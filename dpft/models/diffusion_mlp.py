"""DPPO's MLP denoiser: epsilon from the flattened noisy action chunk, the timestep and the condition.

``input = [x.flatten() (Ta*Da), time_mlp(SinusoidalPosEmb(t)) (time_dim), cond (cond_dim)]`` goes through a
:class:`~dpft.models.mlp.ResidualMLP` (``residual_style=True``) or a plain :class:`~dpft.models.mlp.MLP`
and is reshaped to ``(B, Ta, Da)``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from dpft.errors import DpftError
from dpft.models.embeddings import SinusoidalPosEmb
from dpft.models.mlp import MLP, ResidualMLP, make_activation


class DiffusionMLP(nn.Module):
    """Epsilon network ``(x (B,Ta,Da), t (B,), cond (B,cond_dim)) -> (B,Ta,Da)``.

    Args:
        action_dim: ``Da``.
        horizon_steps: ``Ta``.
        cond_dim: width of the observation encoding.
        time_dim: width of the timestep embedding (even, >= 4).
        mlp_dims: hidden widths. With ``residual_style`` they must all be equal and their count odd
            (``1 + 2 * num_blocks``): ``[h, h, h]`` = input layer + one residual block of two layers.
        residual_style: ResidualMLP (True) or plain MLP (False).
        layer_norm: LayerNorm in hidden layers.
        activation: hidden activation name.
    """

    def __init__(
        self,
        action_dim: int,
        horizon_steps: int,
        cond_dim: int,
        time_dim: int = 16,
        mlp_dims: Sequence[int] = (512, 512, 512),
        residual_style: bool = True,
        layer_norm: bool = False,
        activation: str = "mish",
    ):
        super().__init__()
        mlp_dims = [int(d) for d in mlp_dims]
        if int(action_dim) < 1 or int(horizon_steps) < 1 or int(cond_dim) < 0:
            raise DpftError(
                "DiffusionMLP needs action_dim >= 1, horizon_steps >= 1, cond_dim >= 0; got {}, {}, {}.".format(
                    action_dim, horizon_steps, cond_dim
                )
            )
        if not mlp_dims:
            raise DpftError("DiffusionMLP mlp_dims must list at least one hidden width.")
        self.action_dim = int(action_dim)
        self.horizon_steps = int(horizon_steps)
        self.cond_dim = int(cond_dim)
        time_dim = int(time_dim)
        self.time_mlp = nn.Sequential(
            SinusoidalPosEmb(time_dim),
            nn.Linear(time_dim, 2 * time_dim),
            make_activation(activation),
            nn.Linear(2 * time_dim, time_dim),
        )
        in_dim = self.horizon_steps * self.action_dim + time_dim + self.cond_dim
        out_dim = self.horizon_steps * self.action_dim
        if residual_style:
            if len(set(mlp_dims)) != 1 or len(mlp_dims) % 2 == 0:
                raise DpftError(
                    "DiffusionMLP with residual_style=True needs an odd number of equal widths in mlp_dims "
                    "(input layer + 2 layers per residual block, e.g. [512, 512, 512]), got {}.".format(mlp_dims)
                )
            self.mlp = ResidualMLP(
                in_dim, mlp_dims[0], (len(mlp_dims) - 1) // 2, out_dim, activation=activation, layer_norm=layer_norm
            )
        else:
            self.mlp = MLP([in_dim] + mlp_dims + [out_dim], activation=activation, layer_norm=layer_norm)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``x (B, Ta, Da)``, ``t (B,)`` long, ``cond (B, cond_dim)`` -> epsilon ``(B, Ta, Da)``."""
        b = x.shape[0]
        h = torch.cat([x.reshape(b, -1), self.time_mlp(t), cond.reshape(b, -1)], dim=-1)
        return self.mlp(h).reshape(b, self.horizon_steps, self.action_dim)
