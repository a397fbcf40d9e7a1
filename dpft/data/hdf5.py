"""Read and validate robomimic HDF5 demonstration files.

Layout (as robomimic / robosuite tools write it)::

    data                      group; attrs["total"] (int), attrs["env_args"] (JSON string)
      demo_<i>                one group per trajectory (sorted numerically: demo_2 before demo_10)
        actions     (T, Da)
        obs/<key>   (T, ...)  low-dim vectors (T, d) / (T,), or uint8 images (T, H, W, C)
        rewards (T,), dones (T,), states (T, S), next_obs/<key>   optional
    mask                      optional group of filter keys
      <filter_key>            array of demo-name bytes, e.g. mask/train, mask/valid

Public functions:

- :func:`open_robomimic` opens a file read-only after checking it exists, is HDF5, has a ``data`` group
  and at least one ``demo_<i>`` group.
- :func:`describe` validates the whole file and returns a summary dict; :func:`format_description`
  renders it for ``dpft data info FILE``.
- :func:`load_demos` (alias :func:`load_hdf5`) loads the requested observation keys of all demos (or of a
  filter key / explicit list) into contiguous in-memory arrays (:class:`Demos`).
- :func:`list_demos`, :func:`read_filter_keys`, :func:`read_env_args` read the index parts alone.

An observation key is an *image key* when its dataset is uint8 with three per-step dimensions
``(H, W, C)``; it is a *low-dim key* when it has at most one per-step dimension (``(T,)`` datasets
count as one feature). Anything else (e.g. float depth maps) cannot be used as a policy input.

Every problem a user can cause raises :class:`dpft.errors.DpftError` naming the file, demo and key.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import h5py
import numpy as np

from dpft.errors import DpftError

_DEMO_RE = re.compile(r"^demo_(\d+)$")
_OPTIONAL_PER_DEMO = ("rewards", "dones", "states", "next_obs")
_ENV_TYPES = {1: "robosuite", 2: "gym", 3: "ig_momart"}


# ----------------------------------------------------------------------------------------------- helpers
def _fmt_path(path: Any) -> str:
    return os.path.expanduser(os.fspath(path))


def _short_list(names: Sequence[str], limit: int = 8) -> str:
    names = list(names)
    if len(names) <= limit:
        return ", ".join(names)
    return "%s ... (%d more)" % (", ".join(names[:limit]), len(names) - limit)


def _decode(x: Any) -> str:
    if isinstance(x, (bytes, np.bytes_)):
        return bytes(x).decode("utf-8")
    return str(x)


def demo_sort_key(name: str) -> int:
    """Numeric sort key of a ``demo_<i>`` name (``demo_2`` sorts before ``demo_10``)."""
    m = _DEMO_RE.match(name)
    if m is None:
        raise DpftError("'%s' is not a robomimic demo name; expected 'demo_<integer>'." % name)
    return int(m.group(1))


def _demo_names_in(data: h5py.Group) -> List[str]:
    names = [k for k in data.keys() if _DEMO_RE.match(k) and isinstance(data[k], h5py.Group)]
    return sorted(names, key=demo_sort_key)


def _kind(shape: Tuple[int, ...], dtype: np.dtype) -> str:
    """'image', 'low_dim' or 'other' for a per-step shape and dtype."""
    if dtype == np.uint8 and len(shape) == 3:
        return "image"
    if len(shape) <= 1 and (np.issubdtype(dtype, np.number) or dtype == np.bool_):
        return "low_dim"
    return "other"


def _check_is_dataset(obj: Any, path: str, where: str) -> h5py.Dataset:
    if not isinstance(obj, h5py.Dataset):
        raise DpftError("'%s': %s is a group, expected a dataset." % (path, where))
    return obj


def _first_nonfinite(x: np.ndarray) -> Optional[Tuple[int, int, str]]:
    """(row, column, 'NaN'|'Inf') of the first non-finite entry of a 2-D float array, or None."""
    if not np.issubdtype(x.dtype, np.floating):
        return None
    bad = ~np.isfinite(x)
    if not bad.any():
        return None
    row, col = np.argwhere(bad)[0]
    return int(row), int(col), ("NaN" if np.isnan(x[row, col]) else "Inf")


def check_image_layout(path: str, key: str, demo: str, shape: Tuple[int, ...]) -> None:
    """The same error in ``dpft data info`` and pretraining for an image key dpft cannot read: channels-first
    ``(C, H, W)`` or smaller than 8x8 pixels."""
    if len(shape) != 3:
        return
    h, w, c = shape
    if h in (1, 3, 4) and c > 4:
        raise DpftError(
            "'%s': obs key '%s' holds uint8 images of per-step shape %s in data/%s, which looks channels-first "
            "(C, H, W); dpft reads images as (H, W, C), the layout robomimic stores. Transpose the dataset "
            "(numpy: x.transpose(0, 2, 3, 1))." % (path, key, shape, demo))
    if h < 8 or w < 8 or c < 1:
        raise DpftError(
            "'%s': obs key '%s' holds uint8 images of per-step shape %s (H, W, C) in data/%s; the image encoder "
            "needs at least 8x8 pixels and one channel." % (path, key, shape, demo))


def no_samples_error(path: str, names: Sequence[str], lengths: Sequence[int], what: str = "every demo") -> DpftError:
    """The same error in ``dpft data info`` and pretraining when the demos used hold no step at all."""
    shown = ", ".join("%s: %d steps" % (n, int(t)) for n, t in list(zip(names, lengths))[:4])
    return DpftError("'%s': %s has 0 steps (%s%s); there is nothing to train on. Every robomimic demo needs at "
                     "least one step of actions and observations." % (path, what, shown, " ..." if len(names) > 4 else ""))


# ----------------------------------------------------------------------------------------------- opening
def open_robomimic(path: Any) -> h5py.File:
    """Open a robomimic HDF5 file read-only, after checking it is one.

    Raises DpftError when the file is missing, is not HDF5, has no ``data`` group, or holds no
    ``data/demo_<i>`` groups. The returned ``h5py.File`` is a context manager.
    """
    p = _fmt_path(path)
    if not os.path.exists(p):
        raise DpftError(
            "Dataset file '%s' does not exist. Expected a robomimic HDF5 file (data/demo_<i>/obs/<key>, "
            "data/demo_<i>/actions); check the path." % p
        )
    if os.path.isdir(p):
        raise DpftError("Dataset path '%s' is a directory; expected a robomimic HDF5 file." % p)
    if not h5py.is_hdf5(p):
        raise DpftError(
            "'%s' is not an HDF5 file (no HDF5 signature). Expected a robomimic HDF5 dataset as written by "
            "robomimic/robosuite tools." % p
        )
    try:
        f = h5py.File(p, "r")
    except OSError as e:
        raise DpftError("Cannot open HDF5 file '%s': %s." % (p, e)) from None
    try:
        if "data" not in f or not isinstance(f["data"], h5py.Group):
            raise DpftError(
                "'%s' has no 'data' group; robomimic files keep demonstrations under data/demo_<i>. "
                "Top-level entries found: [%s]." % (p, _short_list(list(f.keys())))
            )
        if not _demo_names_in(f["data"]):
            raise DpftError(
                "'%s': the 'data' group holds no demo_<i> groups (entries found: [%s]); expected one group "
                "per demonstration named demo_0, demo_1, ..." % (p, _short_list(list(f["data"].keys())))
            )
    except BaseException:
        f.close()
        raise
    return f


def list_demos(path: Any) -> List[str]:
    """Demo names of the file, sorted numerically."""
    with open_robomimic(path) as f:
        return _demo_names_in(f["data"])


def _parse_env_args(f: h5py.File, path: str) -> Optional[Dict[str, Any]]:
    attrs = f["data"].attrs
    if "env_args" not in attrs:
        return None
    raw = attrs["env_args"]
    if isinstance(raw, np.ndarray) and raw.shape == ():
        raw = raw[()]
    text = _decode(raw)
    try:
        value = json.loads(text)
    except ValueError as e:
        snippet = text if len(text) <= 80 else text[:77] + "..."
        raise DpftError(
            "'%s': data.attrs['env_args'] is not valid JSON (%s); robomimic stores a JSON object with "
            "env_name, type and env_kwargs. Value starts with: %r" % (path, e, snippet)
        ) from None
    if not isinstance(value, dict):
        raise DpftError(
            "'%s': data.attrs['env_args'] is JSON but not an object (got %s); expected "
            "{\"env_name\": ..., \"type\": ..., \"env_kwargs\": {...}}." % (path, type(value).__name__)
        )
    return value


def read_env_args(path: Any) -> Dict[str, Any]:
    """``json.loads(data.attrs["env_args"])`` ({} when absent); DpftError when it is not a JSON object."""
    p = _fmt_path(path)
    with open_robomimic(p) as f:
        return _parse_env_args(f, p) or {}


def _filter_key_names(f: h5py.File) -> List[str]:
    if "mask" not in f or not isinstance(f["mask"], h5py.Group):
        return []
    return sorted(k for k in f["mask"].keys() if isinstance(f["mask"][k], h5py.Dataset))


def filter_key_names(path: Any) -> List[str]:
    """Names of the file's filter keys (``mask/<name>`` datasets), sorted; [] when none."""
    with open_robomimic(_fmt_path(path)) as f:
        return _filter_key_names(f)


def _read_filter_key(f: h5py.File, path: str, key: str, demo_set: Iterable[str]) -> List[str]:
    available = _filter_key_names(f)
    if key not in available:
        if available:
            raise DpftError(
                "'%s': filter key '%s' not found; filter keys in this file: [%s]." % (path, key, ", ".join(available))
            )
        raise DpftError(
            "'%s': filter key '%s' not found; the file has no filter keys (no 'mask' group). Create them "
            "with robomimic's split_train_val.py or leave the filter key unset." % (path, key)
        )
    raw = np.atleast_1d(f["mask"][key][()])
    names = [_decode(x) for x in raw.reshape(-1).tolist()]
    if not names:
        raise DpftError(
            "'%s': filter key '%s' (mask/%s) lists no demos; it must name at least one demo_<i>."
            % (path, key, key)
        )
    demo_set = set(demo_set)
    unknown = sorted(set(n for n in names if n not in demo_set))
    if unknown:
        raise DpftError(
            "'%s': filter key '%s' names demos that are not in data/: [%s]." % (path, key, _short_list(unknown))
        )
    return sorted(set(names), key=demo_sort_key)


def read_filter_keys(path: Any, names: Optional[Sequence[str]] = None) -> Dict[str, List[str]]:
    """Filter keys of the file, ``{name: [demo names sorted numerically]}`` ({} when none).

    With ``names``, only those filter keys are read (the ones absent from the file are skipped).
    Raises DpftError for an empty filter key or one naming demos absent from ``data/``.
    """
    p = _fmt_path(path)
    with open_robomimic(p) as f:
        demos = _demo_names_in(f["data"])
        keys = _filter_key_names(f)
        if names is not None:
            keys = [k for k in keys if k in set(names)]
        return {k: _read_filter_key(f, p, k, demos) for k in keys}


# ----------------------------------------------------------------------------------------------- checks
def _actions_meta(grp: h5py.Group, name: str, path: str) -> Tuple[int, int]:
    if "actions" not in grp:
        raise DpftError(
            "'%s': data/%s has no 'actions' dataset (entries: [%s]); every robomimic demo needs actions (T, Da)."
            % (path, name, _short_list(list(grp.keys())))
        )
    ds = _check_is_dataset(grp["actions"], path, "data/%s/actions" % name)
    if ds.ndim not in (1, 2) or not np.issubdtype(ds.dtype, np.number):
        raise DpftError(
            "'%s': data/%s/actions has shape %s and dtype %s; expected a numeric (T, Da) array."
            % (path, name, ds.shape, ds.dtype)
        )
    return int(ds.shape[0]), (int(ds.shape[1]) if ds.ndim == 2 else 1)


def _obs_group(grp: h5py.Group, name: str, path: str) -> h5py.Group:
    if "obs" not in grp or not isinstance(grp["obs"], h5py.Group):
        raise DpftError(
            "'%s': data/%s has no 'obs' group (entries: [%s]); robomimic stores observations under "
            "data/<demo>/obs/<key>." % (path, name, _short_list(list(grp.keys())))
        )
    return grp["obs"]


def _check_action_dims(dims: Dict[str, int], path: str) -> int:
    by_dim = {}  # type: Dict[int, List[str]]
    for name, d in dims.items():
        by_dim.setdefault(d, []).append(name)
    if len(by_dim) > 1:
        parts = ["%d in %s" % (d, _short_list(names, 5)) for d, names in sorted(by_dim.items())]
        raise DpftError(
            "'%s': the action dimension differs across demos: %s. All demos must share one action space."
            % (path, "; ".join(parts))
        )
    return next(iter(by_dim))


def _check_length(ds: h5py.Dataset, expected: int, path: str, where: str, demo: str) -> None:
    if ds.ndim == 0:
        raise DpftError(
            "'%s': %s is a scalar dataset; expected one row per step (%d steps, like data/%s/actions)."
            % (path, where, expected, demo)
        )
    n = int(ds.shape[0])
    if n != expected:
        raise DpftError(
            "'%s': %s has %d steps but data/%s/actions has %d; observations and actions of a demo must have "
            "the same length." % (path, where, n, demo, expected)
        )


# ----------------------------------------------------------------------------------------------- describe
def describe(path: Any) -> Dict[str, Any]:
    """Validate a whole robomimic file and summarize it.

    Returns a dict with ``path``, ``num_demos``, ``num_samples``, ``total_attr`` (``data.attrs["total"]`` or
    None), ``demo_names``, ``length`` (min/max/mean/std/median of demo lengths), ``obs`` (``{key: {"shape":
    per-step tuple, "dtype": str, "kind": "low_dim"|"image"|"other"}}``), ``action_dim``, ``action_min`` /
    ``action_max`` (per-dimension lists), ``filter_keys`` (``{name: number of demos}``), ``env_args`` (parsed
    dict or None), ``extras`` (``{"rewards"|"dones"|"states"|"next_obs": number of demos holding it}``) and
    ``warnings`` (list of strings, e.g. actions outside [-1, 1]).

    Raises DpftError naming the demo/key for: action dimension differing across demos, NaN/Inf in actions
    or numeric observations, an obs key present in some demos only, an obs key whose per-step shape
    changes across demos, obs/actions (or rewards/dones/states/next_obs) length mismatch, an empty filter
    key or one naming unknown demos, and non-JSON ``env_args``.
    """
    p = _fmt_path(path)
    warnings = []  # type: List[str]
    with open_robomimic(p) as f:
        data = f["data"]
        names = _demo_names_in(data)
        env_args = _parse_env_args(f, p)
        key_demos = {k: _read_filter_key(f, p, k, names) for k in _filter_key_names(f)}
        filter_keys = {k: len(v) for k, v in key_demos.items()}

        # pass 1: metadata (lengths, action dims, obs keys and shapes)
        lengths = {}  # type: Dict[str, int]
        act_dims = {}  # type: Dict[str, int]
        obs_meta = {}  # type: Dict[str, Dict[str, Any]]
        obs_first = {}  # type: Dict[str, str]
        presence = {}  # type: Dict[str, List[str]]
        extras = {k: 0 for k in _OPTIONAL_PER_DEMO}
        for name in names:
            grp = data[name]
            T, Da = _actions_meta(grp, name, p)
            lengths[name], act_dims[name] = T, Da
            obs = _obs_group(grp, name, p)
            for key in obs.keys():
                ds = _check_is_dataset(obs[key], p, "data/%s/obs/%s" % (name, key))
                _check_length(ds, T, p, "data/%s/obs/%s" % (name, key), name)
                shape, dtype = tuple(int(s) for s in ds.shape[1:]), ds.dtype
                if key not in obs_meta:
                    obs_meta[key] = {"shape": shape, "dtype": str(dtype), "kind": _kind(shape, dtype)}
                    obs_first[key] = name
                    if obs_meta[key]["kind"] == "image":
                        check_image_layout(p, key, name, shape)
                elif obs_meta[key]["shape"] != shape or obs_meta[key]["kind"] != _kind(shape, dtype):
                    raise DpftError(
                        "'%s': obs key '%s' has per-step shape %s (%s) in data/%s but %s (%s) in data/%s; a key "
                        "must have one shape across demos."
                        % (p, key, obs_meta[key]["shape"], obs_meta[key]["dtype"], obs_first[key], shape, dtype,
                           name)
                    )
                presence.setdefault(key, []).append(name)
            for opt in ("rewards", "dones", "states"):
                if opt in grp:
                    ds = _check_is_dataset(grp[opt], p, "data/%s/%s" % (name, opt))
                    _check_length(ds, T, p, "data/%s/%s" % (name, opt), name)
                    extras[opt] += 1
            if "next_obs" in grp and isinstance(grp["next_obs"], h5py.Group):
                extras["next_obs"] += 1
                for key in grp["next_obs"].keys():
                    ds = _check_is_dataset(grp["next_obs"][key], p, "data/%s/next_obs/%s" % (name, key))
                    _check_length(ds, T, p,
                                  "data/%s/next_obs/%s" % (name, key), name)
            if "num_samples" in grp.attrs and int(grp.attrs["num_samples"]) != T:
                warnings.append(
                    "data/%s.attrs['num_samples'] is %d but the demo has %d steps"
                    % (name, int(grp.attrs["num_samples"]), T)
                )
        Da = _check_action_dims(act_dims, p)
        for key, present in presence.items():
            if len(present) != len(names):
                have = set(present)
                missing = [n for n in names if n not in have]
                raise DpftError(
                    "'%s': obs key '%s' is present in %d of %d demos but missing from data/{%s}/obs; every demo "
                    "must hold the same observation keys." % (p, key, len(present), len(names), _short_list(missing))
                )

        # pass 2: values (finiteness, action range)
        act_min = np.full(Da, np.inf)
        act_max = np.full(Da, -np.inf)
        for name in names:
            grp = data[name]
            T = lengths[name]
            if T == 0:
                continue
            a = np.asarray(grp["actions"][()], dtype=np.float64).reshape(T, Da)
            bad = _first_nonfinite(a)
            if bad is not None:
                raise DpftError(
                    "'%s': data/%s/actions contains %s (step %d, dimension %d); remove or repair this demo."
                    % (p, name, bad[2], bad[0], bad[1])
                )
            act_min = np.minimum(act_min, a.min(axis=0))
            act_max = np.maximum(act_max, a.max(axis=0))
            obs = grp["obs"]
            for key in obs.keys():
                ds = obs[key]
                if not np.issubdtype(ds.dtype, np.floating):
                    continue
                x = np.asarray(ds[()]).reshape(T, -1)
                bad = _first_nonfinite(x)
                if bad is not None:
                    raise DpftError(
                        "'%s': data/%s/obs/%s contains %s (step %d, flat index %d); remove or repair this demo."
                        % (p, name, key, bad[2], bad[0], bad[1])
                    )

        total_attr = int(data.attrs["total"]) if "total" in data.attrs else None

    lens = np.array([lengths[n] for n in names], dtype=np.int64)
    num_samples = int(lens.sum())
    if num_samples == 0:
        raise no_samples_error(p, names, lens.tolist())
    from dpft.config import DataConfig
    from dpft.data.dataset import split_demos

    defaults = DataConfig()  # the split pretraining makes with its default data.* settings must leave demos to train
    try:
        split_demos(names, key_demos, defaults.train_filter_key, defaults.valid_filter_key, defaults.valid_ratio)
    except DpftError as e:
        raise DpftError("'%s': %s" % (p, e)) from None
    empty = [n for n in names if lengths[n] == 0]
    if empty:
        warnings.append("%d demo(s) have 0 steps and contribute nothing to training: %s"
                        % (len(empty), _short_list(empty)))
    if total_attr is not None and total_attr != num_samples:
        warnings.append("data.attrs['total'] is %d but the demos hold %d samples" % (total_attr, num_samples))
    has_actions = bool(np.isfinite(act_min).all())
    if has_actions and (act_min.min() < -1.0 or act_max.max() > 1.0):
        warnings.append(
            "actions fall outside [-1, 1] (min %.4g, max %.4g); robomimic expects normalized actions "
            "(dpft normalizes with the training-split min/max anyway)" % (act_min.min(), act_max.max())
        )
    return {
        "path": p,
        "num_demos": len(names),
        "num_samples": num_samples,
        "total_attr": total_attr,
        "demo_names": names,
        "length": {
            "min": int(lens.min()),
            "max": int(lens.max()),
            "mean": float(lens.mean()),
            "std": float(lens.std()),
            "median": float(np.median(lens)),
        },
        "obs": obs_meta,
        "action_dim": int(Da),
        "action_min": act_min.tolist() if has_actions else [],
        "action_max": act_max.tolist() if has_actions else [],
        "filter_keys": filter_keys,
        "env_args": env_args,
        "extras": extras,
        "warnings": warnings,
    }


def format_description(d: Dict[str, Any]) -> str:
    """Human-readable text of a :func:`describe` dict (what ``dpft data info FILE`` prints)."""
    lines = ["File: %s" % d["path"]]
    env = d.get("env_args")
    if env:
        etype = env.get("type")
        tname = _ENV_TYPES.get(etype, str(etype)) if etype is not None else "?"
        version = env.get("env_version")
        lines.append(
            "Environment: %s (type %s = %s%s)"
            % (env.get("env_name", "?"), etype, tname, (", version %s" % version) if version else "")
        )
    else:
        lines.append("Environment: (no data.attrs['env_args'])")
    total = d.get("total_attr")
    lines.append(
        "Demos: %d   samples: %d%s"
        % (d["num_demos"], d["num_samples"], ("   (data.attrs['total'] = %d)" % total) if total is not None else "")
    )
    ln = d["length"]
    lines.append(
        "Demo length: min %d, max %d, mean %.1f, std %.1f, median %.1f"
        % (ln["min"], ln["max"], ln["mean"], ln["std"], ln["median"])
    )
    lines.append("Observation keys:")
    kind_names = {"low_dim": "low-dim", "image": "image", "other": "other*"}
    width = max([len(k) for k in d["obs"]] + [4])
    for key in sorted(d["obs"]):
        m = d["obs"][key]
        lines.append(
            "  %-*s  %-8s %-16s %s"
            % (width, key, kind_names.get(m["kind"], m["kind"]), str(tuple(m["shape"])), m["dtype"])
        )
    if any(m["kind"] == "other" for m in d["obs"].values()):
        lines.append("  * not usable as a policy input (neither a low-dim vector nor a uint8 (H, W, C) image)")
    low = [k for k in sorted(d["obs"]) if d["obs"][k]["kind"] == "low_dim"]
    if low:
        dim = sum(int(np.prod(d["obs"][k]["shape"])) if d["obs"][k]["shape"] else 1 for k in low)
        lines.append("  (all low-dim keys together: obs_dim %d)" % dim)
    lines.append("Actions: dim %d" % d["action_dim"])
    if d["action_min"]:
        lines.append("  %-5s %10s %10s" % ("dim", "min", "max"))
        for i, (lo, hi) in enumerate(zip(d["action_min"], d["action_max"])):
            lines.append("  %-5d %10.4f %10.4f" % (i, lo, hi))
    if d["filter_keys"]:
        lines.append("Filter keys:")
        fw = max(len(k) for k in d["filter_keys"])
        for k in sorted(d["filter_keys"]):
            n = d["filter_keys"][k]
            lines.append("  %-*s  %d demo%s" % (fw, k, n, "" if n == 1 else "s"))
    else:
        lines.append("Filter keys: none (a seeded split by valid_ratio is used for validation)")
    present = ["%s (%d demo%s)" % (k, n, "" if n == 1 else "s") for k, n in d["extras"].items() if n]
    lines.append("Other per-demo data: %s" % (", ".join(present) if present else "none"))
    for w in d.get("warnings", []):
        lines.append("Warning: %s" % w)
    if env:
        lines.append("env_args:")
        lines.extend("  " + line for line in json.dumps(env, indent=2, sort_keys=True, default=str).splitlines())
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- loading
@dataclass
class Demos:
    """Demonstrations held in memory as contiguous arrays (N = total steps, E = demos).

    Attributes:
        state: float32 ``(N, Do)``: low-dim obs keys concatenated in ``low_dim_keys`` order ((N, 0) if none).
        images: ``{key: uint8 (N, H, W, C)}`` for the image keys, in request order.
        actions: float32 ``(N, Da)``.
        episode_ends: int64 ``(E,)`` cumulative end index of each demo (exclusive).
        demo_names: the E demo names, sorted numerically.
        env_args: ``data.attrs["env_args"]`` parsed ({} when absent).
        obs_shapes: per-step shape of every requested key (``(d,)`` low-dim, ``(1,)`` for 1-D datasets,
            ``(H, W, C)`` images).
        low_dim_keys, image_keys: the requested keys split by kind, each in request order.
        obs_keys: all requested keys in request order.
        path: the file they came from.
    """

    state: np.ndarray
    images: Dict[str, np.ndarray]
    actions: np.ndarray
    episode_ends: np.ndarray
    demo_names: List[str]
    env_args: Dict[str, Any]
    obs_shapes: Dict[str, Tuple[int, ...]]
    low_dim_keys: List[str]
    image_keys: List[str]
    obs_keys: List[str] = field(default_factory=list)
    path: Optional[str] = None

    @property
    def num_samples(self) -> int:
        return int(self.actions.shape[0])

    @property
    def num_demos(self) -> int:
        return int(self.episode_ends.shape[0])

    @property
    def obs_dim(self) -> int:
        return int(self.state.shape[1])

    @property
    def action_dim(self) -> int:
        return int(self.actions.shape[1])

    @property
    def episode_starts(self) -> np.ndarray:
        """int64 ``(E,)`` start index of each demo."""
        return np.concatenate([np.zeros(1, np.int64), self.episode_ends[:-1]]).astype(np.int64)

    @property
    def episode_lengths(self) -> np.ndarray:
        """int64 ``(E,)`` length of each demo."""
        return np.diff(np.concatenate([np.zeros(1, np.int64), self.episode_ends])).astype(np.int64)

    @property
    def state_slices(self) -> Dict[str, Tuple[int, int]]:
        """``{low-dim key: (start, stop)}`` columns of ``state`` holding that key."""
        out, c = {}, 0
        for k in self.low_dim_keys:
            d = int(np.prod(self.obs_shapes[k]))
            out[k] = (c, c + d)
            c += d
        return out


def load_demos(
    path: Any,
    obs_keys: Sequence[str],
    filter_key: Optional[str] = None,
    demo_names: Optional[Sequence[str]] = None,
) -> Demos:
    """Load the given observation keys and the actions of a robomimic file into memory.

    Args:
        path: the HDF5 file.
        obs_keys: observation keys; low-dim ones are concatenated into ``state`` in this order, image ones
            (uint8 ``(H, W, C)`` datasets) go to ``images``.
        filter_key: load only the demos listed in ``mask/<filter_key>``.
        demo_names: load only these demos (mutually exclusive with ``filter_key``).

    Returns:
        :class:`Demos` with demos in numeric order.

    Raises DpftError naming file/demo/key for: a missing obs key (listing the keys present), an unusable
    obs key (not low-dim, not uint8 HWC), a key whose per-step shape changes across demos, an unknown or
    empty filter key, an unknown demo name, action dimensions differing across demos, obs/actions length
    mismatch and NaN/Inf in the loaded observations or actions.
    """
    p = _fmt_path(path)
    if isinstance(obs_keys, str) or not isinstance(obs_keys, (list, tuple)) or not obs_keys:
        raise DpftError(
            "obs_keys must be a non-empty list of observation key names (e.g. ['robot0_eef_pos', 'object']), "
            "got %r." % (obs_keys,)
        )
    obs_keys = [str(k) for k in obs_keys]
    dupes = sorted(set(k for k in obs_keys if obs_keys.count(k) > 1))
    if dupes:
        raise DpftError("obs_keys lists %s more than once: %s." % (_short_list(dupes), obs_keys))
    if filter_key is not None and demo_names is not None:
        raise DpftError("load_demos: give either filter_key or demo_names, not both.")

    with open_robomimic(p) as f:
        data = f["data"]
        all_names = _demo_names_in(data)
        if filter_key is not None:
            names = _read_filter_key(f, p, str(filter_key), all_names)
        elif demo_names is not None:
            present = set(all_names)
            unknown = [n for n in demo_names if n not in present]
            if unknown:
                raise DpftError(
                    "'%s': demos [%s] are not in data/ (it holds %d demos: %s)."
                    % (p, _short_list(unknown), len(all_names), _short_list(all_names))
                )
            if not demo_names:
                raise DpftError("'%s': load_demos was asked for an empty list of demos." % p)
            names = sorted(set(demo_names), key=demo_sort_key)
        else:
            names = all_names
        env_args = _parse_env_args(f, p) or {}

        # metadata pass: lengths, action dims, key presence / shapes / kinds
        lengths = np.zeros(len(names), dtype=np.int64)
        act_dims = {}  # type: Dict[str, int]
        shapes = {}  # type: Dict[str, Tuple[int, ...]]
        dtypes = {}  # type: Dict[str, np.dtype]
        first_demo = {}  # type: Dict[str, str]
        for i, name in enumerate(names):
            grp = data[name]
            T, Da = _actions_meta(grp, name, p)
            lengths[i], act_dims[name] = T, Da
            obs = _obs_group(grp, name, p)
            for key in obs_keys:
                if key not in obs:
                    raise DpftError(
                        "'%s': obs key '%s' is missing from data/%s/obs. Keys present there: [%s]. Check the "
                        "obs_keys setting." % (p, key, name, ", ".join(sorted(obs.keys())))
                    )
                ds = _check_is_dataset(obs[key], p, "data/%s/obs/%s" % (name, key))
                _check_length(ds, T, p, "data/%s/obs/%s" % (name, key), name)
                shape = tuple(int(s) for s in ds.shape[1:])
                if key not in shapes:
                    shapes[key], dtypes[key], first_demo[key] = shape, ds.dtype, name
                    if _kind(shape, ds.dtype) == "image":
                        check_image_layout(p, key, name, shape)
                    if _kind(shape, ds.dtype) == "other":
                        raise DpftError(
                            "'%s': obs key '%s' has per-step shape %s and dtype %s in data/%s; policy inputs must "
                            "be low-dim vectors (T, d) / (T,) or uint8 images (T, H, W, C)."
                            % (p, key, shape, ds.dtype, name)
                        )
                elif shape != shapes[key] or _kind(shape, ds.dtype) != _kind(shapes[key], dtypes[key]):
                    raise DpftError(
                        "'%s': obs key '%s' has per-step shape %s (%s) in data/%s but %s (%s) in data/%s; a key "
                        "must have one shape across demos."
                        % (p, key, shapes[key], dtypes[key], first_demo[key], shape, ds.dtype, name)
                    )
        Da = _check_action_dims(act_dims, p)

        low_dim_keys = [k for k in obs_keys if _kind(shapes[k], dtypes[k]) == "low_dim"]
        image_keys = [k for k in obs_keys if _kind(shapes[k], dtypes[k]) == "image"]
        obs_shapes = {k: (shapes[k] if shapes[k] else (1,)) for k in obs_keys}
        cols = {}
        c = 0
        for k in low_dim_keys:
            d = int(np.prod(obs_shapes[k]))
            cols[k] = (c, c + d)
            c += d
        ends = np.cumsum(lengths).astype(np.int64)
        N = int(ends[-1]) if len(ends) else 0
        state = np.empty((N, c), dtype=np.float32)
        actions = np.empty((N, Da), dtype=np.float32)
        images = {k: np.empty((N,) + shapes[k], dtype=np.uint8) for k in image_keys}

        # value pass: one read per demo and key into the preallocated arrays
        for i, name in enumerate(names):
            e = int(ends[i])
            s = e - int(lengths[i])
            if e == s:
                continue
            grp = data[name]
            actions[s:e] = np.asarray(grp["actions"][()]).reshape(e - s, Da)
            obs = grp["obs"]
            for k in low_dim_keys:
                c0, c1 = cols[k]
                state[s:e, c0:c1] = np.asarray(obs[k][()]).reshape(e - s, c1 - c0)
            for k in image_keys:
                obs[k].read_direct(images[k], dest_sel=np.s_[s:e])

    for arr, what in ((actions, "actions"), (state, "state")):
        bad = _first_nonfinite(arr)
        if bad is None:
            continue
        row, col, label = bad
        i = int(np.searchsorted(ends, row, side="right"))
        step = row - (int(ends[i - 1]) if i > 0 else 0)
        if what == "actions":
            where = "data/%s/actions" % names[i]
            detail = "step %d, dimension %d" % (step, col)
        else:
            key = next(k for k in low_dim_keys if cols[k][0] <= col < cols[k][1])
            where = "data/%s/obs/%s" % (names[i], key)
            detail = "step %d, dimension %d" % (step, col - cols[key][0])
        raise DpftError(
            "'%s': %s contains %s (%s) (or overflows float32); remove or repair this demo."
            % (p, where, label, detail)
        )

    return Demos(
        state=state,
        images=images,
        actions=actions,
        episode_ends=ends,
        demo_names=list(names),
        env_args=env_args,
        obs_shapes=obs_shapes,
        low_dim_keys=low_dim_keys,
        image_keys=image_keys,
        obs_keys=list(obs_keys),
        path=p,
    )


def resolve_obs_keys(path: Any, obs_keys: Sequence[str], default: Sequence[str]) -> Tuple[List[str], Optional[str]]:
    """The observation keys to train on, and a note to print when they were chosen for the user.

    ``obs_keys`` as given, unless it is the untouched ``default`` (robomimic's standard low-dim set) and the
    file lacks some of those keys (a Gym-style file with one ``obs`` key, for instance): then every low-dim key
    of the file, in the file's order, with the standard ones that are present first.
    """
    keys = [str(k) for k in obs_keys]
    if keys != [str(k) for k in default]:
        return keys, None
    p = _fmt_path(path)
    with open_robomimic(p) as f:
        first = f["data"][_demo_names_in(f["data"])[0]]
        obs = _obs_group(first, _demo_names_in(f["data"])[0], p)
        present = list(obs.keys())
        if all(k in present for k in keys):
            return keys, None
        low = [k for k in present if isinstance(obs[k], h5py.Dataset)
               and _kind(tuple(int(x) for x in obs[k].shape[1:]), obs[k].dtype) == "low_dim"]
    if not low:
        return keys, None  # load_demos names the missing key and lists the ones present
    chosen = [k for k in keys if k in low] + [k for k in low if k not in keys]
    missing = [k for k in keys if k not in present]
    note = ("obs_keys not set and '%s' lacks robomimic's standard keys %s; using the file's low-dim keys %s "
            "(set obs_keys=[...] to choose)." % (p, missing, chosen))
    return chosen, note


#: the name used in docs/design.md
load_hdf5 = load_demos

__all__ = [
    "Demos",
    "demo_sort_key",
    "describe",
    "format_description",
    "list_demos",
    "load_demos",
    "load_hdf5",
    "open_robomimic",
    "read_env_args",
    "read_filter_keys",
    "resolve_obs_keys",
    "filter_key_names",
    "check_image_layout",
    "no_samples_error",
]
