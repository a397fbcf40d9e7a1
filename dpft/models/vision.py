"""Small convolutional image encoder and DrQ random-shift augmentation (no torchvision).

Images arrive as robomimic stores them: uint8 ``(..., H, W, C)``. :func:`images_to_float` maps them to
float ``(..., C, H, W)`` in ``[-1, 1]``. :class:`RandomShiftsAug` is DrQ's augmentation (Kostrikov et al.
2020): pad each image by ``pad`` pixels replicating the border, then crop back to ``(H, W)`` at a random
integer offset in ``[0, 2 * pad]`` per sample. :class:`ConvEncoder` is 4 conv layers (32 channels, the first
with stride 2) with GroupNorm (no BatchNorm, so EMA weights and batch size 1 behave), Mish, then a spatial
soft-argmax (Levine et al. 2016) giving 2 coordinates per channel, and a Linear to ``feature_dim``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from dpft.errors import DpftError
from dpft.models.rand import randint as _randint


def images_to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(..., H, W, C)`` -> float32 ``(..., C, H, W)`` in ``[-1, 1]`` (``x / 127.5 - 1``)."""
    x = images.to(torch.float32) / 127.5 - 1.0
    return x.movedim(-1, -3)


class RandomShiftsAug(nn.Module):
    """DrQ random shift: replicate-pad by ``pad`` then crop ``(H, W)`` at a random integer offset.

    Shapes: ``(N, C, H, W) -> (N, C, H, W)``; all channels of one sample share one offset (so stacked
    frames stay aligned). Randomness comes only from ``generator``. The module always shifts when
    called; callers apply it in training only.
    """

    def __init__(self, pad: int = 4):
        super().__init__()
        if int(pad) < 0:
            raise DpftError("RandomShiftsAug pad must be >= 0, got {}.".format(pad))
        self.pad = int(pad)

    def forward(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if self.pad == 0:
            return x
        n, c, h, w = x.shape
        p = self.pad
        padded = F.pad(x, (p, p, p, p), mode="replicate")
        shifts = _randint(2 * p + 1, (n, 2), generator, x.device)
        rows = shifts[:, 0:1] + torch.arange(h, device=x.device).unsqueeze(0)  # (N, H)
        cols = shifts[:, 1:2] + torch.arange(w, device=x.device).unsqueeze(0)  # (N, W)
        batch = torch.arange(n, device=x.device).reshape(n, 1, 1)
        # Advanced indices separated by a slice go first: result is (N, H, W, C).
        out = padded[batch, :, rows.unsqueeze(2), cols.unsqueeze(1)]
        return out.permute(0, 3, 1, 2).contiguous()


class SpatialSoftmax(nn.Module):
    """Soft-argmax keypoints: ``(N, C, h, w) -> (N, 2C)`` expected (x, y) in ``[-1, 1]`` per channel.

    The softmax temperature is learned (log-parametrized, initialised to 1).
    """

    def __init__(self):
        super().__init__()
        self.log_temperature = nn.Parameter(torch.zeros(()))

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        n, c, h, w = feat.shape
        attn = torch.softmax(feat.reshape(n, c, h * w) / self.log_temperature.exp(), dim=-1)
        ys = torch.linspace(-1.0, 1.0, h, device=feat.device, dtype=feat.dtype)
        xs = torch.linspace(-1.0, 1.0, w, device=feat.device, dtype=feat.dtype)
        grid_y = ys.reshape(h, 1).expand(h, w).reshape(1, 1, h * w)
        grid_x = xs.reshape(1, w).expand(h, w).reshape(1, 1, h * w)
        ex = (attn * grid_x).sum(-1)
        ey = (attn * grid_y).sum(-1)
        return torch.cat([ex, ey], dim=-1)


class ConvEncoder(nn.Module):
    """Images uint8 ``(..., H, W, C)`` -> features ``(..., feature_dim)``.

    Leading dims are ``(N,)`` or ``(B, T)``; with ``(B, T)`` the T frames of a sample share one random
    shift. Augmentation runs only when ``augment=True`` (the training loss passes ``self.training``).

    Args:
        image_shape: ``(H, W, C)`` of one image; H and W at least 8.
        feature_dim: output width.
        channels: conv width (32).
        num_layers: conv layers (4; the first has stride 2).
        n_groups: GroupNorm groups (must divide ``channels``).
        random_shift_pad: DrQ pad in pixels (0 disables the augmentation).
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        feature_dim: int = 64,
        channels: int = 32,
        num_layers: int = 4,
        n_groups: int = 8,
        random_shift_pad: int = 4,
    ):
        super().__init__()
        shape = tuple(int(s) for s in image_shape)
        if len(shape) != 3:
            raise DpftError(
                "ConvEncoder image_shape must be (H, W, C) as robomimic stores images, got {}.".format(shape)
            )
        h, w, c = shape
        if h < 8 or w < 8 or c < 1:
            raise DpftError(
                "ConvEncoder needs images of at least 8x8 pixels with >= 1 channel, got (H, W, C) = {}.".format(
                    shape
                )
            )
        if int(num_layers) < 1 or int(channels) % int(n_groups):
            raise DpftError(
                "ConvEncoder: num_layers must be >= 1 and n_groups ({}) must divide channels ({}).".format(
                    n_groups, channels
                )
            )
        if int(feature_dim) < 1:
            raise DpftError("ConvEncoder feature_dim must be >= 1, got {}.".format(feature_dim))
        self.image_shape = shape
        self.feature_dim = int(feature_dim)
        layers = []
        in_ch = c
        for i in range(int(num_layers)):
            layers += [
                nn.Conv2d(in_ch, int(channels), kernel_size=3, stride=2 if i == 0 else 1, padding=1),
                nn.GroupNorm(int(n_groups), int(channels)),
                nn.Mish(),
            ]
            in_ch = int(channels)
        self.convs = nn.Sequential(*layers)
        self.pool = SpatialSoftmax()
        self.proj = nn.Linear(2 * int(channels), self.feature_dim)
        self.aug = RandomShiftsAug(random_shift_pad)

    def forward(
        self, images: torch.Tensor, generator: Optional[torch.Generator] = None, augment: bool = False
    ) -> torch.Tensor:
        """uint8 ``(N, H, W, C)`` or ``(B, T, H, W, C)`` -> float ``(N, F)`` or ``(B, T, F)``."""
        if images.dim() not in (4, 5) or tuple(images.shape[-3:]) != self.image_shape:
            raise DpftError(
                "ConvEncoder expected images of shape (N, H, W, C) or (B, T, H, W, C) with (H, W, C) = {}, "
                "got {}.".format(self.image_shape, tuple(images.shape))
            )
        lead = tuple(images.shape[:-3])
        h, w, c = self.image_shape
        x = images_to_float(images)  # (..., C, H, W)
        if augment:
            b = lead[0]
            x = self.aug(x.reshape(b, -1, h, w), generator)  # one shift per sample, shared over T
        x = x.reshape(-1, c, h, w)
        feat = self.proj(self.pool(self.convs(x)))
        return feat.reshape(*lead, self.feature_dim)
