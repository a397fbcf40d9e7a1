"""Capture and restore every random-number-generator state dpft depends on, for exact resume.

A state is split into two parts so a checkpoint never needs pickle:

- ``tensors``: ``Dict[str, Tensor]`` (safetensors-ready): the Mersenne-Twister words of Python's
  ``random`` and of numpy's global generator, torch's CPU (and every CUDA device's) generator state, and the
  state of each named ``torch.Generator``;
- ``info``: a JSON-ready dict with the remaining scalars (Python's cached Gaussian, numpy's position and
  cached Gaussian, the device of each named generator).

Example (save, then restore in a new process)::

    gen = torch.Generator().manual_seed(0)
    tensors, info = capture_rng_state({"train": gen})
    save_rng_state("ckpt/training_state", {"train": gen})          # rng.safetensors + rng.json
    ...
    load_rng_state("ckpt/training_state", {"train": gen})          # gen continues the same stream

:func:`seed_everything` is the single seeding entry point (Python, numpy and torch, all devices).
"""
from __future__ import annotations

import json
import os
import random
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import torch

from dpft.errors import DpftError

RngState = Tuple[Dict[str, torch.Tensor], Dict[str, Any]]

_PY_KEY = "python.state"
_NP_KEY = "numpy.keys"
_TORCH_KEY = "torch.cpu"
_CUDA_PREFIX = "torch.cuda."
_GEN_PREFIX = "generator."


def seed_everything(seed: int) -> None:
    """Seed Python ``random``, numpy's global generator and torch (CPU and all CUDA devices) with ``seed``."""
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)  # also seeds every CUDA device


def capture_rng_state(generators: Optional[Mapping[str, torch.Generator]] = None,
                      include_global: bool = True) -> RngState:
    """The current RNG state as ``(tensors, info)``.

    Args:
        generators: named ``torch.Generator`` objects to include (e.g. ``{"train": gen}``).
        include_global: also capture Python ``random``, numpy's global generator and torch's default
            CPU/CUDA generators.
    """
    tensors = {}  # type: Dict[str, torch.Tensor]
    info = {"generators": {}}  # type: Dict[str, Any]
    if include_global:
        version, words, gauss_next = random.getstate()
        tensors[_PY_KEY] = torch.tensor(words, dtype=torch.int64)  # (625,) 32-bit words + position
        info["python"] = {"version": int(version), "gauss_next": gauss_next}
        name, keys, pos, has_gauss, cached = np.random.get_state()
        tensors[_NP_KEY] = torch.from_numpy(np.asarray(keys, dtype=np.int64).copy())  # (624,) uint32 words
        info["numpy"] = {"name": str(name), "pos": int(pos), "has_gauss": int(has_gauss),
                         "cached_gaussian": float(cached)}
        tensors[_TORCH_KEY] = torch.get_rng_state().clone()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for i, state in enumerate(torch.cuda.get_rng_state_all()):
                tensors[_CUDA_PREFIX + str(i)] = state.clone()
            info["cuda_devices"] = torch.cuda.device_count()
    for gname, gen in (generators or {}).items():
        if not isinstance(gen, torch.Generator):
            raise DpftError("RNG state entry '%s' must be a torch.Generator, got %s." % (gname, type(gen).__name__))
        tensors[_GEN_PREFIX + gname] = gen.get_state().clone()
        info["generators"][gname] = {"device": str(gen.device)}
    return tensors, info


def restore_rng_state(tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any],
                      generators: Optional[Mapping[str, torch.Generator]] = None,
                      source: str = "RNG state") -> None:
    """Restore a state captured by :func:`capture_rng_state`.

    Global generators are restored when their entries are present; each generator in ``generators`` must
    have a saved entry of the same name (DpftError naming it otherwise). CUDA states are restored only for
    devices that exist in this process.
    """
    if _PY_KEY in tensors:
        py = info.get("python", {})
        words = tuple(int(w) for w in tensors[_PY_KEY].tolist())
        random.setstate((int(py.get("version", 3)), words, py.get("gauss_next")))
    if _NP_KEY in tensors:
        npi = info.get("numpy", {})
        keys = tensors[_NP_KEY].numpy().astype(np.uint32)
        np.random.set_state((npi.get("name", "MT19937"), keys, int(npi.get("pos", 624)),
                             int(npi.get("has_gauss", 0)), float(npi.get("cached_gaussian", 0.0))))
    if _TORCH_KEY in tensors:
        torch.set_rng_state(tensors[_TORCH_KEY].to(torch.uint8).cpu())
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            key = _CUDA_PREFIX + str(i)
            if key in tensors:
                torch.cuda.set_rng_state(tensors[key].to(torch.uint8).cpu(), i)
    for gname, gen in (generators or {}).items():
        key = _GEN_PREFIX + gname
        if key not in tensors:
            saved = sorted(k[len(_GEN_PREFIX):] for k in tensors if k.startswith(_GEN_PREFIX))
            raise DpftError("%s has no state for generator '%s'; it holds generators %s." % (source, gname, saved))
        gen.set_state(tensors[key].to(torch.uint8).cpu())


def save_rng_state(directory: str, generators: Optional[Mapping[str, torch.Generator]] = None,
                   name: str = "rng", state: Optional[RngState] = None) -> None:
    """Write ``<name>.safetensors`` + ``<name>.json`` in ``directory`` (the current state unless ``state``)."""
    from dpft.checkpoint import save_tensors  # the file mode follows the umask

    tensors, info = state if state is not None else capture_rng_state(generators)
    save_tensors(os.path.join(directory, name + ".safetensors"), {k: v.contiguous() for k, v in tensors.items()})
    with open(os.path.join(directory, name + ".json"), "w") as f:
        json.dump(info, f, indent=1)


def read_rng_state(directory: str, name: str = "rng") -> RngState:
    """Read ``(tensors, info)`` written by :func:`save_rng_state` (DpftError naming a missing/corrupt file)."""
    from safetensors.torch import load_file

    st = os.path.join(directory, name + ".safetensors")
    js = os.path.join(directory, name + ".json")
    for p in (st, js):
        if not os.path.isfile(p):
            raise DpftError("RNG state file '%s' is missing; the checkpoint is incomplete." % p)
    try:
        tensors = load_file(st)
    except Exception as e:  # safetensors raises SafetensorError / OSError on a damaged file
        raise DpftError("RNG state file '%s' cannot be read (%s); the checkpoint is damaged." % (st, e)) from None
    try:
        with open(js) as f:
            info = json.load(f)
    except ValueError as e:
        raise DpftError("RNG state file '%s' is not valid JSON (%s); the checkpoint is damaged." % (js, e)) from None
    return tensors, info


def load_rng_state(directory: str, generators: Optional[Mapping[str, torch.Generator]] = None,
                   name: str = "rng") -> None:
    """Restore the state saved by :func:`save_rng_state` into the globals and ``generators``."""
    tensors, info = read_rng_state(directory, name)
    restore_rng_state(tensors, info, generators, source=os.path.join(directory, name + ".safetensors"))


__all__ = ["RngState", "seed_everything", "capture_rng_state", "restore_rng_state", "save_rng_state",
           "read_rng_state", "load_rng_state"]
