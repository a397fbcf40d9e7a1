"""The user's path through the CLI: demos -> data info -> pretrain -> rollout with video, on real robosuite Lift.

Tiny sizes (2 demos, 30 steps, 1 short episode): this checks that the commands compose and the files they
write decode, not that the policy is good (BENCHMARKS.md has the quickstart's success rate).
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("robosuite")

from dpft.cli import main  # noqa: E402

pytestmark = pytest.mark.robosuite


def test_demos_info_pretrain_rollout_video(tmp_path, capsys):
    data = str(tmp_path / "lift.hdf5")
    run = str(tmp_path / "run")
    out = str(tmp_path / "eval")
    assert main(["demos", "task=lift", "num=2", f"out={data}", "progress=false"]) == 0
    assert main(["data", "info", data]) == 0
    info = capsys.readouterr().out
    assert "Lift" in info and "robot0_eef_pos" in info and "2 demos" in info

    assert main(["pretrain", f"dataset={data}", f"out={run}", "steps=30", "save_every=15", "batch_size=32",
                 "policy.mlp_dims=[32,32,32]", "policy.denoising_steps=5", "val_every=0", "progress=false",
                 "num_threads=1"]) == 0
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["latest", "step_00000015", "step_00000030"]

    assert main(["rollout", f"checkpoint={run}", "episodes=1", "envs=1", "video=true", "max_episode_steps=12",
                 f"out={out}", "progress=false", "video_size=64"]) == 0
    result = json.load(open(os.path.join(out, "result.json")))
    assert result["num_episodes"] == 1 and result["episodes"][0]["seed"] == 100000
    assert result["policy"]["weights"] == "ema"
    episode = result["episodes"][0]
    assert episode["length"] == 12 and not episode["failed"]
    import imageio.v3 as iio

    frames = iio.imread(os.path.join(out, episode["video"]))
    assert frames.shape == (episode["length"] + 1, 64, 64, 3) and frames.dtype == np.uint8
    assert frames.std() > 1.0  # a rendered scene, not a blank frame

    # without out=, the result lands next to the evaluated checkpoint
    assert main(["rollout", f"checkpoint={run}", "episodes=1", "envs=1", "max_episode_steps=3", "progress=false"]) == 0
    default = os.path.join(run, "rollout", "step_00000030", "result.json")
    assert json.load(open(default))["episodes"][0]["length"] == 3


def test_rollout_of_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["rollout", f"checkpoint={tmp_path / 'nope'}", "episodes=1"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


def test_demos_unknown_task_is_a_clear_error(tmp_path, capsys):
    assert main(["demos", "task=stack", "num=1", f"out={tmp_path / 'x.hdf5'}"]) == 2
    err = capsys.readouterr().err
    assert "stack" in err and "lift" in err
    assert not os.path.exists(tmp_path / "x.hdf5")
