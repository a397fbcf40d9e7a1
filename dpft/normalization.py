"""Min-max normalization of low-dim observations and actions to [-1, 1].

:class:`MinMaxNormalizer` holds per-key ``min`` / ``max`` vectors (the keys dpft uses are ``"state"`` for
the concatenated low-dim observation and ``"action"``). For a feature dimension with range
``r = max - min``::

    x_n = (x - mid) * 2 / r        with mid = (min + max) / 2

which is computed as ``(x - min) / (r / 2) - 1`` so that the fitted ``min`` and ``max`` map to exactly -1
and 1 in floating point (and every fitted value lands inside [-1, 1], with no clipping). A dimension whose
range is below ``1e-6`` (a constant feature) gets scale 1 instead: ``x_n = x - mid``, so the constant maps
to 0 and nothing is divided by a tiny number. :meth:`~MinMaxNormalizer.unnormalize` maps a constant
dimension back to its constant whatever the normalized value: a dimension that never varied in the data
(e.g. the rotation of a translation-only expert) is never driven by what a model predicts for it.

Both ``normalize`` and ``unnormalize`` take numpy arrays or torch tensors with any leading dimensions; the
last dimension is the feature dimension (``(N, D)``, ``(B, To, Do)``, ``(B, Ta, Da)`` ...). Floating inputs
keep their dtype (and device); integer inputs are computed in float32.

The statistics travel inside checkpoints as safetensors: :meth:`MinMaxNormalizer.state_dict` returns flat
float32 tensors ``{"state.min": (Do,), "state.max": (Do,), "action.min": (Da,), "action.max": (Da,)}`` and
:meth:`MinMaxNormalizer.from_state_dict` rebuilds an identical normalizer from them.

Example::

    norm = MinMaxNormalizer.fit({"state": demos.state, "action": demos.actions})
    a_n = norm.normalize("action", actions)          # numpy or torch, (..., Da)
    a = norm.unnormalize("action", a_n)
    safetensors.torch.save_file(norm.state_dict(), "normalizer.safetensors")
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Tuple, Union

import numpy as np
import torch

from dpft.errors import DpftError

#: dimensions whose fitted range is below this get scale 1 (they map to ``x - mid``)
MIN_RANGE = 1e-6

ArrayLike = Union[np.ndarray, torch.Tensor]


class MinMaxNormalizer:
    """Per-key min-max normalizer to [-1, 1] with constant-dimension safety.

    Args:
        stats: ``{key: (min (D,), max (D,))}``; values are stored as float32 vectors.
    """

    def __init__(self, stats: Mapping[str, Tuple[ArrayLike, ArrayLike]]):
        if not stats:
            raise DpftError("MinMaxNormalizer needs statistics for at least one key (e.g. 'state', 'action').")
        self._min = {}  # type: Dict[str, np.ndarray]
        self._max = {}  # type: Dict[str, np.ndarray]
        for key, pair in stats.items():
            _check_key_name(key)
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise DpftError(
                    "MinMaxNormalizer statistics for key '%s' must be a (min, max) pair of vectors, got %r."
                    % (key, type(pair).__name__)
                )
            lo = _to_numpy(pair[0]).astype(np.float32)
            hi = _to_numpy(pair[1]).astype(np.float32)
            if lo.ndim != 1 or hi.ndim != 1 or lo.shape != hi.shape or lo.shape[0] == 0:
                raise DpftError(
                    "MinMaxNormalizer statistics for key '%s' must be two non-empty 1-D vectors of the same "
                    "length, got min shape %s and max shape %s." % (key, tuple(lo.shape), tuple(hi.shape))
                )
            if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
                raise DpftError(
                    "MinMaxNormalizer statistics for key '%s' contain NaN or Inf (min=%s, max=%s); the data "
                    "they were fitted on is broken." % (key, lo.tolist(), hi.tolist())
                )
            if np.any(lo > hi):
                bad = np.nonzero(lo > hi)[0].tolist()
                raise DpftError(
                    "MinMaxNormalizer statistics for key '%s' have min > max in dimensions %s." % (key, bad)
                )
            self._min[key] = lo
            self._max[key] = hi
        # per (key, kind, dtype, device) cache of the affine coefficients
        self._cache = {}  # type: Dict[tuple, Tuple]

    # ------------------------------------------------------------------ construction
    @classmethod
    def fit(cls, arrays: Mapping[str, ArrayLike]) -> "MinMaxNormalizer":
        """Fit per-dimension min/max on ``{key: (..., D)}`` arrays (numpy or torch; leading dims flattened).

        Raises DpftError on an empty array, a 0-d array, or NaN/Inf values (naming the key and dimension).
        """
        if not arrays:
            raise DpftError("MinMaxNormalizer.fit needs at least one array, e.g. {'state': ..., 'action': ...}.")
        stats = {}
        for key, value in arrays.items():
            _check_key_name(key)
            x = _to_numpy(value)
            if x.ndim == 0:
                raise DpftError(
                    "MinMaxNormalizer.fit: array for key '%s' is a scalar; expected shape (..., D)." % key
                )
            flat = x.reshape(-1, x.shape[-1]) if x.shape[-1] > 0 else x.reshape(0, 0)
            if flat.shape[0] == 0 or flat.shape[1] == 0:
                raise DpftError(
                    "MinMaxNormalizer.fit: array for key '%s' is empty (shape %s); need at least one sample "
                    "with at least one feature." % (key, tuple(x.shape))
                )
            flat = flat.astype(np.float64, copy=False)
            finite = np.isfinite(flat)
            if not finite.all():
                row, dim = np.argwhere(~finite)[0]
                raise DpftError(
                    "MinMaxNormalizer.fit: array for key '%s' contains NaN or Inf (first at row %d, "
                    "dimension %d, value %r); clean the data before fitting." % (key, row, dim, flat[row, dim])
                )
            stats[key] = (flat.min(axis=0), flat.max(axis=0))
        return cls(stats)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, ArrayLike]) -> "MinMaxNormalizer":
        """Rebuild from :meth:`state_dict` output (e.g. ``safetensors.torch.load_file(...)``)."""
        pairs = {}  # type: Dict[str, Dict[str, ArrayLike]]
        for name, value in state.items():
            key, dot, stat = str(name).rpartition(".")
            if not dot or stat not in ("min", "max") or not key:
                raise DpftError(
                    "Normalizer state has an unexpected entry '%s'; expected entries named '<key>.min' and "
                    "'<key>.max' (e.g. 'state.min', 'action.max')." % name
                )
            pairs.setdefault(key, {})[stat] = value
        if not pairs:
            raise DpftError("Normalizer state is empty; expected entries like 'state.min', 'state.max'.")
        stats = {}
        for key in pairs:
            missing = [s for s in ("min", "max") if s not in pairs[key]]
            if missing:
                raise DpftError(
                    "Normalizer state for key '%s' lacks '%s.%s'; both '<key>.min' and '<key>.max' are needed."
                    % (key, key, missing[0])
                )
            stats[key] = (pairs[key]["min"], pairs[key]["max"])
        return cls(stats)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Flat float32 tensors ``{"<key>.min": (D,), "<key>.max": (D,)}`` (safetensors-ready)."""
        out = {}
        for key in self._min:
            out[key + ".min"] = torch.from_numpy(self._min[key].copy())
            out[key + ".max"] = torch.from_numpy(self._max[key].copy())
        return out

    # ------------------------------------------------------------------ queries
    def keys(self) -> List[str]:
        """The keys with statistics, in insertion order."""
        return list(self._min.keys())

    def __contains__(self, key: object) -> bool:
        return key in self._min

    def dim(self, key: str) -> int:
        """Feature dimension D of ``key``."""
        self._check_known(key)
        return int(self._min[key].shape[0])

    def min(self, key: str) -> np.ndarray:
        """Fitted per-dimension minimum of ``key`` (float32 copy)."""
        self._check_known(key)
        return self._min[key].copy()

    def max(self, key: str) -> np.ndarray:
        """Fitted per-dimension maximum of ``key`` (float32 copy)."""
        self._check_known(key)
        return self._max[key].copy()

    def constant_dims(self, key: str) -> np.ndarray:
        """Indices of the dimensions of ``key`` whose range is below ``MIN_RANGE`` (they get scale 1)."""
        self._check_known(key)
        return np.nonzero(self._constant_mask(key))[0]

    def __repr__(self) -> str:
        parts = []
        for key in self._min:
            parts.append(
                "%s: dim=%d, min=%s, max=%s"
                % (key, self._min[key].shape[0], np.array2string(self._min[key], precision=4),
                   np.array2string(self._max[key], precision=4))
            )
        return "MinMaxNormalizer(" + "; ".join(parts) + ")"

    # ------------------------------------------------------------------ transforms
    def normalize(self, key: str, x: ArrayLike) -> ArrayLike:
        """Map raw ``x (..., D)`` to the normalized space (fitted data -> [-1, 1])."""
        offset, half_range, shift = self._coeffs(key, x)
        return (self._as_float(x) - offset) / half_range - shift

    def unnormalize(self, key: str, x: ArrayLike) -> ArrayLike:
        """Inverse of :meth:`normalize` for ``x (..., D)``; constant dimensions return their constant."""
        offset, half_range, shift = self._coeffs(key, x)
        out = (self._as_float(x) + shift) * half_range + offset
        const = self._constant_mask(key)
        if const.any():
            if isinstance(out, torch.Tensor):
                out = torch.where(torch.as_tensor(const, device=out.device), offset.expand_as(out), out)
            else:
                out = np.where(const, np.broadcast_to(offset, out.shape), out).astype(out.dtype, copy=False)
        return out

    # ------------------------------------------------------------------ internals
    def _check_known(self, key: str) -> None:
        if key not in self._min:
            raise DpftError(
                "MinMaxNormalizer has no statistics for key '%s'; known keys: %s." % (key, self.keys())
            )

    def _constant_mask(self, key: str) -> np.ndarray:
        rng = self._max[key].astype(np.float64) - self._min[key].astype(np.float64)
        return rng < MIN_RANGE

    @staticmethod
    def _as_float(x: ArrayLike) -> ArrayLike:
        if isinstance(x, torch.Tensor):
            return x if x.is_floating_point() else x.to(torch.float32)
        x = np.asarray(x)
        return x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float32)

    def _coeffs(self, key: str, x: ArrayLike) -> Tuple:
        """(offset, half_range, shift) in x's float dtype / device so that x_n = (x - offset)/half_range - shift.

        Normal dims: offset=min, half_range=(max-min)/2 computed in x's dtype, shift=1 (so min->-1, max->1
        exactly). Constant dims: offset=mid, half_range=1, shift=0.
        """
        self._check_known(key)
        dim = self._min[key].shape[0]
        is_torch = isinstance(x, torch.Tensor)
        shape = tuple(x.shape) if is_torch else np.shape(x)
        if len(shape) == 0 or shape[-1] != dim:
            raise DpftError(
                "MinMaxNormalizer key '%s' has %d features but the input has shape %s; the last dimension "
                "must be %d." % (key, dim, tuple(shape), dim)
            )
        if is_torch:
            dtype = x.dtype if x.is_floating_point() else torch.float32
            cache_key = (key, "torch", dtype, x.device)
        else:
            xd = np.asarray(x).dtype
            dtype = xd if np.issubdtype(xd, np.floating) else np.dtype(np.float32)
            cache_key = (key, "numpy", np.dtype(dtype).str, None)
        hit = self._cache.get(cache_key)
        if hit is not None:
            return hit
        const = self._constant_mask(key)
        if is_torch:
            lo = torch.as_tensor(self._min[key], device=x.device).to(dtype)
            hi = torch.as_tensor(self._max[key], device=x.device).to(dtype)
            cmask = torch.as_tensor(const, device=x.device)
            mid = (lo + hi) / 2
            offset = torch.where(cmask, mid, lo)
            half = torch.where(cmask, torch.ones_like(lo), (hi - lo) / 2)
            shift = torch.where(cmask, torch.zeros_like(lo), torch.ones_like(lo))
        else:
            lo = self._min[key].astype(dtype)
            hi = self._max[key].astype(dtype)
            mid = (lo + hi) / dtype.type(2)
            offset = np.where(const, mid, lo).astype(dtype)
            half = np.where(const, dtype.type(1), (hi - lo) / dtype.type(2)).astype(dtype)
            shift = np.where(const, dtype.type(0), dtype.type(1)).astype(dtype)
        out = (offset, half, shift)
        self._cache[cache_key] = out
        return out


def _check_key_name(key: object) -> None:
    if not isinstance(key, str) or not key or "." in key:
        raise DpftError(
            "MinMaxNormalizer key %r is invalid; keys are non-empty strings without '.', e.g. 'state', "
            "'action'." % (key,)
        )


def _to_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


__all__ = ["MinMaxNormalizer", "MIN_RANGE"]
