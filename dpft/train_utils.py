"""Helpers every trainer shares (pretraining, fine-tuning): process-group facts and set-up (torchrun's
RANK/WORLD_SIZE/LOCAL_RANK, gloo on CPU / NCCL on CUDA, barriers, object gathers, global totals split per rank),
the one device resolver, the warm-up + cosine LR multiplier, fused gradient clipping, parameter counts and the resume config check.

Nothing here touches files or starts processes; :mod:`dpft.rundir` owns run directories.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, is_dataclass
from typing import Any, Callable, Collection, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from dpft.errors import DpftError


@dataclass
class DistInfo:
    """Process-group facts from torchrun's environment (``enabled`` False for a single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False


def dist_info_from_env() -> DistInfo:
    """Read ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (set by torchrun)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise DpftError("RANK / WORLD_SIZE / LOCAL_RANK must be integers (they are set by torchrun); got "
                        "RANK=%r WORLD_SIZE=%r LOCAL_RANK=%r." % (os.environ.get("RANK"), os.environ.get("WORLD_SIZE"),
                                                                  os.environ.get("LOCAL_RANK"))) from None
    return DistInfo(rank=rank, world_size=world, local_rank=local, enabled=world > 1)


def per_rank(name: str, value: int, world_size: int, what: str = "the global total") -> int:
    """``value // world_size`` for a GLOBAL total (``batch_size``, ``envs``) split over the data-parallel ranks;
    a DpftError naming the setting, its value and the process count when it does not divide evenly."""
    value, world_size = int(value), int(world_size)
    if value % world_size != 0:
        raise DpftError("%s=%d is %s and must be divisible by the number of DDP processes (%d); use e.g. "
                        "%s=%d." % (name, value, what, world_size, name, max(1, value // world_size) * world_size))
    return value // world_size


def init_process_group(info: DistInfo, device: torch.device) -> bool:
    """Join torchrun's process group when ``info.enabled`` and none exists yet: NCCL when ``device`` is CUDA
    (``torch.cuda.set_device(device)`` first), gloo on CPU. Returns True when this call created the group (the
    caller then owns it: :func:`destroy_process_group`)."""
    if not info.enabled:
        return False
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise DpftError("WORLD_SIZE=%d is set but MASTER_ADDR/MASTER_PORT are not; launch data-parallel "
                        "training with torchrun --nproc_per_node N." % info.world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=info.rank,
                            world_size=info.world_size)
    return True


def destroy_process_group(owned: bool) -> None:
    """Tear down the process group when this process created it (``owned``, see :func:`init_process_group`)."""
    if not owned:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op for a single process)."""
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


def all_gather_objects(obj: Any, info: DistInfo) -> List[Any]:
    """Every rank's ``obj`` (JSON-like Python values), in rank order; ``[obj]`` for a single process."""
    if not info.enabled:
        return [obj]
    import torch.distributed as dist

    out = [None] * info.world_size  # type: List[Any]
    dist.all_gather_object(out, obj)
    return out


def resolve_device(name: Union[str, torch.device], local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:<local_rank>`` when CUDA is available, else ``cpu``; validates explicit names
    (``cuda`` without an index means ``cuda:<local_rank>``)."""
    name = str(name).strip()
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise DpftError("device=%r is not a torch device; expected cpu, cuda, cuda:N or auto." % name) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DpftError("device=%s was requested but CUDA is not available in this torch install "
                            "(torch %s); use device=cpu or device=auto." % (name, torch.__version__))
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        if dev.index >= torch.cuda.device_count():
            raise DpftError("device=%s but only %d CUDA device(s) exist." % (name, torch.cuda.device_count()))
    elif dev.type != "cpu":
        raise DpftError("device=%r is not supported; expected cpu, cuda, cuda:N or auto." % name)
    return dev


def cosine_warmup_lambda(warmup_steps: int, total_steps: int, min_lr_ratio: float) -> Callable[[int], float]:
    """LR multiplier for optimizer step ``s`` (0-based): ``(s + 1) / warmup_steps`` during warm-up, then
    ``min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + cos(pi * p))`` with ``p = (s - warmup) / (total - warmup)``
    clipped to [0, 1]."""
    warmup = max(0, int(warmup_steps))
    total = int(total_steps)
    ratio = float(min_lr_ratio)

    def fn(s: int) -> float:
        if s < warmup:
            return (s + 1.0) / warmup
        p = min(1.0, max(0.0, (s - warmup) / max(1, total - warmup)))
        return ratio + (1.0 - ratio) * 0.5 * (1.0 + math.cos(math.pi * p))

    return fn


def _grad_norm(params: List[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of the gradients (0-dim tensor on their device; 0 when there are none)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads)
    return torch.linalg.vector_norm(torch.stack(norms))


def clip_grad_norm(params: List[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale gradients so their global L2 norm is at most ``max_norm``; returns the norm before clipping.

    Same result as ``torch.nn.utils.clip_grad_norm_`` (scale ``max_norm / (norm + 1e-6)`` when it is below
    1). On CPU the scaling pass is skipped when nothing is clipped (reading the norm costs no device sync
    there); on accelerators it always runs, multiplying by 1.0, to avoid a host sync every step.
    """
    total = _grad_norm(params)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return total
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    if total.device.type == "cpu":
        c = float(coef)  # exact: a float32 value as a Python float
        if c < 1.0:
            torch._foreach_mul_(grads, c)
    else:
        torch._foreach_mul_(grads, coef.to(grads[0].device))
    return total


def count_parameters(model: nn.Module) -> str:
    """Parameter count as a short string (``1.23M``)."""
    n = sum(p.numel() for p in model.parameters())
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return "%.2f%s" % (n / div, unit)
    return str(n)


def _flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
    out = {}  # type: Dict[str, Any]
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, prefix + str(k) + "."))
    else:
        out[prefix[:-1]] = d
    return out


def _matches(key: str, may_change: Collection[str]) -> bool:
    """``key`` (dotted) or one of its parent sections is listed in ``may_change``."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in may_change for i in range(1, len(parts) + 1))


def config_differences(saved_yaml: str, cfg: Any, may_change: Collection[str],
                       schema: Optional[type] = None) -> List[Tuple[str, Any, Any]]:
    """``(key, saved, requested)`` for every dotted config key whose value differs between a saved config
    (YAML text, e.g. a checkpoint's config.yaml) and ``cfg``, skipping keys in ``may_change`` (a listed
    section such as ``"logger"`` or ``"policy"`` covers every key under it).

    The saved YAML is merged into ``schema`` (default: the dataclass ``cfg`` is typed by) first, so keys a
    newer dpft added with their default do not count as differences.
    """
    from omegaconf import DictConfig, OmegaConf

    from dpft.config import from_yaml_text

    if schema is None and isinstance(cfg, DictConfig):
        t = OmegaConf.get_type(cfg)
        schema = t if t is not None and is_dataclass(t) else None
    if schema is not None:
        saved = from_yaml_text(saved_yaml, schema, source="the checkpoint's config.yaml")
    else:
        saved = OmegaConf.create(saved_yaml)
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.structured(cfg)
    a = _flatten(OmegaConf.to_container(saved, resolve=True))
    b = _flatten(OmegaConf.to_container(cfg, resolve=True))
    diffs = []
    for key in sorted(set(a) | set(b)):
        if _matches(key, may_change):
            continue
        if a.get(key) != b.get(key):
            diffs.append((key, a.get(key), b.get(key)))
    return diffs


__all__ = ["DistInfo", "dist_info_from_env", "per_rank", "init_process_group", "destroy_process_group", "barrier",
           "all_gather_objects", "resolve_device", "cosine_warmup_lambda", "clip_grad_norm",
           "count_parameters", "config_differences"]


def apply_resume_compute(requested_threads: Any, saved_meta: Any, where: str) -> Optional[str]:
    """On resume: use the thread count the run recorded when ``num_threads`` is unset (so that resuming is exact),
    and return the warning to print when the compute environment still differs from the one recorded in the
    checkpoint ``where`` (another ``num_threads=``, torch build or CPU kernels), else None.

    ``saved_meta`` is the checkpoint's meta.json dict (its ``compute`` record; checkpoints without one resume
    silently, as before)."""
    import torch

    from dpft.sysinfo import COMPUTE_KEY, compute_environment, resume_threads, resume_warning

    saved = saved_meta.get(COMPUTE_KEY) if isinstance(saved_meta, dict) else None
    n = resume_threads(requested_threads, saved)
    if n and n != torch.get_num_threads():
        torch.set_num_threads(n)
    return resume_warning(saved, compute_environment(), where)
