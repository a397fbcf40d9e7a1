"""``dpft info``: versions of the stack and the rendering backend, for bug reports."""
from __future__ import annotations

import os
import platform
import sys
from typing import Any, Dict, List, Optional, Tuple


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return "not installed"


def system_report() -> str:
    """A plain-text report: Python, OS, CPU count, torch (+CUDA), simulators, MUJOCO_GL."""
    import dpft

    lines: List[str] = [
        f"dpft        {dpft.__version__}",
        f"python      {sys.version.split()[0]} ({platform.platform()})",
        f"cpu cores   {os.cpu_count()}",
    ]
    try:
        import torch

        cuda = torch.cuda.is_available()
        gpu = torch.cuda.get_device_name(0) if cuda else "none"
        lines.append(f"torch       {torch.__version__} (cuda available: {cuda}; gpu: {gpu})")
    except Exception as e:  # pragma: no cover - torch is a hard dependency
        lines.append(f"torch       unavailable ({e})")
    for name in ("numpy", "diffusers", "hydra-core", "h5py", "safetensors", "mujoco", "robosuite", "gymnasium",
                 "imageio-ffmpeg", "wandb", "furniture-bench", "isaacgym"):
        lines.append(f"{name:<11} {_version(name)}")
    user_gl = os.environ.get("MUJOCO_GL")
    try:
        from dpft.envs.render import rendering_info, setup_rendering

        backend = setup_rendering(require=False)
        renderer = rendering_info().get("gl_renderer") or "unknown"
        lines.append(f"rendering   {backend or 'platform default'} (GL_RENDERER: {renderer}; "
                     f"MUJOCO_GL was {user_gl or 'unset'})")
    except Exception as e:  # rendering is optional for `dpft info`
        lines.append(f"rendering   unavailable ({e})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# What a run's numbers depend on (issue 19): recorded in run.json and in every checkpoint's meta.json
# ----------------------------------------------------------------------------------------------------------------

#: meta.json / run.json key of :func:`compute_environment`
COMPUTE_KEY = "compute"


def _config_line(text: str, *needles: str) -> str:
    for line in text.splitlines():
        line = line.strip(" -\t")
        if any(n in line for n in needles):
            return line
    return ""


def compute_environment() -> Dict[str, Any]:
    """What bit-identical results depend on besides the seed and the config, for the current process.

    Returns a JSON-serializable dict: ``torch_num_threads`` (the resolved ``torch.get_num_threads()``: it sets how
    CPU reductions are split, so another count changes float results in the last bits), ``torch_version``,
    ``torch_git`` (the build's commit), ``cuda`` (build's CUDA version or None), ``cpu_capability`` (the SIMD kernels
    torch dispatches to: ``torch.backends.cpu.get_cpu_capability()``, e.g. ``AVX512``), ``blas`` (MKL line of the
    build), ``onednn`` (oneDNN / MKL-DNN line), ``mkl`` / ``mkldnn`` (available), ``parallel_backend``,
    ``omp_num_threads_env`` (``OMP_NUM_THREADS`` as found, for the record), ``numpy_version``, ``python``, ``machine``.
    """
    import torch

    try:
        config = torch.__config__.show()
    except Exception:  # pragma: no cover - very old torch
        config = ""
    try:
        parallel = _config_line(torch.__config__.parallel_info(), "parallel backend").split(":")[-1].strip()
    except Exception:  # pragma: no cover
        parallel = ""
    try:
        capability = str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # pragma: no cover - torch < 2.1
        capability = _config_line(config, "CPU capability usage").split(":")[-1].strip()
    import numpy

    return {
        "torch_num_threads": int(torch.get_num_threads()),
        "torch_version": str(torch.__version__),
        "torch_git": str(getattr(torch.version, "git_version", "") or ""),
        "cuda": getattr(torch.version, "cuda", None),
        "cpu_capability": capability,
        "blas": _config_line(config, "Math Kernel Library", "OpenBLAS", "BLAS_INFO"),
        "onednn": _config_line(config, "MKL-DNN", "oneDNN"),
        "mkl": bool(torch.backends.mkl.is_available()),
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "parallel_backend": parallel,
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "numpy_version": str(numpy.__version__),
        "python": sys.version.split()[0],
        "machine": platform.machine(),
    }


#: keys of :func:`compute_environment` whose change makes a resumed run differ from an uninterrupted one
RESULT_KEYS = ("torch_num_threads", "torch_version", "torch_git", "cpu_capability", "blas", "onednn")


def compute_differences(saved: Any, current: Dict[str, Any]) -> List[Tuple[str, Any, Any]]:
    """``(key, saved, current)`` for each of :data:`RESULT_KEYS` that differs; [] when ``saved`` has no record
    (a checkpoint written before dpft recorded it)."""
    if not isinstance(saved, dict):
        return []
    return [(k, saved.get(k), current.get(k)) for k in RESULT_KEYS if k in saved and saved.get(k) != current.get(k)]


def resume_threads(requested: Any, saved: Any) -> Optional[int]:
    """The torch thread count a resumed run should use: ``requested`` (``num_threads=``) when set (> 0), else the
    count the run recorded (so that an unset ``num_threads`` resumes exactly), else None (torch's choice)."""
    if requested:
        return int(requested)
    if isinstance(saved, dict) and saved.get("torch_num_threads"):
        return int(saved["torch_num_threads"])
    return None


def resume_warning(saved: Any, current: Dict[str, Any], where: str) -> Optional[str]:
    """The warning printed when a run resumes from the checkpoint ``where`` under a different compute environment
    (None when nothing that matters differs)."""
    diffs = compute_differences(saved, current)
    if not diffs:
        return None
    desc = "; ".join("%s %r -> %r" % d for d in diffs)
    hint = (" Pass num_threads=%s to resume with the recorded thread count." % saved["torch_num_threads"]
            if any(d[0] == "torch_num_threads" for d in diffs) else "")
    return ("warning: resuming from %s under a different compute environment (%s): the result will differ from an "
            "uninterrupted run (bit-identical results need the same seed, thread count, torch build and CPU "
            "kernels).%s" % (where, desc, hint))
