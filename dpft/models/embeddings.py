"""Sinusoidal embedding of the diffusion timestep (Transformer position encoding applied to ``t``)."""
from __future__ import annotations

import math

import torch
from torch import nn

from dpft.errors import DpftError


class SinusoidalPosEmb(nn.Module):
    """``t (B,) -> (B, dim)``: ``[sin(t * f_i), cos(t * f_i)]`` with ``f_i = 10000^(-i / (dim/2 - 1))``.

    ``dim`` must be even and at least 4 (so the frequency ladder has two ends). No parameters.
    """

    def __init__(self, dim: int):
        super().__init__()
        dim = int(dim)
        if dim < 4 or dim % 2:
            raise DpftError("SinusoidalPosEmb dim must be an even integer >= 4, got {}.".format(dim))
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """``t``: ``(B,)`` integer or float timesteps -> ``(B, dim)`` float32."""
        half = self.dim // 2
        scale = math.log(10000.0) / (half - 1)
        freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * -scale)
        args = t.to(torch.float32).reshape(-1, 1) * freqs.reshape(1, -1)
        return torch.cat([args.sin(), args.cos()], dim=-1)
