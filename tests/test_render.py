"""setup_rendering: respects MUJOCO_GL, egl -> osmesa fallback, caching, inherited probes, error messages."""
from __future__ import annotations

import logging
import platform

import pytest

from dpft.errors import DpftError
from dpft.envs import render

_VARS = ("MUJOCO_GL", "PYOPENGL_PLATFORM", "DPFT_RENDER_BACKEND", "DPFT_GL_RENDERER")


@pytest.fixture
def clean(monkeypatch):
    """Empty probe cache and rendering variables; both restored afterwards."""
    saved = dict(render._cache)
    render._clear_cache()
    for var in _VARS:
        monkeypatch.delenv(var, raising=False)
    yield monkeypatch
    render._clear_cache()
    render._cache.update(saved)


def _fake_probe(monkeypatch, results):
    """Replace the child-process probe: ``results[backend] = (ok, detail)``; returns the list of probed backends."""
    calls = []

    def probe(backend, timeout=60.0):
        calls.append(backend)
        return results[backend]

    monkeypatch.setattr(render, "probe_backend", probe)
    return calls


linux_only = pytest.mark.skipif(platform.system() != "Linux", reason="egl/osmesa fallback is Linux-only")


@linux_only
def test_default_tries_egl_then_osmesa(clean):
    import os

    calls = _fake_probe(clean, {"egl": (False, "EGL_NOT_INITIALIZED"), "osmesa": (True, "llvmpipe (LLVM 15)")})
    assert render.setup_rendering() == "osmesa"
    assert calls == ["egl", "osmesa"]
    assert os.environ["MUJOCO_GL"] == "osmesa" and os.environ["PYOPENGL_PLATFORM"] == "osmesa"
    assert render.rendering_info() == {"backend": "osmesa", "gl_renderer": "llvmpipe (LLVM 15)", "MUJOCO_GL": "osmesa"}
    # cached: no second probe
    assert render.setup_rendering() == "osmesa"
    assert calls == ["egl", "osmesa"]


@linux_only
def test_egl_preferred_and_gl_renderer_logged(clean, caplog):
    calls = _fake_probe(clean, {"egl": (True, "llvmpipe (LLVM 15.0.6, 256 bits)"), "osmesa": (True, "x")})
    with caplog.at_level(logging.INFO, logger="dpft.envs.render"):
        assert render.setup_rendering() == "egl"
    assert calls == ["egl"]
    assert "GL_RENDERER=llvmpipe (LLVM 15.0.6, 256 bits)" in caplog.text
    assert "software rendering" in caplog.text


def test_existing_mujoco_gl_is_respected(clean):
    import os

    clean.setenv("MUJOCO_GL", "osmesa")
    calls = _fake_probe(clean, {"osmesa": (False, "AttributeError: 'NoneType' object has no attribute 'glGetError'"),
                                "egl": (True, "llvmpipe")})
    with pytest.raises(DpftError) as err:
        render.setup_rendering()
    assert calls == ["osmesa"]  # egl was NOT tried: the user chose osmesa
    msg = str(err.value)
    assert "MUJOCO_GL=osmesa was set" in msg and "glGetError" in msg and "apt-get install libosmesa6" in msg
    assert os.environ["MUJOCO_GL"] == "osmesa"


def test_no_backend_message_names_everything_tried(clean):
    if platform.system() != "Linux":
        pytest.skip("Linux candidates")
    _fake_probe(clean, {"egl": (False, "eglInitialize failed"), "osmesa": (False, "libOSMesa.so not found")})
    with pytest.raises(DpftError) as err:
        render.setup_rendering()
    msg = str(err.value)
    for part in ("egl (eglInitialize failed)", "osmesa (libOSMesa.so not found)", "apt-get install libegl1",
                 "apt-get install libosmesa6", "dpft info"):
        assert part in msg, part


def test_optional_rendering_returns_none_and_caches(clean):
    clean.setenv("MUJOCO_GL", "osmesa")
    calls = _fake_probe(clean, {"osmesa": (False, "no libOSMesa")})
    assert render.setup_rendering(require=False) == render.NO_BACKEND
    assert render.setup_rendering(require=False) == render.NO_BACKEND
    assert calls == ["osmesa"]
    with pytest.raises(DpftError, match="no libOSMesa"):  # the cached failure still raises when required
        render.setup_rendering(require=True)
    assert calls == ["osmesa"]


def test_probe_inherited_from_parent_process_is_trusted(clean):
    clean.setenv("MUJOCO_GL", "egl")
    clean.setenv("DPFT_RENDER_BACKEND", "egl")
    clean.setenv("DPFT_GL_RENDERER", "NVIDIA A100")
    calls = _fake_probe(clean, {})
    assert render.setup_rendering() == "egl"
    assert calls == []


def test_real_probe_of_a_disabled_backend_fails(clean):
    # MUJOCO_GL=disable makes mujoco load no GL context at all: the real child-process probe must report failure
    ok, detail = render.probe_backend("disable")
    assert not ok and detail
    clean.setenv("MUJOCO_GL", "disable")
    with pytest.raises(DpftError, match="MUJOCO_GL=disable was set"):
        render.setup_rendering()


def test_real_default_backend(clean):
    """The real probe on this machine (skipped where no GL works, e.g. a container without EGL and OSMesa)."""
    candidates = ["egl", "osmesa"] if platform.system() == "Linux" else [""]
    working = [c for c in candidates if render.probe_backend(c)[0]]
    if not working:
        pytest.skip("no OpenGL backend on this machine")
    backend = render.setup_rendering()
    assert backend == working[0]
    info = render.rendering_info()
    assert info["backend"] == backend and info["gl_renderer"]
