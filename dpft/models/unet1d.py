"""1-D temporal UNet denoiser with FiLM conditioning (Diffusion Policy, Chi et al. 2023).

The action chunk ``(B, Ta, Da)`` is treated as a 1-D signal over time with ``Da`` channels. Each residual
block is ``Conv1d -> GroupNorm -> Mish`` twice; between them the block's features are modulated by FiLM
(Perez et al. 2018): ``h = scale(c) * h + bias(c)`` (``cond_predict_scale=True``) or ``h = h + bias(c)``,
where ``c = [time_mlp(SinusoidalPosEmb(t)), cond]``. The encoder halves the time axis between levels
(strided conv) and the decoder doubles it back (transposed conv), concatenating the encoder features of the
same resolution (skip connections), so ``Ta`` must be divisible by ``2 ** (len(down_dims) - 1)``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from dpft.errors import DpftError
from dpft.models.embeddings import SinusoidalPosEmb


class Conv1dBlock(nn.Module):
    """``Conv1d(k, same padding) -> GroupNorm -> Mish``: ``(B, C_in, T) -> (B, C_out, T)``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, n_groups: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
            nn.GroupNorm(n_groups, out_channels),
            nn.Mish(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class FiLMResidualBlock1D(nn.Module):
    """Residual block with FiLM: ``(B, C_in, T), (B, cond_dim) -> (B, C_out, T)``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        cond_dim: int,
        kernel_size: int,
        n_groups: int,
        cond_predict_scale: bool,
    ):
        super().__init__()
        self.block1 = Conv1dBlock(in_channels, out_channels, kernel_size, n_groups)
        self.block2 = Conv1dBlock(out_channels, out_channels, kernel_size, n_groups)
        self.out_channels = out_channels
        self.cond_predict_scale = cond_predict_scale
        film_out = 2 * out_channels if cond_predict_scale else out_channels
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, film_out))
        self.skip = nn.Conv1d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.block1(x)
        film = self.film(c).unsqueeze(-1)  # (B, film_out, 1)
        if self.cond_predict_scale:
            scale, bias = film[:, : self.out_channels], film[:, self.out_channels :]
            h = scale * h + bias
        else:
            h = h + film
        h = self.block2(h)
        return h + self.skip(x)


class ConditionalUnet1D(nn.Module):
    """Epsilon network ``(x (B,Ta,Da), t (B,), cond (B,cond_dim)) -> (B,Ta,Da)``.

    Args:
        action_dim: ``Da`` (input/output channels).
        cond_dim: width of the observation encoding (global condition).
        diffusion_step_embed_dim: width of the timestep embedding (even, >= 4).
        down_dims: channels per resolution level; ``len(down_dims) - 1`` halvings of the time axis.
        kernel_size: odd temporal kernel size.
        n_groups: GroupNorm groups; must divide every entry of ``down_dims``.
        cond_predict_scale: FiLM with scale and bias (True) or bias only.
        horizon_steps: optional ``Ta`` to validate at construction; ``forward`` validates it anyway.
    """

    def __init__(
        self,
        action_dim: int,
        cond_dim: int,
        diffusion_step_embed_dim: int = 64,
        down_dims: Sequence[int] = (64, 128),
        kernel_size: int = 5,
        n_groups: int = 8,
        cond_predict_scale: bool = True,
        horizon_steps: int = 0,
    ):
        super().__init__()
        down_dims = [int(d) for d in down_dims]
        if not down_dims or min(down_dims) < 1:
            raise DpftError("ConditionalUnet1D down_dims must be a non-empty list of positive widths, got {}.".format(
                down_dims
            ))
        if int(kernel_size) < 1 or int(kernel_size) % 2 == 0:
            raise DpftError("ConditionalUnet1D kernel_size must be odd (same-length convolution), got {}.".format(
                kernel_size
            ))
        bad = [d for d in down_dims if d % int(n_groups)]
        if int(n_groups) < 1 or bad:
            raise DpftError(
                "ConditionalUnet1D n_groups = {} must divide every entry of down_dims = {} (GroupNorm).".format(
                    n_groups, down_dims
                )
            )
        self.action_dim = int(action_dim)
        self.cond_dim = int(cond_dim)
        self.down_dims = down_dims
        self.downsample_factor = 2 ** (len(down_dims) - 1)
        if horizon_steps:
            self.check_horizon(int(horizon_steps))
        dsed = int(diffusion_step_embed_dim)
        self.time_mlp = nn.Sequential(
            SinusoidalPosEmb(dsed), nn.Linear(dsed, 4 * dsed), nn.Mish(), nn.Linear(4 * dsed, dsed)
        )
        film_dim = dsed + self.cond_dim
        k, g, s = int(kernel_size), int(n_groups), bool(cond_predict_scale)

        def res(cin: int, cout: int) -> FiLMResidualBlock1D:
            return FiLMResidualBlock1D(cin, cout, film_dim, k, g, s)

        levels = len(down_dims)
        chans = [self.action_dim] + down_dims
        self.down_blocks = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        for i in range(levels):
            self.down_blocks.append(nn.ModuleList([res(chans[i], chans[i + 1]), res(chans[i + 1], chans[i + 1])]))
            if i < levels - 1:
                self.downsamples.append(nn.Conv1d(chans[i + 1], chans[i + 1], 3, stride=2, padding=1))
        mid = down_dims[-1]
        self.mid_blocks = nn.ModuleList([res(mid, mid), res(mid, mid)])
        # Decoder level i (from levels-2 down to 0): upsample level i+1 features, concat skip i, fuse.
        self.upsamples = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for i in reversed(range(levels - 1)):
            self.upsamples.append(nn.ConvTranspose1d(down_dims[i + 1], down_dims[i + 1], 4, stride=2, padding=1))
            self.up_blocks.append(
                nn.ModuleList([res(down_dims[i + 1] + down_dims[i], down_dims[i]), res(down_dims[i], down_dims[i])])
            )
        self.final = nn.Sequential(
            Conv1dBlock(down_dims[0], down_dims[0], k, g), nn.Conv1d(down_dims[0], self.action_dim, 1)
        )

    def check_horizon(self, horizon_steps: int) -> None:
        """Raise :class:`DpftError` unless ``horizon_steps`` is divisible by ``2 ** (len(down_dims) - 1)``."""
        if horizon_steps < 1 or horizon_steps % self.downsample_factor:
            raise DpftError(
                "ConditionalUnet1D: horizon_steps = {} must be a positive multiple of 2 ** (len(down_dims) - 1) "
                "= {} (down_dims = {}); change horizon_steps or use fewer down_dims.".format(
                    horizon_steps, self.downsample_factor, self.down_dims
                )
            )

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``x (B, Ta, Da)``, ``t (B,)`` long, ``cond (B, cond_dim)`` -> epsilon ``(B, Ta, Da)``."""
        self.check_horizon(int(x.shape[1]))
        b = x.shape[0]
        c = torch.cat([self.time_mlp(t), cond.reshape(b, -1)], dim=-1)
        h = x.transpose(1, 2)  # (B, Da, Ta)
        skips = []
        for i, (r1, r2) in enumerate(self.down_blocks):
            h = r2(r1(h, c), c)
            if i < len(self.downsamples):
                skips.append(h)
                h = self.downsamples[i](h)
        for r in self.mid_blocks:
            h = r(h, c)
        for up, (r1, r2) in zip(self.upsamples, self.up_blocks):
            h = torch.cat([up(h), skips.pop()], dim=1)
            h = r2(r1(h, c), c)
        return self.final(h).transpose(1, 2)
