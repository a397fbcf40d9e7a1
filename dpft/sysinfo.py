"""``dpft info``: versions of the stack and the rendering backend, for bug reports."""
from __future__ import annotations

import os
import platform
import sys
from typing import List


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
