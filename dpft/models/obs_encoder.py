"""Observation encoder: the policy's observation dict -> one flat conditioning vector ``(B, cond_dim)``.

Input (see docs/design.md)::

    obs["state"]      float32 (B, To, Do)      normalized low-dim vector (absent when Do = 0)
    obs[<image key>]  uint8   (B, To, H, W, C) one entry per camera

The state history is flattened to ``(B, To * Do)`` and, when ``cond_mlp_dims`` is given, passed through an
MLP (DPPO's ``cond_mlp_dims``). Each camera has its own :class:`~dpft.models.vision.ConvEncoder` applied
per frame (``image_feature_dim`` per frame), with DrQ random shifts when ``augment=True``. The parts are
concatenated in the order: state, then the image keys in the given order.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from dpft.errors import DpftError
from dpft.models.mlp import MLP
from dpft.models.vision import ConvEncoder


class ObsEncoder(nn.Module):
    """Encode ``{"state": (B,To,Do), <img>: (B,To,H,W,C)}`` into ``(B, cond_dim)``.

    Args:
        obs_shapes: per-key shape of ONE observation; image keys map to ``(H, W, C)``. Other keys
            (e.g. the low-dim keys that make up ``state``) are ignored here.
        low_dim_dim: ``Do``, width of ``obs["state"]`` (0 for image-only policies).
        cond_steps: ``To``, observations in the history window.
        image_keys: the camera keys, in order.
        image_feature_dim: features per camera per frame.
        cond_mlp_dims: optional hidden+output widths of an MLP applied to the flattened state.
        random_shift_pad: DrQ pad for training augmentation (0 disables it).

    Attribute ``cond_dim``: width of the output.
    """

    def __init__(
        self,
        obs_shapes: Mapping[str, Sequence[int]],
        low_dim_dim: int,
        cond_steps: int,
        image_keys: Sequence[str],
        image_feature_dim: int = 64,
        cond_mlp_dims: Optional[Sequence[int]] = None,
        random_shift_pad: int = 4,
    ):
        super().__init__()
        if int(cond_steps) < 1:
            raise DpftError("ObsEncoder cond_steps must be >= 1, got {}.".format(cond_steps))
        if int(low_dim_dim) < 0:
            raise DpftError("ObsEncoder low_dim_dim must be >= 0, got {}.".format(low_dim_dim))
        self.cond_steps = int(cond_steps)
        self.low_dim_dim = int(low_dim_dim)
        self.image_keys: List[str] = [str(k) for k in image_keys]
        if "state" in self.image_keys:
            raise DpftError("'state' is reserved for the low-dim vector and cannot be an image key.")
        self.image_shapes: Dict[str, tuple] = {}
        for key in self.image_keys:
            if key not in obs_shapes:
                raise DpftError(
                    "Image key {!r} has no entry in obs_shapes (known keys: {}); expected its (H, W, C).".format(
                        key, ", ".join(sorted(obs_shapes)) or "none"
                    )
                )
            shape = tuple(int(s) for s in obs_shapes[key])
            if len(shape) != 3:
                raise DpftError(
                    "obs_shapes[{!r}] = {} is not an image shape; expected (H, W, C).".format(key, shape)
                )
            self.image_shapes[key] = shape
        state_flat = self.cond_steps * self.low_dim_dim
        self.state_mlp: Optional[MLP] = None
        state_out = state_flat
        if cond_mlp_dims:
            if state_flat == 0:
                raise DpftError("cond_mlp_dims is set but the policy has no low-dim state (low_dim_dim = 0).")
            dims = [state_flat] + [int(d) for d in cond_mlp_dims]
            self.state_mlp = MLP(dims, activation="mish")
            state_out = dims[-1]
        self.image_encoders = nn.ModuleDict(
            {
                key: ConvEncoder(self.image_shapes[key], image_feature_dim, random_shift_pad=random_shift_pad)
                for key in self.image_keys
            }
        )
        self.image_feature_dim = int(image_feature_dim)
        self.cond_dim = state_out + len(self.image_keys) * self.cond_steps * self.image_feature_dim
        if self.cond_dim == 0:
            raise DpftError("ObsEncoder has nothing to encode: low_dim_dim is 0 and there are no image keys.")

    def _check(self, obs: Mapping[str, torch.Tensor]) -> int:
        if not isinstance(obs, Mapping):
            raise DpftError("The observation must be a dict of tensors, got {}.".format(type(obs).__name__))
        keys = (["state"] if self.low_dim_dim > 0 else []) + self.image_keys
        batch = None
        for key in keys:
            if key not in obs:
                raise DpftError(
                    "Observation key {!r} is missing; the encoder expects keys {} (got {}).".format(
                        key, keys, sorted(obs)
                    )
                )
            x = obs[key]
            if key == "state":
                want = (self.cond_steps, self.low_dim_dim)
                ok = x.dim() == 3 and tuple(x.shape[1:]) == want and x.is_floating_point()
                expected = "float (B, {}, {})".format(*want)
            else:
                want = (self.cond_steps,) + self.image_shapes[key]
                ok = x.dim() == 5 and tuple(x.shape[1:]) == want and x.dtype == torch.uint8
                expected = "uint8 (B, {}, {}, {}, {})".format(*want)
            if not ok:
                raise DpftError(
                    "Observation {!r} has dtype {} and shape {}; expected {} (To = cond_steps).".format(
                        key, x.dtype, tuple(x.shape), expected
                    )
                )
            if batch is None:
                batch = int(x.shape[0])
            elif int(x.shape[0]) != batch:
                raise DpftError(
                    "Observation {!r} has batch size {} but an earlier key has {}.".format(key, x.shape[0], batch)
                )
        return int(batch)

    def forward(
        self,
        obs: Mapping[str, torch.Tensor],
        generator: Optional[torch.Generator] = None,
        augment: bool = False,
    ) -> torch.Tensor:
        """Observation dict -> ``(B, cond_dim)``; ``augment`` applies random shifts to images."""
        b = self._check(obs)
        parts = []
        if self.low_dim_dim > 0:
            state = obs["state"].reshape(b, -1).to(torch.float32)
            parts.append(self.state_mlp(state) if self.state_mlp is not None else state)
        for key in self.image_keys:
            feat = self.image_encoders[key](obs[key], generator=generator, augment=augment)  # (B, To, F)
            parts.append(feat.reshape(b, -1))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
