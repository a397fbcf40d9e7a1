"""Run-directory layout, atomic checkpoint writes and pickle-free loading.

Layout (docs/design.md)::

    RUN_DIR/
      config.yaml  metrics.jsonl  loss_curve.png
      checkpoints/
        step_00001000/
          model.safetensors        live weights (keys of model.state_dict())
          ema.safetensors          EMA weights, same keys (evaluation default)
          normalizer.safetensors   "state.min", "state.max", "action.min", "action.max"
          meta.json                policy type, obs keys/shapes, action_dim, horizons, env_args, versions, step
          config.yaml              resolved config of the run
          training_state/          (absent in weights-only checkpoints)
            optimizer.safetensors  optimizer tensors, keys "state.<param index>.<name>"
            optimizer.json         param_groups and non-tensor per-parameter state
            scheduler.json         LR scheduler state_dict
            rng.safetensors/.json  RNG of rank 0 (dpft.rng); rng_rank<r>.* for the other DDP ranks
            step.json              step, world size, batch size, EMA update count
        latest                     text file: name of the newest complete checkpoint directory

Atomicity: a checkpoint is written into ``checkpoints/.tmp-step_XXXXXXXX-<pid>/``, every file is fsynced,
then the directory is renamed to ``step_XXXXXXXX`` (a rename is atomic, so a ``step_*`` directory is always
complete) and ``latest`` is replaced with ``os.replace``. A crash at any point leaves the previous
checkpoints and ``latest`` intact; :func:`find_latest` returns the highest-numbered complete ``step_*``.

Checksums: ``meta.json`` holds ``"checksums": {relative path: sha256 hex}`` for every other file of the
checkpoint directory (weights, normalizer, config.yaml and everything under ``training_state/``), computed
after the files are written and before meta.json, the last file, is written. Loading hashes each file from
the same bytes it parses (one read) and raises a DpftError naming the damaged file on a mismatch; a file
missing from the list is refused too. ``verify=False`` (``load_checkpoint``) or the :func:`verification`
context manager (``dpft rollout --no-verify``) skip the check. Checkpoints written before checksums existed
(no ``"checksums"`` key) load unverified. meta.json itself is only checked for being a valid JSON object.

Loading reads safetensors and JSON only (never ``torch.load``/pickle); :func:`load_state_strict` refuses
missing or unexpected weight keys and lists them.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch

from dpft.errors import DpftError
from dpft.normalization import MinMaxNormalizer
from dpft.rng import RngState
from dpft.sysinfo import COMPUTE_KEY, compute_environment

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAINING_STATE = "training_state"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
NORMALIZER_FILE = "normalizer.safetensors"
META_FILE = "meta.json"
CONFIG_FILE = "config.yaml"
CHECKSUMS_KEY = "checksums"
_STEP_RE = re.compile(r"^step_(\d{8,})$")
_TMP_RE = re.compile(r"^\.tmp-(?:retired-)?step_\d+-(\d+)$")


def step_dir_name(step: int) -> str:
    """``step_00001000`` for step 1000 (8 digits, more when needed)."""
    return "step_%08d" % int(step)


@dataclass
class Checkpoint:
    """A loaded checkpoint. ``training_state`` is None for weights-only loads.

    ``training_state`` keys: ``"optimizer"`` (an optimizer ``state_dict``), ``"scheduler"`` (a scheduler
    ``state_dict``), ``"rng"`` (list of :data:`dpft.rng.RngState`, index = DDP rank) and ``"step"`` (the
    step.json dict).
    """

    dir: str
    step: int
    meta: Dict[str, Any]
    config_yaml: str
    model_state: Dict[str, torch.Tensor]
    ema_state: Optional[Dict[str, torch.Tensor]]
    normalizer: MinMaxNormalizer
    training_state: Optional[Dict[str, Any]] = None


# ---------------------------------------------------------------------------------------------- writing
def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file, fsync and ``os.replace`` (readers never see half)."""
    tmp = "%s.tmp-%d" % (path, os.getpid())
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, allow_nan=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def default_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0o666 less the process umask (read without changing it for good)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def save_tensors(path: str, tensors: Mapping[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> None:
    """Save a flat tensor dict as safetensors (moved to CPU; tensors sharing memory are copied) and fsync."""
    from safetensors.torch import save_file

    out = {}  # type: Dict[str, torch.Tensor]
    for k, v in tensors.items():
        if not isinstance(v, torch.Tensor):
            raise DpftError("Cannot save '%s' in %s: expected a tensor, got %s." % (k, path, type(v).__name__))
        out[k] = v.detach().to("cpu").contiguous()
    # distinct views of one storage (tied or sliced weights) must not share memory in safetensors
    ptrs = {}  # type: Dict[int, str]
    for k, t in out.items():
        if t.numel() == 0:
            continue
        p = t.untyped_storage().data_ptr()
        if p in ptrs:
            out[k] = t.clone()
        else:
            ptrs[p] = k
    save_file(out, path, metadata=metadata)
    try:  # safetensors creates the file 0600 whatever the umask: give it the mode open() would
        os.chmod(path, default_file_mode())
    except OSError:
        pass
    _fsync_file(path)


def _encode(obj: Any, where: str) -> Any:
    """JSON-encode python state (tuples and non-string dict keys tagged so they decode back exactly)."""
    if isinstance(obj, torch.Tensor):
        raise DpftError("%s holds a tensor where JSON was expected; it cannot be saved as JSON." % where)
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(x, where) for x in obj]}
    if isinstance(obj, list):
        return [_encode(x, where) for x in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _encode(v, where) for k, v in obj.items()}
        return {"__items__": [[_encode(k, where), _encode(v, where)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    raise DpftError("%s holds a %s value, which dpft cannot save as JSON." % (where, type(obj).__name__))


def _decode(obj: Any) -> Any:
    if isinstance(obj, list):
        return [_decode(x) for x in obj]
    if isinstance(obj, dict):
        if set(obj) == {"__tuple__"}:
            return tuple(_decode(x) for x in obj["__tuple__"])
        if set(obj) == {"__items__"}:
            return {_decode(k): _decode(v) for k, v in obj["__items__"]}
        return {k: _decode(v) for k, v in obj.items()}
    return obj


def split_optimizer_state(state: Mapping[str, Any]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Optimizer ``state_dict`` -> (tensors ``{"state.<idx>.<name>": T}``, JSON-ready rest)."""
    tensors = {}  # type: Dict[str, torch.Tensor]
    scalars = {}  # type: Dict[str, Dict[str, Any]]
    for idx, per_param in state.get("state", {}).items():
        entry = {}  # type: Dict[str, Any]
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors["state.%s.%s" % (idx, name)] = value
            else:
                entry[name] = _encode(value, "optimizer state '%s.%s'" % (idx, name))
        scalars[str(idx)] = entry
    rest = {
        "param_groups": _encode(list(state.get("param_groups", [])), "optimizer param_groups"),
        "state": scalars,
        "state_index_type": "int" if all(isinstance(i, int) for i in state.get("state", {})) else "str",
    }
    return tensors, rest


def join_optimizer_state(tensors: Mapping[str, torch.Tensor], rest: Mapping[str, Any]) -> Dict[str, Any]:
    """Inverse of :func:`split_optimizer_state`."""
    as_int = rest.get("state_index_type", "int") == "int"
    state = {}  # type: Dict[Any, Dict[str, Any]]
    for idx, entry in rest.get("state", {}).items():
        state[int(idx) if as_int else idx] = {k: _decode(v) for k, v in entry.items()}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx) if as_int else idx, {})[name] = value
    return {"state": state, "param_groups": _decode(rest.get("param_groups", []))}


def _save_training_state(directory: str, training_state: Mapping[str, Any]) -> None:
    from dpft.rng import save_rng_state

    os.makedirs(directory)
    if training_state.get("optimizer") is not None:
        tensors, rest = split_optimizer_state(training_state["optimizer"])
        save_tensors(os.path.join(directory, "optimizer.safetensors"), tensors)
        _write_json(os.path.join(directory, "optimizer.json"), rest)
    if training_state.get("scheduler") is not None:
        _write_json(os.path.join(directory, "scheduler.json"), _encode(training_state["scheduler"], "scheduler state"))
    # RL trainers: several named optimizers, named tensor groups (critic weights, running statistics, replay
    # buffers) and named JSON objects (scheduler states, counters); names are listed in step.json.
    for name, state in (training_state.get("optimizers") or {}).items():
        tensors, rest = split_optimizer_state(state)
        save_tensors(os.path.join(directory, "optimizer_%s.safetensors" % name), tensors)
        _write_json(os.path.join(directory, "optimizer_%s.json" % name), rest)
    for name, tensors in (training_state.get("tensors") or {}).items():
        save_tensors(os.path.join(directory, "tensors_%s.safetensors" % name), dict(tensors))
    for name, obj in (training_state.get("json") or {}).items():
        _write_json(os.path.join(directory, "json_%s.json" % name), _encode(obj, "training state '%s'" % name))
    for rank, rng in enumerate(training_state.get("rng") or []):
        name = "rng" if rank == 0 else "rng_rank%d" % rank
        save_rng_state(directory, name=name, state=rng)
        _fsync_file(os.path.join(directory, name + ".safetensors"))
        _fsync_file(os.path.join(directory, name + ".json"))
    step_info = dict(training_state.get("step") or {})
    step_info["num_rng_states"] = len(training_state.get("rng") or [])
    for group in ("optimizers", "tensors", "json"):
        if training_state.get(group):
            step_info["_%s" % group] = sorted(training_state[group])
    _write_json(os.path.join(directory, "step.json"), _encode(step_info, "step.json"))
    _fsync_dir(directory)


def save_checkpoint(
    run_dir: str,
    step: int,
    model_state: Mapping[str, torch.Tensor],
    ema_state: Optional[Mapping[str, torch.Tensor]],
    normalizer: MinMaxNormalizer,
    meta: Mapping[str, Any],
    config_yaml: str,
    training_state: Optional[Mapping[str, Any]] = None,
    keep: int = 3,
    extra_weights: Optional[Mapping[str, Mapping[str, torch.Tensor]]] = None,
) -> str:
    """Write ``RUN_DIR/checkpoints/step_XXXXXXXX`` atomically, point ``latest`` at it, prune old ones.

    Args:
        run_dir: the run directory (created if needed).
        step: optimizer steps done.
        model_state / ema_state: flat weight dicts (``model.state_dict()``); ``ema_state`` None = no EMA file.
        normalizer: the run's :class:`MinMaxNormalizer`.
        meta: JSON-ready metadata (policy type, obs keys/shapes, ...); ``step``, ``created``,
            ``dpft_version`` and ``torch_version`` are added.
        config_yaml: the resolved config as YAML text.
        training_state: None for weights only, else a dict with ``"optimizer"``, ``"scheduler"`` (state
            dicts), ``"rng"`` (list of :data:`dpft.rng.RngState`, one per DDP rank) and ``"step"`` (dict
            written to step.json); RL trainers add ``"optimizers"`` ({name: optimizer state_dict}),
            ``"tensors"`` ({name: {key: Tensor}}) and ``"json"`` ({name: JSON-ready object}).
        keep: newest checkpoints kept (0 = all).
        extra_weights: ``{name: flat weight dict}`` written as ``<name>.safetensors`` next to
            ``model.safetensors`` (checksummed like it): weights that travel with the policy, e.g. IDQL's
            critics (``{"critic": ...}`` -> ``critic.safetensors``). Read them with :func:`read_tensors`.

    Returns the checkpoint directory.
    """
    import dpft

    ckpt_root = os.path.join(run_dir, CHECKPOINTS)
    os.makedirs(ckpt_root, exist_ok=True)
    name = step_dir_name(step)
    final = os.path.join(ckpt_root, name)
    tmp = os.path.join(ckpt_root, ".tmp-%s-%d" % (name, os.getpid()))
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        save_tensors(os.path.join(tmp, MODEL_FILE), model_state)
        if ema_state is not None:
            save_tensors(os.path.join(tmp, EMA_FILE), ema_state)
        save_tensors(os.path.join(tmp, NORMALIZER_FILE), normalizer.state_dict())
        for extra_name, extra_state in (extra_weights or {}).items():  # e.g. critic.safetensors (IDQL)
            extra_file = "%s.safetensors" % extra_name
            if extra_file in (MODEL_FILE, EMA_FILE, NORMALIZER_FILE) or not re.match(r"^[A-Za-z0-9_]+$", extra_name):
                raise DpftError("save_checkpoint: extra_weights name %r must be a plain word other than model, ema "
                                "and normalizer." % (extra_name,))
            save_tensors(os.path.join(tmp, extra_file), extra_state)
        _write_text(os.path.join(tmp, CONFIG_FILE), config_yaml)
        if training_state is not None:
            _save_training_state(os.path.join(tmp, TRAINING_STATE), training_state)
        full_meta = dict(meta)
        full_meta.update({
            "step": int(step),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "dpft_version": dpft.__version__,
            "torch_version": torch.__version__,
            "has_ema": ema_state is not None,
            COMPUTE_KEY: compute_environment(),  # thread count, torch build, CPU kernels: what exact resume needs
        })
        full_meta[CHECKSUMS_KEY] = checksum_tree(tmp)  # every file written above; meta.json comes last
        _write_json(os.path.join(tmp, META_FILE), _encode(full_meta, "meta.json"))
        _fsync_dir(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_write_failure(e):
            raise _write_failure(e, run_dir, name) from None
        raise
    old = None
    try:
        if os.path.exists(final):  # re-saving the same step: move the old copy aside (atomic), never delete in place
            old = _retire(ckpt_root, final)
        os.rename(tmp, final)
        _fsync_dir(ckpt_root)
        write_text_atomic(os.path.join(ckpt_root, LATEST), name + "\n")
    except OSError as e:
        raise _write_failure(e, run_dir, name) from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if keep and keep > 0:
        prune_checkpoints(run_dir, keep)
    return final


def _is_write_failure(e: BaseException) -> bool:
    """An OSError (full disk, quota, permissions) or safetensors' own error for one while writing."""
    return isinstance(e, OSError) or type(e).__name__ == "SafetensorError"


def _write_failure(e: BaseException, run_dir: str, name: str) -> DpftError:
    """One paragraph for a checkpoint that could not be written (the temporary copy is already removed)."""
    import errno

    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if getattr(e, "errno", None) == errno.ENOSPC or "No space left" in text or "StorageFull" in text:
        reason = "the disk is full (no space left on device)"
    elif getattr(e, "errno", None) == errno.EDQUOT or "quota" in text.lower():
        reason = "the disk quota is exceeded"
    elif isinstance(e, PermissionError) or "PermissionDenied" in text:
        reason = "permission was denied (%s)" % text
    else:
        reason = text
    kept = list_checkpoints(run_dir)
    have = ("the newest complete one, '%s', is intact" % kept[-1]) if kept else "no earlier checkpoint exists yet"
    return DpftError(
        "Could not write checkpoint %s in '%s': %s. Nothing already saved was lost (a checkpoint is written to a "
        "temporary directory and renamed only when complete; the unfinished copy was removed) and %s. Free space "
        "on that disk (or move out= to another one) and continue the run with resume=true."
        % (name, os.path.join(run_dir, CHECKPOINTS), reason, have))


def _retire(ckpt_root: str, path: str) -> str:
    """Rename a checkpoint directory to a ``.tmp-`` name (atomic) so it stops counting as a checkpoint before
    it is deleted; a crash mid-delete then leaves only a stale temp dir, which :func:`clean_stale_tmp` removes."""
    retired = os.path.join(ckpt_root, ".tmp-retired-%s-%d" % (os.path.basename(path), os.getpid()))
    os.rename(path, retired)
    return retired


def list_checkpoints(run_dir: str) -> List[str]:
    """Complete checkpoint directories of a run, oldest first (by step)."""
    root = _checkpoints_root(run_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for entry in os.listdir(root):
        m = _STEP_RE.match(entry)
        if m and os.path.isdir(os.path.join(root, entry)):
            found.append((int(m.group(1)), os.path.join(root, entry)))
    return [p for _, p in sorted(found)]


def prune_checkpoints(run_dir: str, keep: int) -> List[str]:
    """Delete all but the newest ``keep`` checkpoints; returns the deleted directories."""
    ckpts = list_checkpoints(run_dir)
    doomed = ckpts[:-keep] if keep > 0 else []
    for path in doomed:
        shutil.rmtree(_retire(os.path.dirname(path), path), ignore_errors=True)
    return doomed


def clean_stale_tmp(run_dir: str) -> List[str]:
    """Remove ``.tmp-step_*`` directories left by crashed writers (whose process no longer runs)."""
    root = _checkpoints_root(run_dir)
    removed = []
    if not os.path.isdir(root):
        return removed
    for entry in os.listdir(root):
        m = _TMP_RE.match(entry)
        if not m:
            continue
        pid = int(m.group(1))
        if pid != os.getpid() and _pid_alive(pid):
            continue
        shutil.rmtree(os.path.join(root, entry), ignore_errors=True)
        removed.append(entry)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: exists but belongs to someone else
        return True
    return True


# ---------------------------------------------------------------------------------------------- checksums
_VERIFY_DEFAULT = [True]
#: open :func:`verification` blocks' lists of files loaded although they failed their checksum (innermost last)
_MISMATCH_LOGS = []  # type: List[List[str]]


@contextlib.contextmanager
def verification(enabled: bool) -> Iterator[List[str]]:
    """Within the block, checkpoint loads that do not pass ``verify=`` explicitly verify checksums only when
    ``enabled`` (``dpft rollout --no-verify`` wraps :func:`dpft.load_policy` in ``verification(False)``). Yields a
    list that collects the files loaded in the block although their checksum did not match (verification off:
    each is also warned about on stderr)."""
    saved = _VERIFY_DEFAULT[0]
    _VERIFY_DEFAULT[0] = bool(enabled)
    log = []  # type: List[str]
    _MISMATCH_LOGS.append(log)
    try:
        yield log
    finally:
        _VERIFY_DEFAULT[0] = saved
        _MISMATCH_LOGS.remove(log)


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def checksum_tree(directory: str) -> Dict[str, str]:
    """``{relative path ('/'-separated): sha256}`` of every file under ``directory`` except its meta.json."""
    out = {}  # type: Dict[str, str]
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, directory).replace(os.sep, "/")
            if rel != META_FILE:
                out[rel] = sha256_file(path)
    return out


class ChecksumError(DpftError):
    """A checkpoint file whose sha256 differs from the one recorded in meta.json (``.path``: the file)."""

    def __init__(self, message: str, path: str):
        super().__init__(message)
        self.path = path


def damaged_step_advice(ckpt_dir: str) -> str:
    """What to do about a damaged checkpoint directory: use (or resume from) the run's previous one."""
    m = _STEP_RE.match(os.path.basename(os.path.normpath(ckpt_dir)))
    older = []  # type: List[str]
    if m:
        run_root = os.path.dirname(os.path.abspath(ckpt_dir))
        older = [c for c in list_checkpoints(run_root)
                 if int(_STEP_RE.match(os.path.basename(c)).group(1)) < int(m.group(1))]  # type: ignore[union-attr]
    if older:
        return ("use the run's previous checkpoint '%s' (pass it as checkpoint=); to resume a run from it, delete "
                "the damaged step directory '%s' first and pass resume=true." % (older[-1], ckpt_dir))
    return "use another checkpoint (this run has no earlier one; retrain if there is no copy)."


def _modified_after(meta_path: str, path: str) -> bool:
    """meta.json is written last, within moments of the other files: a much later mtime means it was edited."""
    try:
        return os.path.getmtime(meta_path) > os.path.getmtime(path) + 2.0
    except OSError:
        return False


def _load_anyway_note() -> str:
    return ("Only evaluation can load damaged files anyway: dpft rollout --no-verify, or "
            "dpft.load_policy(..., verify=False).")


class _Checksums:
    """The checksums recorded in a checkpoint's meta.json; ``None`` entries mean: do not verify."""

    def __init__(self, ckpt_dir: str, meta: Optional[Mapping[str, Any]], verify: Optional[bool]):
        self.dir = ckpt_dir
        if verify is None:
            verify = _VERIFY_DEFAULT[0]
        self.warn_only = not verify  # verification off: compare anyway and warn about (never refuse) a mismatch
        sums = meta.get(CHECKSUMS_KEY) if meta is not None else None
        if sums is not None and not isinstance(sums, dict):
            if self.warn_only:
                sums = None
            else:
                raise DpftError("Checkpoint file '%s' has a '%s' entry that is not a JSON object; the file is "
                                "damaged." % (os.path.join(ckpt_dir, META_FILE), CHECKSUMS_KEY))
        self.sums = sums  # type: Optional[Dict[str, str]]

    def check(self, path: str, digest: str) -> None:
        if self.sums is None:
            return
        rel = os.path.relpath(path, self.dir).replace(os.sep, "/")
        expected = self.sums.get(rel)
        meta = os.path.join(self.dir, META_FILE)
        if self.warn_only:
            if expected != digest:
                print("dpft: warning: checkpoint file '%s' %s; loading it anyway because checksum verification is "
                      "off (--no-verify / verify=False): results computed from it may be wrong."
                      % (path, "has no checksum in '%s'" % meta if expected is None else
                         "does not match the sha256 recorded in '%s' (the file was changed or damaged)" % meta),
                      file=sys.stderr, flush=True)
                for log in _MISMATCH_LOGS:
                    log.append(path)
            return
        if expected is None:
            if rel in (MODEL_FILE, EMA_FILE, NORMALIZER_FILE, CONFIG_FILE) or rel.startswith(TRAINING_STATE + "/"):
                raise ChecksumError("'%s' records no checksum for '%s', a file dpft writes into every checkpoint "
                                    "together with its checksum: meta.json was edited or damaged (the file itself may "
                                    "be fine). Restore meta.json from a copy, or %s %s"
                                    % (meta, path, damaged_step_advice(self.dir), _load_anyway_note()), path)
            raise ChecksumError("Checkpoint file '%s' has no checksum in '%s': it was not written with the "
                                "checkpoint. Remove it (it is not part of the checkpoint). %s"
                                % (path, meta, _load_anyway_note()), path)
        if expected != digest:
            if _modified_after(meta, path):
                raise ChecksumError("'%s' does not match the sha256 that '%s' records for it, and meta.json was "
                                    "modified after the file was written: meta.json was most likely edited (its "
                                    "recorded checksums are what changed). Restore meta.json from a copy, or %s %s"
                                    % (path, meta, damaged_step_advice(self.dir), _load_anyway_note()), path)
            raise ChecksumError("Checkpoint file '%s' is damaged: its sha256 is %s but '%s' recorded %s when it was "
                                "written. Restore the file from a copy, or %s %s"
                                % (path, digest, meta, expected, damaged_step_advice(self.dir), _load_anyway_note()),
                                path)

    def check_file(self, path: str) -> None:
        """Verify a file another module parses (hashes it separately)."""
        if self.sums is not None and os.path.isfile(path):
            self.check(path, sha256_file(path))

    def read_bytes(self, path: str) -> bytes:
        """The file's bytes, verified from the same read that the caller parses."""
        if not os.path.isfile(path):
            raise DpftError("Checkpoint file '%s' is missing; the checkpoint is incomplete or was moved." % path)
        with open(path, "rb") as f:
            data = f.read()
        if self.sums is not None:
            self.check(path, hashlib.sha256(data).hexdigest())
        return data


_UNVERIFIED = _Checksums("", None, False)


# ---------------------------------------------------------------------------------------------- finding
def _checkpoints_root(run_dir: str) -> str:
    return run_dir if os.path.basename(os.path.normpath(run_dir)) == CHECKPOINTS else os.path.join(run_dir, CHECKPOINTS)


def find_latest(run_dir: str) -> Optional[str]:
    """The newest complete checkpoint of ``run_dir`` (RUN_DIR or RUN_DIR/checkpoints), or None.

    ``step_*`` directories only appear complete (atomic rename), so the highest step wins; ``latest``
    names the same directory except after a crash between the rename and its update.
    """
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def is_checkpoint_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META_FILE)) or os.path.isfile(os.path.join(path, MODEL_FILE))


def resolve_checkpoint(path: Any) -> str:
    """A checkpoint directory from RUN_DIR, RUN_DIR/checkpoints or a ``step_*`` directory (DpftError if none)."""
    path = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.exists(path):
        raise DpftError("Checkpoint path '%s' does not exist; pass a run directory (out=...), its checkpoints/ "
                        "folder or a checkpoints/step_XXXXXXXX directory." % path)
    if not os.path.isdir(path):
        raise DpftError("Checkpoint path '%s' is a file; pass a run directory or a checkpoints/step_XXXXXXXX "
                        "directory (dpft checkpoints are directories)." % path)
    if is_checkpoint_dir(path):
        return path
    root = _checkpoints_root(path)
    if os.path.isdir(root):
        latest = find_latest(path)
        if latest is None:
            raise DpftError("Run directory '%s' has no complete checkpoint in %s (no step_XXXXXXXX directory); "
                            "the run was stopped before its first save." % (path, root))
        return latest
    from dpft.rundir import read_run_info

    info = read_run_info(path)
    if info is not None:  # a run killed (or still running) before its first checkpoint
        kind = str(info.get("kind"))
        how = ("continue it with `dpft %s ... out=%s resume=true`" % (kind, path) if kind in ("pretrain", "finetune")
               else "run it again to completion")
        raise DpftError("'%s' is a dpft %s run without any checkpoint yet (it stopped before its first save, or is "
                        "still running): there is nothing to load. Wait for it, %s, or pass a run that has saved "
                        "a checkpoint." % (path, kind, how))
    raise DpftError("'%s' is neither a dpft run directory (no checkpoints/ folder) nor a checkpoint directory "
                    "(no %s or %s)." % (path, META_FILE, MODEL_FILE))


# ---------------------------------------------------------------------------------------------- identity
#: meta.json keys that change when the same checkpoint is written again (left out of its identity hash)
_VOLATILE_META = ("created",)
START_CHECKPOINT_FILE = "start_checkpoint.json"


def checkpoint_identity(ckpt_dir: str) -> Dict[str, Any]:
    """What a fine-tuning run is bound to: ``{"path": checkpoint dir, "step", "sha256": {file: hex}}`` with the
    sha256 of every top-level ``*.safetensors`` (weights, EMA, normalizer, extra weights) and of meta.json's
    content without its write time (so a deterministic re-save of the same weights is the same identity)."""
    ckpt_dir = os.path.abspath(ckpt_dir)
    sums = {}  # type: Dict[str, str]
    for name in sorted(os.listdir(ckpt_dir)):
        if name.endswith(".safetensors") and os.path.isfile(os.path.join(ckpt_dir, name)):
            sums[name] = sha256_file(os.path.join(ckpt_dir, name))
    meta = {}  # type: Dict[str, Any]
    if os.path.isfile(os.path.join(ckpt_dir, META_FILE)):
        meta = dict(_read_meta(ckpt_dir))
        canon = json.dumps({k: v for k, v in meta.items() if k not in _VOLATILE_META}, sort_keys=True)
        sums[META_FILE] = hashlib.sha256(canon.encode("utf-8")).hexdigest()
    return {"path": ckpt_dir, "step": meta.get("step"), "sha256": sums}


def identity_differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> List[str]:
    """The file names whose hashes differ between two :func:`checkpoint_identity` dicts (also files present in
    only one of them)."""
    a, b = dict(recorded.get("sha256") or {}), dict(current.get("sha256") or {})
    return sorted(n for n in set(a) | set(b) if a.get(n) != b.get(n))


def check_start_checkpoint(recorded: Mapping[str, Any], current: Mapping[str, Any], out: str,
                           source: str) -> Optional[str]:
    """Refuse (DpftError) resuming the run in ``out`` from another start checkpoint than the one it started from.

    ``recorded``: the identity stored when the run started (``source`` names where it was read); ``current``: the
    identity of the ``checkpoint=`` given now. Returns a note when the path differs but the content is the same
    (a moved or copied checkpoint), else None."""
    diffs = identity_differences(recorded, current)
    rpath, cpath = str(recorded.get("path")), str(current.get("path"))
    if not diffs:
        if os.path.normpath(rpath) != os.path.normpath(cpath):
            return ("checkpoint='%s' is not where the run started ('%s') but holds the same files (same sha256); "
                    "continuing." % (cpath, rpath))
        return None
    what = ", ".join(diffs)
    if os.path.normpath(rpath) == os.path.normpath(cpath):
        raise DpftError(
            "resume=true: the run in out='%s' started from checkpoint '%s', and that checkpoint has changed since "
            "(%s differ from the sha256 recorded in %s; re-pretrained or overwritten in place?). Resuming would "
            "pair the fine-tuned weights with another policy's normalizer and sampler. Restore that checkpoint, "
            "or start a new fine-tuning run (a new out=) from the current one." % (out, rpath, what, source))
    hint = ""
    if os.path.isdir(rpath):
        try:
            if not identity_differences(recorded, checkpoint_identity(rpath)):
                hint = " Pass checkpoint=%s to continue it." % rpath
        except (OSError, DpftError):
            pass
    raise DpftError(
        "resume=true: the run in out='%s' started from checkpoint '%s', but checkpoint= now resolves to '%s', a "
        "different checkpoint (%s differ; recorded in %s). A run continues only from the checkpoint it started "
        "from.%s To fine-tune '%s' instead, start a new run with a new out=."
        % (out, rpath, cpath, what, source, hint, cpath))


# ---------------------------------------------------------------------------------------------- reading
def read_tensors(path: str, checksums: Optional[_Checksums] = None,
                 allow_inf: bool = False) -> Dict[str, torch.Tensor]:
    """Load a safetensors file to CPU tensors (DpftError naming a missing, damaged or checksum-failing file, or a
    tensor holding NaN, or infinity unless ``allow_inf`` or the file is a trainer's ``tensors_<name>`` bookkeeping,
    such as IN-RIL's m = inf)."""
    from safetensors.torch import load

    data = (checksums or _UNVERIFIED).read_bytes(path)
    try:
        tensors = load(data)
    except Exception as e:  # SafetensorError, ValueError on truncated or foreign files
        raise DpftError("Checkpoint file '%s' cannot be read as safetensors (%s); the file is damaged."
                        % (path, str(e).splitlines()[0] if str(e) else type(e).__name__)) from None
    # training_state/tensors_<name>.safetensors hold a trainer's bookkeeping (e.g. IN-RIL's m = inf): never NaN
    check_finite(tensors, path, allow_inf or os.path.basename(path).startswith("tensors_"))
    return tensors


def check_finite(tensors: Mapping[str, torch.Tensor], path: str, allow_inf: bool = False) -> None:
    """Refuse NaN (and, unless ``allow_inf``, infinity) in any floating-point tensor read from ``path`` (a DpftError
    naming the file, the tensor and how many entries): a checksum proves the file is what was written, not that it
    is usable."""
    for name in sorted(tensors):
        t = tensors[name]
        if not (t.is_floating_point() or t.is_complex()):
            continue
        bad = int(torch.isnan(t).sum()) if allow_inf else int((~torch.isfinite(t)).sum())
        if bad:
            raise DpftError(
                "Checkpoint file '%s' holds %d non-finite value(s) (NaN or infinity) of %d in tensor '%s', so it "
                "cannot be used: the training run that wrote it diverged, or the file was changed (its checksum "
                "only proves it is the file that was written). Use an earlier checkpoint of the run (the other "
                "checkpoints/step_XXXXXXXX directories; pass one as checkpoint=), or retrain with a lower learning "
                "rate." % (path, bad, t.numel(), name))


def read_json(path: str, checksums: Optional[_Checksums] = None) -> Any:
    """Load a JSON file (DpftError naming a missing, damaged or checksum-failing file)."""
    data = (checksums or _UNVERIFIED).read_bytes(path)
    try:
        return json.loads(data.decode("utf-8"))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise DpftError("Checkpoint file '%s' is not valid JSON (%s); the file is damaged." % (path, e)) from None


def _read_text(path: str, checksums: Optional[_Checksums] = None) -> str:
    data = (checksums or _UNVERIFIED).read_bytes(path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DpftError("Checkpoint file '%s' is not UTF-8 text (%s); the file is damaged." % (path, e)) from None


def _read_meta(ckpt_dir: str) -> Dict[str, Any]:
    path = os.path.join(ckpt_dir, META_FILE)
    meta = read_json(path)
    if not isinstance(meta, dict):
        raise DpftError("Checkpoint file '%s' must hold a JSON object; the file is damaged." % path)
    return meta


def load_training_state(ckpt_dir: str, verify: Optional[bool] = None,
                        checksums: Optional[_Checksums] = None) -> Dict[str, Any]:
    """Read ``training_state/`` of a checkpoint (see :class:`Checkpoint`), verifying checksums unless
    ``verify=False`` (``None``: the :func:`verification` default, True)."""
    from dpft.rng import read_rng_state

    d = os.path.join(ckpt_dir, TRAINING_STATE)
    if not os.path.isdir(d):
        raise DpftError("Checkpoint '%s' has no %s/ folder (it holds weights only), so training cannot resume "
                        "from it." % (ckpt_dir, TRAINING_STATE))
    if checksums is None:
        meta = _read_meta(ckpt_dir) if verify is not False and os.path.isfile(os.path.join(ckpt_dir, META_FILE)) else None
        checksums = _Checksums(ckpt_dir, meta, verify)
    step_info = _decode(read_json(os.path.join(d, "step.json"), checksums))
    out = {"step": step_info, "optimizer": None, "scheduler": None, "rng": []}  # type: Dict[str, Any]
    if os.path.exists(os.path.join(d, "optimizer.json")) or os.path.exists(os.path.join(d, "optimizer.safetensors")):
        out["optimizer"] = join_optimizer_state(read_tensors(os.path.join(d, "optimizer.safetensors"), checksums),
                                                read_json(os.path.join(d, "optimizer.json"), checksums))
    if os.path.exists(os.path.join(d, "scheduler.json")):
        out["scheduler"] = _decode(read_json(os.path.join(d, "scheduler.json"), checksums))
    out["optimizers"] = {n: join_optimizer_state(read_tensors(os.path.join(d, "optimizer_%s.safetensors" % n), checksums),
                                                 read_json(os.path.join(d, "optimizer_%s.json" % n), checksums))
                         for n in step_info.pop("_optimizers", [])}
    out["tensors"] = {n: read_tensors(os.path.join(d, "tensors_%s.safetensors" % n), checksums)
                      for n in step_info.pop("_tensors", [])}
    out["json"] = {n: _decode(read_json(os.path.join(d, "json_%s.json" % n), checksums))
                   for n in step_info.pop("_json", [])}
    rngs = []  # type: List[RngState]
    for rank in range(int(step_info.get("num_rng_states", 0))):
        name = "rng" if rank == 0 else "rng_rank%d" % rank
        for ext in (".safetensors", ".json"):
            checksums.check_file(os.path.join(d, name + ext))
        rngs.append(read_rng_state(d, name))
    out["rng"] = rngs
    return out


def load_checkpoint(path: Any, training_state: bool = False, ema: bool = True,
                    verify: Optional[bool] = None) -> Checkpoint:
    """Load a checkpoint from RUN_DIR, RUN_DIR/checkpoints or a step directory (safetensors + JSON only).

    Args:
        training_state: also read ``training_state/`` (needed to resume).
        ema: read ``ema.safetensors`` (when the checkpoint has it).
        verify: check every file read against the sha256 recorded in meta.json (DpftError naming a damaged
            file). ``None`` = the :func:`verification` default (True).
    """
    d = resolve_checkpoint(path)
    meta = _decode(_read_meta(d))
    sums = _Checksums(d, meta, verify)
    config_yaml = _read_text(os.path.join(d, CONFIG_FILE), sums)
    model_state = read_tensors(os.path.join(d, MODEL_FILE), sums)
    ema_state = None
    if ema and (meta.get("has_ema", True) or os.path.isfile(os.path.join(d, EMA_FILE))):
        ema_state = read_tensors(os.path.join(d, EMA_FILE), sums)
    norm_path = os.path.join(d, NORMALIZER_FILE)
    norm_state = read_tensors(norm_path, sums)
    try:
        normalizer = MinMaxNormalizer.from_state_dict(norm_state)
    except DpftError as e:
        raise DpftError("Checkpoint file '%s' holds invalid normalizer statistics: %s" % (norm_path, e)) from None
    step = meta.get("step")
    if step is None:
        m = _STEP_RE.match(os.path.basename(d))
        step = int(m.group(1)) if m else 0
    ts = load_training_state(d, checksums=sums) if training_state else None
    return Checkpoint(dir=d, step=int(step), meta=meta, config_yaml=config_yaml, model_state=model_state,
                      ema_state=ema_state, normalizer=normalizer, training_state=ts)


def load_state_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """``model.load_state_dict(state)`` that lists missing/unexpected keys and shape mismatches in a DpftError."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise DpftError(
            "Weights in '%s' do not match the model built from the checkpoint's config: %d missing key(s) %s, "
            "%d unexpected key(s) %s. The checkpoint was written by a different model definition or dpft "
            "version." % (source, len(missing), missing[:10], len(unexpected), unexpected[:10])
        )
    bad = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items()
           if tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        desc = ", ".join("%s: saved %s vs model %s" % b for b in bad[:10])
        raise DpftError("Weights in '%s' have shapes that differ from the model built from the config: %s."
                        % (source, desc))
    model.load_state_dict(dict(state), strict=True)


__all__ = [
    "Checkpoint", "save_checkpoint", "load_checkpoint", "load_training_state", "load_state_strict",
    "find_latest", "list_checkpoints", "resolve_checkpoint", "prune_checkpoints", "clean_stale_tmp",
    "step_dir_name", "write_text_atomic", "save_tensors", "read_tensors", "read_json",
    "split_optimizer_state", "join_optimizer_state", "is_checkpoint_dir", "verification", "checksum_tree",
    "check_finite",
    "sha256_file", "CHECKSUMS_KEY", "ChecksumError", "checkpoint_identity", "identity_differences",
    "check_start_checkpoint", "START_CHECKPOINT_FILE", "default_file_mode",
]
