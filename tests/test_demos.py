"""make_demos: robomimic HDF5 layout read back with h5py (dtypes, shapes, attrs, env_args, masks), obs/next_obs
consistency, exact per-step playback with reset_to(states[t]), seeding, atomic writes, failures and errors."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from dpft.errors import DpftError
from dpft.envs.demos import LOW_DIM_SUFFIXES, demo_obs_keys, make_demos, split_train_valid

h5py = pytest.importorskip("h5py")

LIFT_KEYS = [
    "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "robot0_gripper_qvel", "robot0_joint_pos",
    "robot0_joint_pos_cos", "robot0_joint_pos_sin", "robot0_joint_vel", "object",
]
LIFT_DIMS = {"robot0_eef_pos": 3, "robot0_eef_quat": 4, "robot0_gripper_qpos": 2, "robot0_gripper_qvel": 2,
             "robot0_joint_pos": 7, "robot0_joint_pos_cos": 7, "robot0_joint_pos_sin": 7, "robot0_joint_vel": 7,
             "object": 10}


# ------------------------------------------------------------------------------------------- no simulator needed
def test_split_train_valid():
    names = ["demo_%d" % i for i in range(10)]
    s = split_train_valid(names, 0.1, seed=0)
    assert len(s["valid"]) == 1 and len(s["train"]) == 9
    assert sorted(s["train"] + s["valid"], key=lambda n: int(n[5:])) == names
    assert split_train_valid(names, 0.1, seed=0) == s  # seeded
    assert any(split_train_valid(names, 0.1, seed=k) != s for k in range(1, 10))
    assert len(split_train_valid(names, 0.25, seed=1)["valid"]) == 2  # int(0.25 * 10)
    assert len(split_train_valid(names[:2], 0.1, seed=0)["valid"]) == 1  # at least one when n >= 2
    assert split_train_valid(names[:1], 0.5, seed=0) == {"train": ["demo_0"]}
    assert split_train_valid(names[:4], 0.0, seed=0) == {"train": names[:4]}
    assert len(split_train_valid(names[:3], 0.9, seed=0)["train"]) == 1  # never empties train


def test_demo_obs_keys_picks_standard_low_dim_keys():
    available = ["object", "robot0_joint_acc", "robot0_eef_quat_site", "robot0_eef_pos", "robot0_joint_vel",
                 "robot1_eef_pos", "agentview_image"]
    assert demo_obs_keys(available) == ["robot0_eef_pos", "robot0_joint_vel", "robot1_eef_pos", "object"]
    assert demo_obs_keys(available, ["agentview_image"])[-1] == "agentview_image"
    assert "eef_vel_lin" in LOW_DIM_SUFFIXES
    with pytest.raises(DpftError, match="'sideview_image' is not produced"):
        demo_obs_keys(available, ["sideview_image"])


def test_bad_arguments_raise_before_any_simulation(tmp_path):
    out = str(tmp_path / "x.hdf5")
    with pytest.raises(DpftError, match=r"no scripted expert for task 'transport'; tasks with experts: can, lift"):
        make_demos("transport", 1, out)
    with pytest.raises(DpftError, match="num .* must be an integer >= 1"):
        make_demos("lift", 0, out)
    with pytest.raises(DpftError, match="noise must be a finite number >= 0"):
        make_demos("lift", 1, out, noise=-1)
    with pytest.raises(DpftError, match=r"valid_ratio must be in \[0, 1\)"):
        make_demos("lift", 1, out, valid_ratio=1.0)
    with pytest.raises(DpftError, match="max_steps must be a positive integer"):
        make_demos("lift", 1, out, max_steps=0)
    assert not os.listdir(tmp_path)


# --------------------------------------------------------------------------------------------------- robosuite
@pytest.fixture(scope="module")
def lift_file(rs, tmp_path_factory):
    out = tmp_path_factory.mktemp("demos") / "lift.hdf5"
    summary = make_demos(task="lift", num=2, out=str(out), seed=0, progress=False)
    return out, summary


def read_demo(path, name):
    with h5py.File(path, "r") as f:
        g = f["data"][name]
        return {
            "obs": {k: g["obs"][k][()] for k in g["obs"]},
            "next_obs": {k: g["next_obs"][k][()] for k in g["next_obs"]},
            **{k: g[k][()] for k in ("actions", "rewards", "dones", "states")},
        }


@pytest.mark.robosuite
def test_file_layout_matches_robomimic(lift_file, rs):
    path, summary = lift_file
    assert summary["path"] == str(path) and summary["kept"] == 2 and summary["attempted"] == 2
    assert summary["success_rate"] == 1.0 and summary["num_train"] == 1 and summary["num_valid"] == 1
    with h5py.File(path, "r") as f:
        assert set(f.keys()) == {"data", "mask"}
        data = f["data"]
        assert sorted(data.keys()) == ["demo_0", "demo_1"]
        env_args = json.loads(data.attrs["env_args"])
        assert env_args["env_name"] == "Lift" and env_args["type"] == 1
        assert env_args.pop("backend") in ("mujoco", "robosuite")  # the physics that made the file
        assert env_args == json.loads(json.dumps(rs.default_env_args("lift")))
        lengths = []
        for i, name in enumerate(["demo_0", "demo_1"]):
            g = data[name]
            n = int(g.attrs["num_samples"])
            lengths.append(n)
            assert g.attrs["seed"] == i  # episode i is seeded seed + i
            assert g.attrs["model_file"].startswith("<mujoco") and "robot0_" in g.attrs["model_file"]
            assert set(g.keys()) == {"obs", "next_obs", "actions", "rewards", "dones", "states"}
            assert sorted(g["obs"].keys()) == sorted(LIFT_KEYS) == sorted(g["next_obs"].keys())
            for k, d in LIFT_DIMS.items():
                assert g["obs"][k].shape == (n, d) and g["obs"][k].dtype == np.float64
                assert g["next_obs"][k].shape == (n, d)
            actions = g["actions"][()]
            assert actions.shape == (n, 7) and actions.dtype == np.float64
            assert np.all(np.abs(actions) <= 1.0)
            rewards, dones = g["rewards"][()], g["dones"][()]
            assert rewards.shape == (n,) and rewards.dtype == np.float64
            assert dones.shape == (n,) and dones.dtype == np.int64
            np.testing.assert_array_equal(dones, np.eye(n, dtype=np.int64)[-1])  # done_mode 1: end of trajectory
            # sparse reward; the demo ends POST_SUCCESS_STEPS after the first success, in a success state
            assert set(np.unique(rewards)) <= {0.0, 1.0} and rewards[0] == 0.0
            assert np.all(rewards[-11:] == 1.0) and rewards[-12] == 0.0
            states = g["states"][()]
            assert states.dtype == np.float64 and states.shape[0] == n
        assert int(data.attrs["total"]) == sum(lengths)
        train = [x.decode() for x in f["mask/train"][()]]
        valid = [x.decode() for x in f["mask/valid"][()]]
        assert f["mask/train"].dtype.kind == "S"
        assert sorted(train + valid) == ["demo_0", "demo_1"] and len(valid) == 1
    env = rs.RobosuiteEnv(env_args)
    try:
        env.reset(seed=0)
        assert states.shape[1] == env.get_state().shape[0]  # (time, qpos, qvel)
    finally:
        env.close()


@pytest.mark.robosuite
def test_next_obs_is_the_following_obs(lift_file):
    path, _ = lift_file
    for name in ("demo_0", "demo_1"):
        d = read_demo(path, name)
        for k in LIFT_KEYS:
            np.testing.assert_array_equal(d["obs"][k][1:], d["next_obs"][k][:-1])


@pytest.mark.robosuite
def test_reset_to_states_reproduces_obs_exactly(lift_file, rs):
    path, _ = lift_file
    d = read_demo(path, "demo_0")
    with h5py.File(path, "r") as f:
        env_args = json.loads(f["data"].attrs["env_args"])
        model_file = f["data/demo_0"].attrs["model_file"]
    env = rs.RobosuiteEnv(env_args)
    try:
        env.reset(seed=0)
        assert env.env.sim.model.get_xml() == model_file
        for t in range(len(d["actions"])):
            obs = env.reset_to(d["states"][t])
            for k in LIFT_KEYS:
                np.testing.assert_array_equal(obs[k], d["obs"][k][t], err_msg="%s at t=%d" % (k, t))
        # the recorded last action from the recorded last state leaves the cube lifted
        env.reset_to(d["states"][-1])
        _, _, _, _, info = env.step(d["actions"][-1])
        assert info["success"]
    finally:
        env.close()


@pytest.mark.robosuite
def test_same_seed_same_file_other_seed_differs(lift_file, tmp_path):
    path, _ = lift_file
    again = tmp_path / "again.hdf5"
    other = tmp_path / "other.hdf5"
    make_demos("lift", 2, str(again), seed=0, progress=False)
    make_demos("lift", 2, str(other), seed=5, progress=False)
    for name in ("demo_0", "demo_1"):
        a, b, c = read_demo(path, name), read_demo(again, name), read_demo(other, name)
        for k in ("actions", "states", "rewards", "dones"):
            np.testing.assert_array_equal(a[k], b[k])
        for k in LIFT_KEYS:
            np.testing.assert_array_equal(a["obs"][k], b["obs"][k])
        assert a["states"][0].shape == c["states"][0].shape and not np.array_equal(a["states"][0], c["states"][0])
    with h5py.File(again, "r") as fa, h5py.File(path, "r") as fp, h5py.File(other, "r") as fo:
        assert fa["mask/valid"][()].tolist() == fp["mask/valid"][()].tolist()
        assert [fo["data/demo_%d" % i].attrs["seed"] for i in range(2)] == [5, 6]


@pytest.mark.robosuite
def test_describe_accepts_the_file(lift_file):
    hdf5 = pytest.importorskip("dpft.data.hdf5")
    if not hasattr(hdf5, "describe"):
        pytest.skip("dpft.data.hdf5.describe not available")
    path, summary = lift_file
    d = hdf5.describe(str(path))
    assert d["num_demos"] == 2 and d["num_samples"] == summary["samples"] == d["total_attr"]
    assert d["action_dim"] == 7 and d["filter_keys"] == {"train": 1, "valid": 1}
    assert d["env_args"]["env_name"] == "Lift"
    assert d["obs"]["object"]["shape"] == (10,) and d["obs"]["object"]["kind"] == "low_dim"
    assert d["extras"] == {"rewards": 2, "dones": 2, "states": 2, "next_obs": 2}
    assert d["warnings"] == []


@pytest.mark.robosuite
def test_failures_are_dropped_then_error_or_kept(rs, tmp_path, capsys):
    out = tmp_path / "short.hdf5"
    # 5 steps are too few to lift the cube: 3 * num attempts, then an error and no file
    with pytest.raises(DpftError, match=r"only 0 of 3 episodes succeeded .*keep_failures=True"):
        make_demos("lift", 1, str(out), max_steps=5, progress=False)
    assert not os.listdir(tmp_path)
    summary = make_demos("lift", 2, str(out), max_steps=5, keep_failures=True, progress=True)
    assert "lift demos" in capsys.readouterr().err  # tqdm bar
    assert summary["kept"] == 2 and summary["successes"] == 0 and summary["samples"] == 10
    with h5py.File(out, "r") as f:
        for name in ("demo_0", "demo_1"):
            g = f["data"][name]
            assert g.attrs["num_samples"] == 5 and not g.attrs["success"]
            assert g["dones"][()].tolist() == [0, 0, 0, 0, 1] and not g["rewards"][()].any()
    assert sorted(os.listdir(tmp_path)) == ["short.hdf5"]


@pytest.mark.robosuite
def test_interrupt_leaves_no_partial_file(rs, tmp_path, monkeypatch):
    import dpft.envs.demos as demos

    out = tmp_path / "lift.hdf5"
    out.write_bytes(b"previous file")
    real = demos.run_episode
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(demos, "run_episode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demos.make_demos("lift", 3, str(out), max_steps=5, keep_failures=True, progress=False, overwrite=True)
    assert out.read_bytes() == b"previous file"  # untouched, and no temporary file left beside it
    assert os.listdir(tmp_path) == ["lift.hdf5"]


@pytest.mark.robosuite
def test_image_demos_store_uint8_frames_that_replay_exactly(rs, tmp_path):
    out = tmp_path / "lift_img.hdf5"
    make_demos("lift", 1, str(out), image_obs=True, camera_names=("agentview",), camera_size=32,
               valid_ratio=0.1, progress=False)
    with h5py.File(out, "r") as f:
        env_args = json.loads(f["data"].attrs["env_args"])
        g = f["data/demo_0"]
        img = g["obs/agentview_image"][()]
        states = g["states"][()]
        assert "mask/valid" not in f and [x.decode() for x in f["mask/train"][()]] == ["demo_0"]
    n = states.shape[0]
    assert img.dtype == np.uint8 and img.shape == (n, 32, 32, 3)
    kw = env_args["env_kwargs"]
    assert kw["use_camera_obs"] and kw["camera_names"] == ["agentview"] and kw["camera_heights"] == 32
    env = rs.RobosuiteEnv(env_args, obs_keys=["agentview_image", "robot0_eef_pos"])
    try:
        env.reset(seed=0)
        for t in (0, n // 2, n - 1):
            np.testing.assert_array_equal(env.reset_to(states[t])["agentview_image"], img[t])
    finally:
        env.close()
    assert not np.array_equal(img[0], img[-1])  # the scene changed (the arm moved, the cube was lifted)
