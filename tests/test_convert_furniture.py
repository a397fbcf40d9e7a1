"""tools/convert_furniture_demos.py on episodes synthesized in the furniture-bench pickle format."""
from __future__ import annotations

import gzip
import json
import lzma
import math
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from dpft.errors import DpftError
from tools.convert_furniture_demos import convert_furniture_demos, main

S45 = math.sqrt(0.5)
IDENTITY_Q = [0.0, 0.0, 0.0, 1.0]
Z90_Q = [0.0, 0.0, S45, S45]


def make_episode(T, seed, furniture="one_leg", flat_state=False, images=(10, 8), channel_first=False,
                 parts_dim=42, success=True, task_key="furniture", extra_last_obs=True):
    """An episode dict as furniture_bench's DataCollector.save writes it (observations has T + 1 entries)."""
    rng = np.random.default_rng(seed)
    observations = []
    for t in range(T + 1 if extra_last_obs else T):
        quat = IDENTITY_Q if t % 2 == 0 else Z90_Q
        rs = {
            "ee_pos": rng.uniform(0.3, 0.6, 3).astype(np.float32),
            "ee_quat": np.array(quat, np.float32),
            "ee_pos_vel": rng.normal(0, 0.1, 3).astype(np.float32),
            "ee_ori_vel": rng.normal(0, 0.1, 3).astype(np.float32),
            "gripper_width": np.array(0.01 * (t + 1), np.float32),  # 0-d: the collector squeezes (1, 1)
            "joint_positions": rng.normal(0, 1, 7).astype(np.float32),
            "joint_velocities": rng.normal(0, 1, 7).astype(np.float32),
            "joint_torques": rng.normal(0, 1, 7).astype(np.float32),
        }
        if flat_state:  # ResiP rollouts: the 14-D concatenation
            rs = np.concatenate([rs[k].reshape(-1) for k in ("ee_pos", "ee_quat", "ee_pos_vel", "ee_ori_vel",
                                                             "gripper_width")])
        shape = (3,) + images if channel_first else images + (3,)
        observations.append({
            "robot_state": rs,
            "parts_poses": rng.normal(0, 0.2, parts_dim).astype(np.float32),
            "color_image1": rng.integers(0, 256, shape, dtype=np.uint8),
            "color_image2": rng.integers(0, 256, shape, dtype=np.uint8),
        })
    actions = [np.concatenate([rng.normal(0, 0.005, 3), IDENTITY_Q, [-1.0]]).astype(np.float32) for _ in range(T)]
    return {
        "observations": observations,
        "actions": actions,
        "rewards": [0.0] * (T - 1) + [1.0],
        "skills": [0] * T,
        "success": success,
        task_key: furniture,
        "error": False,
        "error_description": "",
    }


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = lzma.open if path.name.endswith(".xz") else gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wb") as fh:
        pickle.dump(data, fh)
    return path


def rot6d_z(a):
    return [math.cos(a), -math.sin(a), 0.0, math.sin(a), math.cos(a), 0.0]


@pytest.fixture
def demo_dir(tmp_path):
    a = make_episode(5, seed=0)
    # hand-made actions: step 0 from identity, step 1 from 90 deg about z
    a["actions"][0] = np.array([0.05, -0.01, 0.0, 0.0, 0.0, S45, S45, -0.3], np.float32)  # 90 deg z, clipped
    a["actions"][1] = np.array([0.0, 0.0, -0.03, math.sin(0.05), 0.0, 0.0, math.cos(0.05), 0.5], np.float32)
    write(tmp_path / "raw" / "a_ep.pkl", a)
    write(tmp_path / "raw" / "sub" / "b_ep.pkl.xz", make_episode(4, seed=1))
    write(tmp_path / "raw" / "sub" / "c_ep.pkl.gz", make_episode(3, seed=2, flat_state=True, task_key="task"))
    return tmp_path


def test_converts_pickles_to_robomimic_hdf5(demo_dir):
    out = demo_dir / "one_leg.hdf5"
    summary = convert_furniture_demos(demo_dir / "raw", out, "one_leg", include_images=True, valid_ratio=0.34)
    assert summary["num_demos"] == 3 and summary["num_samples"] == 12
    src = pickle.load(open(demo_dir / "raw" / "a_ep.pkl", "rb"))
    with h5py.File(out, "r") as f:
        assert sorted(f["data"]) == ["demo_0", "demo_1", "demo_2"]
        d0 = f["data/demo_0"]
        rs = d0["obs/robot_state"][()]
        assert rs.shape == (5, 16) and rs.dtype == np.float32
        o0, o1 = src["observations"][0]["robot_state"], src["observations"][1]["robot_state"]
        np.testing.assert_allclose(rs[0, :3], o0["ee_pos"])
        np.testing.assert_allclose(rs[0, 3:9], [1, 0, 0, 0, 1, 0], atol=1e-7)  # identity
        np.testing.assert_allclose(rs[1, 3:9], [0, -1, 0, 1, 0, 0], atol=1e-6)  # 90 deg about z: rows of R
        np.testing.assert_allclose(rs[0, 9:12], o0["ee_pos_vel"])
        np.testing.assert_allclose(rs[0, 12:15], o0["ee_ori_vel"])
        np.testing.assert_allclose(rs[:, 15], [0.01, 0.02, 0.03, 0.04, 0.05], rtol=1e-6)
        parts = d0["obs/parts_poses"][()]
        assert parts.shape == (5, 42)  # the 6th (after the last action) observation is dropped
        np.testing.assert_array_equal(parts, np.stack([o["parts_poses"] for o in src["observations"][:5]]))
        for key in ("color_image1", "color_image2"):
            img = d0["obs/%s" % key][()]
            assert img.dtype == np.uint8 and img.shape == (5, 10, 8, 3)
            np.testing.assert_array_equal(img, np.stack([o[key] for o in src["observations"][:5]]))
        act = d0["actions"][()]
        assert act.shape == (5, 10) and act.dtype == np.float32
        # step 0: ee at identity; delta pos x clipped to 0.025; 90 deg about z clipped to 0.35 rad; gripper sign
        np.testing.assert_allclose(act[0, :3], o0["ee_pos"] + np.array([0.025, -0.01, 0.0]), atol=1e-6)
        np.testing.assert_allclose(act[0, 3:9], rot6d_z(0.35), atol=1e-6)
        assert act[0, 9] == -1.0
        # step 1: ee at 90 deg about z; delta 0.1 rad about x acts in the end-effector frame: Rz(90) Rx(0.1)
        c, s = math.cos(0.1), math.sin(0.1)
        np.testing.assert_allclose(act[1, :3], o1["ee_pos"] + np.array([0.0, 0.0, -0.025]), atol=1e-6)
        np.testing.assert_allclose(act[1, 3:9], [0, -c, s, 1, 0, 0], atol=1e-6)
        assert act[1, 9] == 1.0
        np.testing.assert_array_equal(d0["rewards"][()], [0, 0, 0, 0, 1])
        np.testing.assert_array_equal(d0["dones"][()], [0, 0, 0, 0, 1])
        assert d0.attrs["num_samples"] == 5 and d0.attrs["success"] == 1
        assert d0.attrs["source_file"].endswith("a_ep.pkl")
        # demo_1 (.pkl.xz) and demo_2 (.pkl.gz, flat robot_state, "task" key)
        assert f["data/demo_1/actions"].shape == (4, 10) and f["data/demo_2/obs/robot_state"].shape == (3, 16)
        c_src = pickle.load(gzip.open(demo_dir / "raw" / "sub" / "c_ep.pkl.gz", "rb"))
        np.testing.assert_allclose(f["data/demo_2/obs/robot_state"][:, :3],
                                   np.stack([o["robot_state"][:3] for o in c_src["observations"][:3]]))
        assert f["data"].attrs["total"] == 12
        env_args = json.loads(f["data"].attrs["env_args"])
        assert env_args["env_name"] == "FurnitureRLSim-one_leg" and env_args["type"] == "furniture"
        assert env_args["env_kwargs"]["furniture"] == "one_leg" and env_args["env_kwargs"]["randomness"] == "low"
        assert env_args["env_kwargs"]["action_type"] == "pos" and env_args["env_kwargs"]["act_rot_repr"] == "rot_6d"
        train = [x.decode() for x in f["mask/train"][()]]
        valid = [x.decode() for x in f["mask/valid"][()]]
    assert len(valid) == 1 and len(train) == 2
    assert sorted(train + valid) == ["demo_0", "demo_1", "demo_2"]
    assert summary["train"] == train and summary["valid"] == valid


def test_split_is_seeded_and_images_are_optional(demo_dir):
    a = convert_furniture_demos(demo_dir / "raw", demo_dir / "a.hdf5", "one_leg", valid_ratio=0.5, seed=3)
    b = convert_furniture_demos(demo_dir / "raw", demo_dir / "b.hdf5", "one_leg", valid_ratio=0.5, seed=3)
    assert a["valid"] == b["valid"] and len(a["valid"]) == 2  # round(1.5) = 2
    with h5py.File(demo_dir / "a.hdf5", "r") as f:
        assert sorted(f["data/demo_0/obs"]) == ["parts_poses", "robot_state"]
    splits = {tuple(convert_furniture_demos(demo_dir / "raw", demo_dir / ("s%d.hdf5" % s), "one_leg",
                                            valid_ratio=0.34, seed=s)["valid"]) for s in range(8)}
    assert len(splits) > 1  # the seed matters


def test_channel_first_images_and_10d_absolute_actions(tmp_path):
    ep = make_episode(3, seed=5, channel_first=True)
    raw_actions = [np.array([0.4, 0.1, 0.2, 2.0, 0.0, 0.0, 1.0, 1.0, 0.0, -0.5], np.float32) for _ in range(3)]
    ep["actions"] = raw_actions
    write(tmp_path / "ep.pkl", ep)
    convert_furniture_demos(tmp_path / "ep.pkl", tmp_path / "out.hdf5", "one_leg", include_images=True, valid_ratio=0)
    with h5py.File(tmp_path / "out.hdf5", "r") as f:
        img = f["data/demo_0/obs/color_image1"][()]
        assert img.shape == (3, 10, 8, 3)
        np.testing.assert_array_equal(img[0], np.transpose(ep["observations"][0]["color_image1"], (1, 2, 0)))
        act = f["data/demo_0/actions"][()]
        assert len(f["mask/valid"][()]) == 0 and len(f["mask/train"][()]) == 1
    # rows (2, 0, 0) and (1, 1, 0) -> Gram-Schmidt -> identity rows
    np.testing.assert_allclose(act[:, :3], [[0.4, 0.1, 0.2]] * 3, atol=1e-7)
    np.testing.assert_allclose(act[:, 3:9], [[1, 0, 0, 0, 1, 0]] * 3, atol=1e-7)
    np.testing.assert_array_equal(act[:, 9], [-1, -1, -1])


def test_only_success_skips_failures(tmp_path):
    write(tmp_path / "ok.pkl", make_episode(3, seed=0))
    write(tmp_path / "fail.pkl", make_episode(4, seed=1, success=False))
    summary = convert_furniture_demos(tmp_path, tmp_path / "out.hdf5", "one_leg", only_success=True)
    assert summary["num_demos"] == 1 and summary["num_samples"] == 3
    assert summary["skipped"] == [(str(tmp_path / "fail.pkl"), "not successful")]


def test_bad_inputs_raise_dpft_errors_naming_the_file(tmp_path):
    out = tmp_path / "out.hdf5"
    write(tmp_path / "lamp" / "ep.pkl", make_episode(3, seed=0, furniture="lamp", parts_dim=28))
    with pytest.raises(DpftError, match=r"ep\.pkl is a 'lamp' episode.*'one_leg'"):
        convert_furniture_demos(tmp_path / "lamp", out, "one_leg")
    write(tmp_path / "old" / "ep.pkl", make_episode(3, seed=0, parts_dim=35))
    with pytest.raises(DpftError, match="parts_poses has 35 values.*obstacle.*expects 42"):
        convert_furniture_demos(tmp_path / "old", out, "one_leg")
    ep = make_episode(3, seed=0)
    ep["observations"] = ep["observations"][:2]
    write(tmp_path / "short" / "ep.pkl", ep)
    with pytest.raises(DpftError, match="2 observations for 3 actions"):
        convert_furniture_demos(tmp_path / "short", out, "one_leg")
    ep = make_episode(3, seed=0)
    ep["actions"][1][4] = np.nan
    write(tmp_path / "nan" / "ep.pkl", ep)
    with pytest.raises(DpftError, match="'actions' contains NaN"):
        convert_furniture_demos(tmp_path / "nan", out, "one_leg")
    ep = make_episode(3, seed=0)
    for o in ep["observations"]:
        del o["color_image2"]
    write(tmp_path / "noimg" / "ep.pkl", ep)
    with pytest.raises(DpftError, match="has no 'color_image2'"):
        convert_furniture_demos(tmp_path / "noimg", out, "one_leg", include_images=True)
    write(tmp_path / "noact" / "ep.pkl", {"observations": []})
    with pytest.raises(DpftError, match="lacks the key 'actions'"):
        convert_furniture_demos(tmp_path / "noact", out, "one_leg")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DpftError, match="No FurnitureBench episode files"):
        convert_furniture_demos(tmp_path / "empty", out, "one_leg")
    with pytest.raises(DpftError, match="Unknown FurnitureBench task 'sofa'"):
        convert_furniture_demos(tmp_path / "lamp", out, "sofa")
    out.write_bytes(b"")
    with pytest.raises(DpftError, match="already exists"):
        convert_furniture_demos(tmp_path / "lamp", out, "lamp")
    assert sorted(p.name for p in tmp_path.iterdir() if ".tmp-" in p.name) == []  # no temp files left behind


def test_cli(demo_dir, capsys):
    out = demo_dir / "cli.hdf5"
    assert main(["--input", str(demo_dir / "raw"), "--out", str(out), "--task", "one_leg", "--images",
                 "--valid-ratio", "0.34"]) == 0
    assert "3 demos, 12 samples (train 2, valid 1" in capsys.readouterr().out
    with h5py.File(out, "r") as f:
        assert "color_image1" in f["data/demo_0/obs"]
    assert main(["--input", str(demo_dir / "raw"), "--out", str(out), "--task", "one_leg"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_output_loads_with_dpft_loader_and_describe(demo_dir):
    from dpft.data.hdf5 import describe, load_demos, read_env_args

    out = demo_dir / "load.hdf5"
    convert_furniture_demos(demo_dir / "raw", out, "one_leg", include_images=True, valid_ratio=0.34)
    demos = load_demos(out, ["robot_state", "parts_poses", "color_image1"])
    assert demos.num_demos == 3 and demos.num_samples == 12 and demos.obs_dim == 58 and demos.action_dim == 10
    assert demos.images["color_image1"].shape == (12, 10, 8, 3)
    np.testing.assert_array_equal(demos.episode_ends, [5, 9, 12])
    with h5py.File(out, "r") as f:
        np.testing.assert_array_equal(demos.state[:5, :16], f["data/demo_0/obs/robot_state"][()])
        np.testing.assert_array_equal(demos.state[:5, 16:], f["data/demo_0/obs/parts_poses"][()])
    assert demos.env_args["type"] == "furniture" and read_env_args(out)["env_name"] == "FurnitureRLSim-one_leg"
    train = load_demos(out, ["robot_state", "parts_poses"], filter_key="train")
    valid = load_demos(out, ["robot_state", "parts_poses"], filter_key="valid")
    assert train.num_demos == 2 and valid.num_demos == 1
    d = describe(out)
    assert (d["num_demos"], d["num_samples"], d["total_attr"], d["action_dim"]) == (3, 12, 12, 10)
    assert d["filter_keys"] == {"train": 2, "valid": 1} and d["extras"]["rewards"] == 3 and d["extras"]["dones"] == 3
    assert d["obs"]["color_image2"]["kind"] == "image" and d["obs"]["robot_state"]["shape"] == (16,)
    assert d["warnings"] == []  # absolute actions (m, rot6d, gripper sign) lie inside [-1, 1]


def test_furniture_sim_full_demos_get_the_nominal_obstacle_pose_when_asked(tmp_path, capsys):
    """FurnitureSimFull-v0 demos (the fork's, ResiP's and clvrai's collectors) have num_parts * 7 parts_poses values
    (35 for one_leg): refused with a message naming the option, accepted with it, and reported."""
    ep = make_episode(3, seed=0, parts_dim=35)
    write(tmp_path / "full" / "ep.pkl", ep)
    out = tmp_path / "full.hdf5"
    with pytest.raises(DpftError, match="FurnitureSimFull-v0.*--append-obstacle") as info:
        convert_furniture_demos(tmp_path / "full", out, "one_leg")
    assert "clvrai's original FurnitureSim" not in str(info.value)
    summary = convert_furniture_demos(tmp_path / "full", out, "one_leg", append_obstacle=True)
    assert summary["obstacle_appended"] == 1
    with h5py.File(out, "r") as f:
        parts = f["data/demo_0/obs/parts_poses"][()]
        conversion = json.loads(f["data"].attrs["conversion"])
    assert parts.shape == (3, 42)
    np.testing.assert_allclose(parts[:, :35], np.stack([o["parts_poses"] for o in ep["observations"][:3]]))
    # position (0, 0.38, -0.015) and a rotation of pi about x, hand-derived from the fork's create_envs
    np.testing.assert_allclose(parts[:, 35:], [[0.0, 0.38, -0.015, 1.0, 0.0, 0.0, 0.0]] * 3)
    assert conversion["append_obstacle"] is True and conversion["obstacle_appended_episodes"] == 1
    # 42-value files are left as they are, even with the option
    write(tmp_path / "rl" / "ep.pkl", make_episode(3, seed=1))
    summary = convert_furniture_demos(tmp_path / "rl", tmp_path / "rl.hdf5", "one_leg", append_obstacle=True)
    assert summary["obstacle_appended"] == 0
    assert main(["--input", str(tmp_path / "full"), "--out", str(tmp_path / "cli.hdf5"), "--task", "one_leg",
                 "--append-obstacle"]) == 0
    assert "appended the obstacle's nominal pose" in capsys.readouterr().out


def test_nominal_obstacle_pose_is_the_fork_transform_of_its_creation_pose():
    """Recompute OBSTACLE_FRONT_NOMINAL_POSE from the fork's constants (create_envs, config.py) with its formulas."""
    from dpft.envs.furniture import OBSTACLE_FRONT_NOMINAL_POSE
    from dpft.envs.rotation import matrix_to_quat_xyzw

    def get_mat(pos, angles):  # furniture_bench/utils/pose.py get_mat / rot_mat (R = Rz Ry Rx)
        x, y, z = angles
        rx = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
        ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
        rz = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
        m = np.eye(4)
        m[:3, :3] = rz @ ry @ rx
        m[:3, 3] = pos
        return m

    table_surface_z = 0.4 + 0.015
    franka = np.array([0.5 * -0.8 + 0.1, 0.0, table_surface_z])
    tag_from_robot = get_mat((0.23 + 0.0715, 0, 0), (np.pi, 0, np.pi / 2))
    base_tag = franka + np.array([0.23 + 0.0715, 0.0, 0.0])
    obstacle_sim = get_mat((base_tag[0] + 0.37 + 0.01, 0.0, table_surface_z + 0.015), (0, 0, 0.5 * np.pi))
    april = np.linalg.inv(tag_from_robot) @ np.linalg.inv(get_mat(franka, (0, 0, 0))) @ obstacle_sim
    np.testing.assert_allclose(OBSTACLE_FRONT_NOMINAL_POSE[:3], april[:3, 3], atol=1e-9)
    quat = matrix_to_quat_xyzw(torch.as_tensor(april[:3, :3])).numpy()
    sign = np.sign(quat[np.argmax(np.abs(quat))])
    np.testing.assert_allclose(OBSTACLE_FRONT_NOMINAL_POSE[3:], quat * sign, atol=1e-7)
