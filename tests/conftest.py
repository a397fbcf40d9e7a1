"""Shared pytest fixtures: tiny synthetic robomimic files (see tests/synth.py)."""
from __future__ import annotations

import pytest

from tests.synth import write_robomimic_hdf5


@pytest.fixture
def tiny_hdf5(tmp_path):
    """Low-dim robomimic file: 4 demos of 12/15/18/21 steps, obs robot0_eef_pos (3), robot0_eef_quat (4),
    robot0_gripper_qpos (2), object (10), actions (7), filter keys train (demo_0..2) / valid (demo_3)."""
    path = tmp_path / "tiny_low_dim.hdf5"
    write_robomimic_hdf5(path)
    return path


@pytest.fixture
def tiny_image_hdf5(tmp_path):
    """Same as ``tiny_hdf5`` plus uint8 agentview_image (T, 16, 16, 3)."""
    path = tmp_path / "tiny_image.hdf5"
    write_robomimic_hdf5(path, images=True, image_shape=(16, 16, 3))
    return path


@pytest.fixture(scope="module")
def rs():
    """The ``dpft.envs.robosuite_env`` module with the GL backend chosen first (skips without robosuite)."""
    from dpft.envs.render import setup_rendering

    setup_rendering(require=False)  # pick the GL backend before robosuite imports mujoco
    pytest.importorskip("robosuite")
    from dpft.envs import robosuite_env

    return robosuite_env


@pytest.fixture(autouse=True)
def _keep_threads():
    """Pretraining and fine-tuning set torch's thread count (num_threads=1 in tests): restore it after each test."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
