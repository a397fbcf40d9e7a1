"""In-memory windowed dataset of demonstrations, vectorized batch sampler and train/valid split.

Windows (DPPO's rule, see docs/design.md). With ``To = cond_steps`` and ``Ta = horizon_steps``, the window
that starts at step ``t`` of an episode of length ``L`` holds

- observations of steps ``t-To+1 .. t`` (the current one last); steps before the episode start are
  padded by repeating the episode's *first* observation;
- actions of steps ``t .. t+Ta-1``.

Only starts ``0 <= t <= L - Ta`` are used, so every action of a window lies inside its episode and no
window ever crosses an episode boundary. Near an episode end nothing is padded: the last window starts at
``L - Ta`` and ends with the episode's final action, so the last ``Ta - 1`` steps of an episode are never the
*current* observation of a window (their actions are still learned as later entries of earlier chunks).
An episode shorter than ``Ta`` contributes no window; when no episode is long enough the dataset raises
DpftError. (diffusion_policy instead pads past the end by repeating the last action; dpft does not, so the
model never learns an artificial "hold still" tail.)

Batches are produced by ONE vectorized gather from contiguous tensors on the dataset's device: a
``(num_windows,)`` tensor of window start rows and one of episode first rows are precomputed; a batch of
window indices becomes ``(B, To)`` observation rows (``start + offset`` clamped to the episode's first row)
and ``(B, Ta)`` action rows. Randomness comes only from the ``torch.Generator`` given to :meth:`sample`::

    {"obs": {"state": float32 (B, To, Do),          # normalized, omitted when there are no low-dim keys
             <image key>: uint8 (B, To, H, W, C)},
     "actions": float32 (B, Ta, Da)}                # normalized

:func:`build_datasets` is the one-call entry point: it splits demos into train/valid (filter keys
``train``/``valid`` when the file has them, else a seeded split by ``valid_ratio``), fits the
:class:`~dpft.normalization.MinMaxNormalizer` on the TRAIN split only and returns both datasets.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from dpft.data.hdf5 import (
    Demos,
    demo_sort_key,
    filter_key_names,
    list_demos,
    load_demos,
    no_samples_error,
    read_filter_keys,
)
from dpft.errors import DpftError
from dpft.normalization import MinMaxNormalizer

Batch = Dict[str, Any]


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise DpftError("%s must be a positive integer, got %r." % (name, value))
    return int(value)


def window_starts(episode_ends: np.ndarray, horizon_steps: int) -> Tuple[np.ndarray, np.ndarray]:
    """Start rows and episode-first rows of every valid window, both int64 ``(num_windows,)``.

    Valid starts of an episode occupying rows ``[s, s + L)`` are ``s .. s + L - horizon_steps``.
    """
    ends = np.asarray(episode_ends, dtype=np.int64).reshape(-1)
    lengths = np.diff(np.concatenate([np.zeros(1, np.int64), ends]))
    counts = np.maximum(lengths - int(horizon_steps) + 1, 0)
    firsts = np.repeat(ends - lengths, counts)
    offsets = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    return (firsts + offsets).astype(np.int64), firsts.astype(np.int64)


class WindowDataset:
    """Windows of ``cond_steps`` observations and ``horizon_steps`` actions over in-memory demos.

    Args:
        demos: loaded :class:`~dpft.data.hdf5.Demos`.
        horizon_steps: Ta, actions per window.
        cond_steps: To, observations per window (current one last).
        normalizer: when given, ``state`` and ``actions`` are stored normalized (it must hold ``"action"``
            with Da features and, when there are low-dim keys, ``"state"`` with Do features).
        device: torch device for every stored tensor (images stay uint8).
    """

    def __init__(
        self,
        demos: Demos,
        horizon_steps: int,
        cond_steps: int,
        normalizer: Optional[MinMaxNormalizer] = None,
        device: Union[str, torch.device] = "cpu",
    ):
        self.horizon_steps = _check_positive_int("horizon_steps", horizon_steps)
        self.cond_steps = _check_positive_int("cond_steps", cond_steps)
        self.device = torch.device(device)
        self.path = demos.path
        self.demo_names = list(demos.demo_names)
        self.low_dim_keys = list(demos.low_dim_keys)
        self.image_keys = list(demos.image_keys)
        self.obs_keys = list(demos.obs_keys) or self.low_dim_keys + self.image_keys
        self.obs_shapes = dict(demos.obs_shapes)
        self.env_args = dict(demos.env_args)
        self.episode_ends = np.asarray(demos.episode_ends, dtype=np.int64).copy()
        self.normalizer = normalizer
        self.obs_dim = int(demos.state.shape[1])
        self.action_dim = int(demos.actions.shape[1])

        starts, firsts = window_starts(self.episode_ends, self.horizon_steps)
        if starts.shape[0] == 0:
            lengths = demos.episode_lengths
            raise DpftError(
                "Every demo%s is shorter than horizon_steps=%d (the longest of the %d demos has %d steps), so "
                "no window of %d actions fits inside an episode. Lower horizon_steps or use longer demos."
                % ((" in '%s'" % self.path) if self.path else "", self.horizon_steps, len(lengths),
                   int(lengths.max()) if len(lengths) else 0, self.horizon_steps)
            )

        state = torch.from_numpy(np.ascontiguousarray(demos.state, dtype=np.float32))
        actions = torch.from_numpy(np.ascontiguousarray(demos.actions, dtype=np.float32))
        if normalizer is not None:
            if "action" not in normalizer or normalizer.dim("action") != self.action_dim:
                raise DpftError(
                    "The normalizer must hold 'action' statistics with %d features (the dataset's action_dim); "
                    "it has keys %s%s." % (self.action_dim, normalizer.keys(),
                                           (" with action dim %d" % normalizer.dim("action"))
                                           if "action" in normalizer else "")
                )
            actions = normalizer.normalize("action", actions)
            if self.obs_dim > 0:
                if "state" not in normalizer or normalizer.dim("state") != self.obs_dim:
                    raise DpftError(
                        "The normalizer must hold 'state' statistics with %d features (obs_dim of keys %s); it "
                        "has keys %s%s." % (self.obs_dim, self.low_dim_keys, normalizer.keys(),
                                            (" with state dim %d" % normalizer.dim("state"))
                                            if "state" in normalizer else "")
                    )
                state = normalizer.normalize("state", state)
        self.state = state.to(self.device).contiguous()  # (N, Do)
        self.actions = actions.to(self.device).contiguous()  # (N, Da)
        self.images = {
            k: torch.from_numpy(np.ascontiguousarray(demos.images[k])).to(self.device).contiguous()
            for k in self.image_keys
        }  # {key: uint8 (N, H, W, C)}
        self._starts = torch.from_numpy(starts).to(self.device)  # (num_windows,)
        self._firsts = torch.from_numpy(firsts).to(self.device)  # (num_windows,)
        self._obs_offsets = torch.arange(-self.cond_steps + 1, 1, dtype=torch.long, device=self.device)  # (To,)
        self._act_offsets = torch.arange(self.horizon_steps, dtype=torch.long, device=self.device)  # (Ta,)

    # ------------------------------------------------------------------ sizes
    def __len__(self) -> int:
        return int(self._starts.shape[0])

    @property
    def num_windows(self) -> int:
        return len(self)

    @property
    def num_samples(self) -> int:
        return int(self.actions.shape[0])

    @property
    def num_demos(self) -> int:
        return int(self.episode_ends.shape[0])

    # ------------------------------------------------------------------ access
    def window_rows(self, indices: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Row indices ``(B, To)`` of the observations and ``(B, Ta)`` of the actions of windows ``indices``."""
        starts = self._starts[indices]
        obs_rows = torch.maximum(starts[:, None] + self._obs_offsets, self._firsts[indices][:, None])
        act_rows = starts[:, None] + self._act_offsets
        return obs_rows, act_rows

    def _gather(self, indices: torch.Tensor) -> Batch:
        obs_rows, act_rows = self.window_rows(indices)
        obs = {}  # type: Dict[str, torch.Tensor]
        if self.obs_dim > 0:
            obs["state"] = self.state[obs_rows]  # (B, To, Do)
        for k in self.image_keys:
            obs[k] = self.images[k][obs_rows]  # (B, To, H, W, C) uint8
        return {"obs": obs, "actions": self.actions[act_rows]}  # actions (B, Ta, Da)

    def get(self, indices: Union[torch.Tensor, np.ndarray, Sequence[int]]) -> Batch:
        """The windows with the given indices (``0 <= i < len(self)``), in that order."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise DpftError(
                "Window index out of range: got indices in [%d, %d] but the dataset has %d windows."
                % (int(idx.min()), int(idx.max()), len(self))
            )
        return self._gather(idx.to(self.device))

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        """``batch_size`` windows drawn uniformly with replacement, using only ``generator``'s randomness."""
        batch_size = _check_positive_int("batch_size", batch_size)
        if not isinstance(generator, torch.Generator):
            raise DpftError("WindowDataset.sample needs a torch.Generator, got %r." % (type(generator).__name__,))
        idx = torch.randint(len(self), (batch_size,), generator=generator, device=generator.device)
        return self._gather(idx.to(self.device))

    def iter_batches(self, batch_size: int) -> Iterator[Batch]:
        """Every window once, in order, in batches of ``batch_size`` (the last one may be smaller)."""
        batch_size = _check_positive_int("batch_size", batch_size)
        n = len(self)
        for lo in range(0, n, batch_size):
            yield self._gather(torch.arange(lo, min(lo + batch_size, n), dtype=torch.long, device=self.device))

    def __repr__(self) -> str:
        return (
            "WindowDataset(%d windows from %d demos / %d samples, horizon_steps=%d, cond_steps=%d, obs_dim=%d, "
            "action_dim=%d, image_keys=%s, normalized=%s, device=%s)"
            % (len(self), self.num_demos, self.num_samples, self.horizon_steps, self.cond_steps, self.obs_dim,
               self.action_dim, self.image_keys, self.normalizer is not None, self.device)
        )


# ---------------------------------------------------------------------------------------------- split
class DemoSplit(NamedTuple):
    """Result of :func:`split_demos`: demo names of each split (numeric order) and where they came from
    (``"filter_keys"`` or ``"ratio"``)."""

    train: List[str]
    valid: List[str]
    source: str


def split_demos(
    demo_names: Sequence[str],
    filter_keys: Optional[Mapping[str, Sequence[str]]] = None,
    train_filter_key: Optional[str] = "train",
    valid_filter_key: Optional[str] = "valid",
    valid_ratio: float = 0.1,
    seed: int = 0,
) -> DemoSplit:
    """Split demos into train/valid, by demo (never by step).

    - If ``train_filter_key`` is in ``filter_keys``: train = its demos; valid = the demos of
      ``valid_filter_key`` when present, else none.
    - Else if only ``valid_filter_key`` is present: valid = its demos, train = all the others.
    - Else a seeded random split: ``round(valid_ratio * E)`` demos (at least 1 and at most E - 1) go to
      valid; ``valid_ratio = 0`` (or a single demo) gives no validation split.

    Raises DpftError for a ratio outside [0, 1), filter keys that overlap or name unknown demos, or an
    empty train split.
    """
    names = sorted(set(str(n) for n in demo_names), key=demo_sort_key)
    if not names:
        raise DpftError("split_demos: there are no demos to split.")
    fk = dict(filter_keys or {})
    known = set(names)
    for key in (train_filter_key, valid_filter_key):
        if key is not None and key in fk:
            unknown = sorted(set(fk[key]) - known)
            if unknown:
                raise DpftError(
                    "Filter key '%s' names demos that are not in the dataset: %s." % (key, unknown[:8])
                )
    has_train = train_filter_key is not None and train_filter_key in fk
    has_valid = valid_filter_key is not None and valid_filter_key in fk
    if has_train or has_valid:
        valid = sorted(set(fk[valid_filter_key]), key=demo_sort_key) if has_valid else []
        if has_train:
            train = sorted(set(fk[train_filter_key]), key=demo_sort_key)
        else:
            vs = set(valid)
            train = [n for n in names if n not in vs]
        overlap = sorted(set(train) & set(valid), key=demo_sort_key)
        if overlap:
            raise DpftError(
                "Filter keys '%s' and '%s' share demos %s; validation demos must not be trained on."
                % (train_filter_key, valid_filter_key, overlap[:8])
            )
        if not train:
            raise DpftError(
                "The train split is empty: filter key '%s' (mask/%s) lists all %s of the file, and pretraining "
                "trains only on the demos outside it. Add demos, remove mask/%s from the file, or pretrain with "
                "data.valid_filter_key=null (data.valid_ratio then holds out a seeded share)."
                % (valid_filter_key, valid_filter_key, "1 demo" if len(names) == 1 else "%d demos" % len(names),
                   valid_filter_key)
            )
        return DemoSplit(train, valid, "filter_keys")

    try:
        ratio = float(valid_ratio)
    except (TypeError, ValueError):
        raise DpftError("valid_ratio must be a number in [0, 1), got %r." % (valid_ratio,)) from None
    if not (0.0 <= ratio < 1.0):
        raise DpftError("valid_ratio must be in [0, 1) (0 = no validation split), got %r." % (valid_ratio,))
    n = len(names)
    n_valid = 0 if (ratio == 0.0 or n < 2) else min(max(1, int(np.floor(ratio * n + 0.5))), n - 1)
    perm = np.random.default_rng(int(seed)).permutation(n)
    valid_set = set(names[i] for i in perm[:n_valid].tolist())
    train = [x for x in names if x not in valid_set]
    valid = [x for x in names if x in valid_set]
    return DemoSplit(train, valid, "ratio")


# ---------------------------------------------------------------------------------------------- entry point
def build_datasets(
    path: Any,
    obs_keys: Sequence[str],
    horizon_steps: int,
    cond_steps: int,
    train_filter_key: Optional[str] = "train",
    valid_filter_key: Optional[str] = "valid",
    valid_ratio: float = 0.1,
    seed: int = 0,
    device: Union[str, torch.device] = "cpu",
) -> Tuple[WindowDataset, Optional[WindowDataset], MinMaxNormalizer, Dict[str, Any]]:
    """Load a robomimic file, split it by demo, fit the normalizer on train and build both datasets.

    Returns ``(train_ds, valid_ds, normalizer, info)``. ``valid_ds`` is None when there are no validation
    demos or none of them is at least ``horizon_steps`` long (``info["warnings"]`` then says so). The
    normalizer holds ``"action"`` and, when low-dim keys are requested, ``"state"``, fitted on every step
    of the TRAIN demos only. ``info`` holds what a checkpoint's metadata needs: ``path``, ``obs_keys``,
    ``low_dim_keys``, ``image_keys``, ``obs_shapes``, ``obs_dim``, ``action_dim``, ``state_slices``,
    ``env_args``, ``horizon_steps``, ``cond_steps``, ``split`` (``"filter_keys"`` or ``"ratio"``),
    ``train_demos``, ``valid_demos``, ``num_train_samples``, ``num_valid_samples``, ``num_train_windows``,
    ``num_valid_windows`` and ``warnings``.
    """
    horizon_steps = _check_positive_int("horizon_steps", horizon_steps)
    cond_steps = _check_positive_int("cond_steps", cond_steps)
    names = list_demos(path)
    present = filter_key_names(path)
    # the default names are used when the file has them; any other name must exist (a typo is an error, not
    # a silent "train on everything")
    for option, key, default in (("data.train_filter_key", train_filter_key, "train"),
                                 ("data.valid_filter_key", valid_filter_key, "valid")):
        if key is not None and key != default and key not in present:
            listed = ("filter keys present: [%s]" % ", ".join(present)) if present else \
                "the file has no filter keys (no 'mask' group)"
            raise DpftError(
                "'%s': %s='%s' is not a filter key of this file; %s. Use one of them, or %s=null to %s."
                % (os.path.expanduser(os.fspath(path)), option, key, listed, option,
                   "train on every demo not used for validation" if default == "train"
                   else "split validation demos by data.valid_ratio"))
    wanted = [k for k in (train_filter_key, valid_filter_key) if k is not None]
    filter_keys = read_filter_keys(path, names=wanted)
    split = split_demos(names, filter_keys, train_filter_key, valid_filter_key, valid_ratio, seed)

    train_demos = load_demos(path, obs_keys, demo_names=split.train)
    if train_demos.num_samples == 0:
        raise no_samples_error(os.path.expanduser(os.fspath(path)), train_demos.demo_names,
                               train_demos.episode_lengths.tolist(),
                               "every demo" if len(split.train) == len(names) else "every training demo")
    arrays = {"action": train_demos.actions}
    if train_demos.obs_dim > 0:
        arrays = {"state": train_demos.state, "action": train_demos.actions}
    normalizer = MinMaxNormalizer.fit(arrays)
    train_ds = WindowDataset(train_demos, horizon_steps, cond_steps, normalizer, device)

    warnings = []  # type: List[str]
    valid_ds = None  # type: Optional[WindowDataset]
    num_valid_samples = 0
    if split.valid:
        valid_demos = load_demos(path, obs_keys, demo_names=split.valid)
        num_valid_samples = valid_demos.num_samples
        if window_starts(valid_demos.episode_ends, horizon_steps)[0].shape[0] == 0:
            warnings.append(
                "all %d validation demos are shorter than horizon_steps=%d; validation is skipped"
                % (len(split.valid), horizon_steps)
            )
        else:
            valid_ds = WindowDataset(valid_demos, horizon_steps, cond_steps, normalizer, device)
    info = {
        "path": train_demos.path,
        "obs_keys": list(train_demos.obs_keys),
        "low_dim_keys": list(train_demos.low_dim_keys),
        "image_keys": list(train_demos.image_keys),
        "obs_shapes": {k: list(v) for k, v in train_demos.obs_shapes.items()},
        "obs_dim": train_demos.obs_dim,
        "action_dim": train_demos.action_dim,
        "state_slices": {k: list(v) for k, v in train_demos.state_slices.items()},
        "env_args": dict(train_demos.env_args),
        "horizon_steps": horizon_steps,
        "cond_steps": cond_steps,
        "split": split.source,
        "train_demos": list(split.train),
        "valid_demos": list(split.valid),
        "num_train_samples": train_demos.num_samples,
        "num_valid_samples": num_valid_samples,
        "num_train_windows": len(train_ds),
        "num_valid_windows": len(valid_ds) if valid_ds is not None else 0,
        "warnings": warnings,
    }
    return train_ds, valid_ds, normalizer, info


__all__ = ["Batch", "DemoSplit", "WindowDataset", "build_datasets", "split_demos", "window_starts"]
