"""Pick and check the OpenGL backend MuJoCo renders with (headless EGL, OSMesa, or a desktop GLFW).

MuJoCo (and robosuite, which copies it) chooses its GL backend from ``MUJOCO_GL`` once, when the module is
first imported, so :func:`setup_rendering` must run before ``import mujoco`` / ``import robosuite`` in a
process that will render. robosuite even sets ``MUJOCO_GL=egl`` itself on import, which is why the adapters
in this package call :func:`setup_rendering` before they import it.

Rules (see the reference notes on headless rendering):

* an existing ``MUJOCO_GL`` is respected: only that backend is probed, and a failure says how to fix it;
* on Linux the default is ``egl``, falling back to ``osmesa`` (``PYOPENGL_PLATFORM`` is set to match);
* on macOS / Windows nothing is set (MuJoCo's default GLFW / CGL / WGL is right there);
* each candidate is probed in a *child process* that creates a tiny ``mujoco.Renderer`` on a one-geom model
  and reads ``GL_RENDERER``: the parent never opens a GL context (forked workers inheriting one crash), and a
  backend that fails cannot poison the parent's ``import mujoco``;
* the result is cached in the process and exported as ``DPFT_RENDER_BACKEND`` / ``DPFT_GL_RENDERER`` so worker
  processes that inherit the environment do not probe again;
* the chosen backend and its ``GL_RENDERER`` string are logged once: ``llvmpipe`` means software rendering
  (about 30-60 ms per robosuite frame), which explains slow image rollouts.

Example::

    from dpft.envs.render import setup_rendering
    backend = setup_rendering()          # e.g. "egl"; call before importing mujoco / robosuite
"""
from __future__ import annotations

import logging
import os
import platform
import subprocess
import sys
from typing import Dict, List, Optional, Tuple

from dpft.errors import DpftError

logger = logging.getLogger(__name__)

#: value returned by ``setup_rendering(require=False)`` when no backend works
NO_BACKEND = "none"

_ENV_BACKEND = "DPFT_RENDER_BACKEND"
_ENV_RENDERER = "DPFT_GL_RENDERER"

#: the probe run in a child process: prints one line "GL_RENDERER=<string>" on success
_PROBE_SCRIPT = r"""
import mujoco
model = mujoco.MjModel.from_xml_string(
    "<mujoco><worldbody><light pos='0 0 1'/><geom type='sphere' size='0.1'/></worldbody></mujoco>")
data = mujoco.MjData(model)
renderer = mujoco.Renderer(model, 8, 8)
name = "unknown"
try:
    from OpenGL import GL
    raw = GL.glGetString(GL.GL_RENDERER)
    if raw:
        name = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
except Exception:
    pass
mujoco.mj_forward(model, data)
renderer.update_scene(data)
image = renderer.render()
renderer.close()
assert image.shape == (8, 8, 3), image.shape
print("GL_RENDERER=" + name)
"""

_cache = {}  # type: Dict[str, Tuple[str, str]]


def _platform_env(backend: str) -> Dict[str, str]:
    """Environment variables that select ``backend`` for MuJoCo and PyOpenGL."""
    env = {"MUJOCO_GL": backend}
    if backend in ("egl", "osmesa"):
        env["PYOPENGL_PLATFORM"] = backend
    return env


def probe_backend(backend: str, timeout: float = 60.0) -> Tuple[bool, str]:
    """Try rendering with ``backend`` (``"egl"``, ``"osmesa"``, ``"glfw"``, or ``""`` for MuJoCo's default) in a
    child process.

    Returns:
        ``(True, GL_RENDERER string)`` on success, ``(False, last line of the error)`` on failure.
    """
    env = dict(os.environ)
    env.pop("PYOPENGL_PLATFORM", None)
    if backend:
        env.update(_platform_env(backend))
    else:
        env.pop("MUJOCO_GL", None)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _PROBE_SCRIPT], env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return False, "the probe did not finish within {:.0f} s".format(timeout)
    except OSError as e:  # pragma: no cover - the interpreter itself cannot start
        return False, "could not start the probe process: {}".format(e)
    if proc.returncode == 0:
        for line in proc.stdout.splitlines():
            if line.startswith("GL_RENDERER="):
                return True, line[len("GL_RENDERER="):].strip()
        return True, "unknown"
    lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
    return False, lines[-1] if lines else "exit status {}".format(proc.returncode)


def _imported_backend() -> Optional[str]:
    """The GL backend an already imported ``mujoco`` module selected (None when mujoco is not imported)."""
    if "mujoco" not in sys.modules:
        return None
    try:
        from mujoco.rendering.classic import gl_context  # type: ignore
    except Exception:  # pragma: no cover - older mujoco layouts
        try:
            from mujoco import gl_context  # type: ignore
        except Exception:
            return None
    cls = getattr(gl_context, "GLContext", None)
    if cls is None:
        return NO_BACKEND
    module = getattr(cls, "__module__", "")
    for name in ("egl", "osmesa", "glfw", "cgl", "wgl"):
        if ".{}".format(name) in module:
            return name
    return None


def _install_hint(tried: List[str]) -> str:
    hints = []
    if "egl" in tried:
        hints.append("for EGL: apt-get install libegl1 libgl1 (with an NVIDIA GPU the driver provides libEGL_nvidia)")
    if "osmesa" in tried:
        hints.append("for OSMesa (CPU software rendering): apt-get install libosmesa6")
    if not hints:
        hints.append("unset MUJOCO_GL to let dpft pick egl or osmesa, or install your platform's OpenGL drivers")
    return "; ".join(hints)


def setup_rendering(require: bool = True) -> str:
    """Choose, export and check the MuJoCo GL backend; call it before importing mujoco or robosuite.

    Args:
        require: raise :class:`DpftError` when no backend works (pass False where rendering is optional, e.g. a
            low-dim environment: the failure is then only logged and ``"none"`` returned).

    Returns:
        the backend name: ``"egl"``, ``"osmesa"``, ``"glfw"``, ...; ``""`` means MuJoCo's platform default
        (macOS / Windows); ``"none"`` when nothing works and ``require`` is False.

    Raises:
        DpftError: no backend could render (``require=True``); the message names every backend tried, its error
            and the packages to install.
    """
    requested = os.environ.get("MUJOCO_GL", "").strip().lower()
    key = requested or "<default>"
    if key in _cache:
        backend, renderer = _cache[key]
        if backend == NO_BACKEND and require:
            _raise_no_backend(requested, [renderer])
        return backend

    inherited = os.environ.get(_ENV_BACKEND)
    if requested and inherited == requested:
        # a parent process already probed this backend and exported the result
        renderer = os.environ.get(_ENV_RENDERER, "unknown")
        _cache[key] = (requested, renderer)
        logger.debug("rendering: MUJOCO_GL=%s (probed by a parent process, GL_RENDERER=%s)", requested, renderer)
        return requested

    if requested:
        candidates = [requested]
    elif platform.system() == "Linux":
        candidates = ["egl", "osmesa"]
    else:
        candidates = [""]

    errors = []
    for backend in candidates:
        ok, detail = probe_backend(backend)
        if ok:
            _export(backend, detail)
            _cache[key] = (backend, detail)
            _cache[backend or "<default>"] = (backend, detail)
            _log_choice(backend, detail)
            _warn_if_mujoco_disagrees(backend)
            return backend
        errors.append("{} ({})".format(backend or "platform default", detail))

    _cache[key] = (NO_BACKEND, "; ".join(errors))
    if require:
        _raise_no_backend(requested, errors)
    logger.warning("rendering: no OpenGL backend works (%s); image observations and videos are unavailable. %s",
                   "; ".join(errors), _install_hint([c for c in candidates if c]))
    return NO_BACKEND


def _raise_no_backend(requested: str, errors: List[str]) -> None:
    tried = [requested] if requested else (["egl", "osmesa"] if platform.system() == "Linux" else [])
    how = ("MUJOCO_GL={} was set in the environment, so only it was tried; unset it to let dpft try egl and then "
           "osmesa. ".format(requested) if requested else "")
    raise DpftError(
        "No OpenGL backend can render MuJoCo scenes (needed for image observations and videos). Tried: {}. {}"
        "To fix: {}. Check afterwards with `dpft info`.".format("; ".join(errors), how, _install_hint(tried))
    )


def _export(backend: str, renderer: str) -> None:
    if backend:
        os.environ.update(_platform_env(backend))
    os.environ[_ENV_BACKEND] = backend
    os.environ[_ENV_RENDERER] = renderer


def _log_choice(backend: str, renderer: str) -> None:
    software = any(s in renderer.lower() for s in ("llvmpipe", "softpipe", "swrast", "software"))
    logger.info("rendering: MUJOCO_GL=%s, GL_RENDERER=%s%s", backend or "(platform default)", renderer,
                " (software rendering on the CPU: expect 30-60 ms per robosuite frame)" if software else "")


def _warn_if_mujoco_disagrees(backend: str) -> None:
    imported = _imported_backend()
    if imported is not None and backend and imported != backend:
        logger.warning(
            "rendering: mujoco was imported before setup_rendering() and picked the %s backend, not %s; rendering "
            "in this process may fail. Call dpft.envs.render.setup_rendering() before importing mujoco or robosuite.",
            imported, backend,
        )


def rendering_info() -> Dict[str, str]:
    """What :func:`setup_rendering` chose in this process (empty values before it ran)."""
    return {
        "backend": os.environ.get(_ENV_BACKEND, ""),
        "gl_renderer": os.environ.get(_ENV_RENDERER, ""),
        "MUJOCO_GL": os.environ.get("MUJOCO_GL", ""),
    }


def _clear_cache() -> None:
    """Forget probe results (tests)."""
    _cache.clear()
