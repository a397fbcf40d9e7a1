from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from dpft.data import (
    WindowDataset,
    build_datasets,
    describe,
    format_description,
    list_demos,
    load_demos,
    open_robomimic,
    read_filter_keys,
    split_demos,
)
from dpft.errors import DpftError
from dpft.normalization import MinMaxNormalizer
from tests.synth import write_demos_hdf5, write_learnable_hdf5, write_robomimic_hdf5

LOW_DIM_KEYS = ["robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object"]


def _counting_demo(d, length):
    """obs x (T,) = 10*d + t, obs y (T, 2) = [t, -d]; actions (T, 2) = [100*d + t, -(100*d + t)]."""
    t = np.arange(length, dtype=np.float64)
    a = 100 * d + t
    return {
        "obs": {"x": 10 * d + t, "y": np.stack([t, np.full(length, -float(d))], axis=1)},
        "actions": np.stack([a, -a], axis=1),
    }


@pytest.fixture
def counting_hdf5(tmp_path):
    """demo_1 (5 steps) and demo_2 (6 steps) with the counting values above."""
    path = tmp_path / "counting.hdf5"
    write_demos_hdf5(path, {"demo_1": _counting_demo(1, 5), "demo_2": _counting_demo(2, 6)})
    return path


def _acts(base, start, n):
    a = np.arange(base + start, base + start + n, dtype=np.float32)
    return np.stack([a, -a], axis=1)


# ------------------------------------------------------------------------------------------- loading
def test_demos_sorted_numerically(tmp_path):
    path = tmp_path / "order.hdf5"
    demos = {"demo_10": _counting_demo(10, 4), "demo_2": _counting_demo(2, 5), "demo_1": _counting_demo(1, 3)}
    write_demos_hdf5(path, demos, filter_keys={"train": ["demo_10", "demo_1"]})
    assert list_demos(path) == ["demo_1", "demo_2", "demo_10"]
    d = load_demos(path, ["x"])
    assert d.demo_names == ["demo_1", "demo_2", "demo_10"]
    assert d.episode_ends.dtype == np.int64
    assert d.episode_ends.tolist() == [3, 8, 12]
    np.testing.assert_array_equal(d.state[:, 0], [10, 11, 12, 20, 21, 22, 23, 24, 100, 101, 102, 103])
    assert read_filter_keys(path) == {"train": ["demo_1", "demo_10"]}
    assert load_demos(path, ["x"], filter_key="train").demo_names == ["demo_1", "demo_10"]
    assert describe(path)["demo_names"] == ["demo_1", "demo_2", "demo_10"]


def test_low_dim_keys_concatenated_in_given_order(tiny_hdf5, tmp_path):
    written = write_robomimic_hdf5(tmp_path / "same.hdf5")  # same seed as the fixture: same arrays
    keys = ["object", "robot0_eef_pos", "robot0_gripper_qpos"]
    d = load_demos(tiny_hdf5, keys)
    assert d.state.dtype == np.float32 and d.state.flags["C_CONTIGUOUS"]
    assert d.state.shape == (12 + 15 + 18 + 21, 15)
    assert d.low_dim_keys == keys and d.image_keys == [] and d.obs_keys == keys
    assert d.obs_shapes == {"object": (10,), "robot0_eef_pos": (3,), "robot0_gripper_qpos": (2,)}
    assert d.state_slices == {"object": (0, 10), "robot0_eef_pos": (10, 13), "robot0_gripper_qpos": (13, 15)}
    expected = np.concatenate(
        [np.concatenate([written[n]["obs"][k] for k in keys], axis=1) for n in written], axis=0
    ).astype(np.float32)
    np.testing.assert_array_equal(d.state, expected)
    expected_actions = np.concatenate([written[n]["actions"] for n in written]).astype(np.float32)
    np.testing.assert_array_equal(d.actions, expected_actions)
    assert d.actions.dtype == np.float32 and d.action_dim == 7
    assert d.env_args["env_name"] == "Lift" and d.env_args["type"] == 1
    # reversed order gives reversed column blocks
    r = load_demos(tiny_hdf5, keys[::-1])
    np.testing.assert_array_equal(r.state[:, :2], d.state[:, 13:15])
    np.testing.assert_array_equal(r.state[:, 5:], d.state[:, :10])


def test_one_dim_dataset_becomes_column(counting_hdf5):
    d = load_demos(counting_hdf5, ["y", "x"])
    assert d.obs_shapes == {"y": (2,), "x": (1,)}
    assert d.state.shape == (11, 3)
    np.testing.assert_array_equal(d.state[:5, 2], [10, 11, 12, 13, 14])
    np.testing.assert_array_equal(d.state[5:, 1], np.full(6, -2.0))


def test_images_loaded_uint8(tmp_path):
    path = tmp_path / "img.hdf5"
    written = write_robomimic_hdf5(path, images=True, image_shape=(16, 16, 3))
    d = load_demos(path, ["agentview_image", "robot0_eef_pos"])
    assert d.image_keys == ["agentview_image"] and d.low_dim_keys == ["robot0_eef_pos"]
    img = d.images["agentview_image"]
    assert img.dtype == np.uint8 and img.shape == (66, 16, 16, 3)
    np.testing.assert_array_equal(img, np.concatenate([written[n]["obs"]["agentview_image"] for n in written]))
    assert d.obs_shapes["agentview_image"] == (16, 16, 3)


def test_filter_keys_select_demos(tiny_hdf5):
    assert load_demos(tiny_hdf5, ["object"], filter_key="valid").demo_names == ["demo_3"]
    assert load_demos(tiny_hdf5, ["object"], filter_key="train").demo_names == ["demo_0", "demo_1", "demo_2"]
    assert load_demos(tiny_hdf5, ["object"], demo_names=["demo_2", "demo_0"]).demo_names == ["demo_0", "demo_2"]
    with pytest.raises(DpftError, match=r"filter key 'test' not found; filter keys in this file: \[train, valid\]"):
        load_demos(tiny_hdf5, ["object"], filter_key="test")
    with pytest.raises(DpftError, match=r"demos \[demo_9\] are not in data/"):
        load_demos(tiny_hdf5, ["object"], demo_names=["demo_9"])


def test_unknown_filter_key_without_mask_group(tmp_path):
    path = tmp_path / "nomask.hdf5"
    write_robomimic_hdf5(path, filter_keys=False)
    with pytest.raises(DpftError, match=r"filter key 'train' not found; the file has no filter keys"):
        load_demos(path, ["object"], filter_key="train")


# ------------------------------------------------------------------------------------------- splits
def test_build_datasets_uses_filter_keys_and_train_only_stats(tmp_path):
    path = tmp_path / "fk.hdf5"
    written = write_robomimic_hdf5(path)
    with h5py.File(path, "r+") as f:  # make the valid demo extreme: train-only stats must ignore it
        f["data/demo_3/obs/object"][0] = 50.0
        f["data/demo_3/actions"][0] = -0.999999
    train, valid, norm, info = build_datasets(path, ["robot0_eef_pos", "object"], horizon_steps=4, cond_steps=2)
    assert info["split"] == "filter_keys"
    assert info["train_demos"] == ["demo_0", "demo_1", "demo_2"] and info["valid_demos"] == ["demo_3"]
    assert train.demo_names == info["train_demos"] and valid.demo_names == ["demo_3"]
    train_state = np.concatenate(
        [np.concatenate([written[n]["obs"][k] for k in ("robot0_eef_pos", "object")], axis=1)
         for n in ("demo_0", "demo_1", "demo_2")]
    ).astype(np.float32)
    train_act = np.concatenate([written[n]["actions"] for n in ("demo_0", "demo_1", "demo_2")]).astype(np.float32)
    np.testing.assert_array_equal(norm.min("state"), train_state.min(0))
    np.testing.assert_array_equal(norm.max("state"), train_state.max(0))
    np.testing.assert_array_equal(norm.min("action"), train_act.min(0))
    np.testing.assert_array_equal(norm.max("action"), train_act.max(0))
    assert norm.max("state").max() < 50.0
    # train windows are normalized into [-1, 1]; the valid demo's extreme value lands outside
    assert train.state.min() >= -1 and train.state.max() <= 1
    assert valid.state.max() > 1
    # lengths 12, 15, 18 with horizon 4 -> 9 + 12 + 15 windows; valid 21 -> 18
    assert len(train) == 36 and len(valid) == 18
    assert info["num_train_windows"] == 36 and info["num_valid_windows"] == 18
    assert info["obs_dim"] == 13 and info["action_dim"] == 7 and info["env_args"]["env_name"] == "Lift"
    json.dumps(info)  # metadata is JSON-serializable


def test_seeded_ratio_split_reproducible_and_disjoint():
    names = ["demo_%d" % i for i in range(20)]
    a = split_demos(names, None, valid_ratio=0.25, seed=3)
    b = split_demos(list(reversed(names)), {}, valid_ratio=0.25, seed=3)
    assert a == b and a.source == "ratio"
    assert len(a.valid) == 5 and len(a.train) == 15
    assert set(a.train).isdisjoint(a.valid) and sorted(a.train + a.valid) == sorted(names)
    others = [split_demos(names, None, valid_ratio=0.25, seed=s).valid for s in range(4, 9)]
    assert any(v != a.valid for v in others)
    assert split_demos(names, None, valid_ratio=0.0).valid == []
    assert split_demos(["demo_0"], None, valid_ratio=0.5).valid == []
    assert len(split_demos(names[:3], None, valid_ratio=0.01).valid) == 1  # at least one
    assert len(split_demos(names[:3], None, valid_ratio=0.9).train) == 1  # at least one train demo
    with pytest.raises(DpftError, match=r"valid_ratio must be in \[0, 1\)"):
        split_demos(names, None, valid_ratio=1.0)


def test_split_with_filter_keys_rules():
    names = ["demo_%d" % i for i in range(6)]
    s = split_demos(names, {"valid": ["demo_4"]})
    assert s.train == ["demo_0", "demo_1", "demo_2", "demo_3", "demo_5"] and s.valid == ["demo_4"]
    s = split_demos(names, {"tr": ["demo_0", "demo_1"], "va": ["demo_5"]}, "tr", "va")
    assert (s.train, s.valid, s.source) == (["demo_0", "demo_1"], ["demo_5"], "filter_keys")
    with pytest.raises(DpftError, match=r"share demos \['demo_1'\]"):
        split_demos(names, {"train": ["demo_0", "demo_1"], "valid": ["demo_1"]})


def test_build_datasets_ratio_split_without_filter_keys(tmp_path):
    path = tmp_path / "nofk.hdf5"
    write_robomimic_hdf5(path, num_demos=10, filter_keys=False)
    t1, v1, n1, i1 = build_datasets(path, LOW_DIM_KEYS, 4, 2, valid_ratio=0.2, seed=5)
    t2, v2, n2, i2 = build_datasets(path, LOW_DIM_KEYS, 4, 2, valid_ratio=0.2, seed=5)
    assert i1["split"] == "ratio" and len(i1["valid_demos"]) == 2
    assert i1["train_demos"] == i2["train_demos"] and i1["valid_demos"] == i2["valid_demos"]
    assert set(i1["train_demos"]).isdisjoint(i1["valid_demos"])
    np.testing.assert_array_equal(n1.min("state"), n2.min("state"))
    _, v0, _, i0 = build_datasets(path, LOW_DIM_KEYS, 4, 2, valid_ratio=0.0)
    assert v0 is None and i0["valid_demos"] == [] and len(i0["train_demos"]) == 10


# ------------------------------------------------------------------------------------------- windows
def test_window_contents_cond3_horizon4(counting_hdf5):
    ds = WindowDataset(load_demos(counting_hdf5, ["x"]), horizon_steps=4, cond_steps=3)
    # demo_1: L=5 -> starts 0, 1 ; demo_2: L=6 -> starts 0, 1, 2 (last valid start = L - Ta)
    assert len(ds) == 5
    b = ds.get(torch.arange(5))
    expected_obs = np.array(
        [[10, 10, 10], [10, 10, 11], [20, 20, 20], [20, 20, 21], [20, 21, 22]], dtype=np.float32
    )[..., None]
    expected_act = np.stack([_acts(100, 0, 4), _acts(100, 1, 4), _acts(200, 0, 4), _acts(200, 1, 4),
                             _acts(200, 2, 4)])
    assert b["obs"]["state"].shape == (5, 3, 1) and b["actions"].shape == (5, 4, 2)
    np.testing.assert_array_equal(b["obs"]["state"].numpy(), expected_obs)
    np.testing.assert_array_equal(b["actions"].numpy(), expected_act)
    # the last window ends with the episode's last action
    assert b["actions"][4, -1, 0].item() == 205.0
    # iter_batches visits the same windows in the same order
    parts = list(ds.iter_batches(2))
    assert [p["actions"].shape[0] for p in parts] == [2, 2, 1]
    np.testing.assert_array_equal(torch.cat([p["actions"] for p in parts]).numpy(), expected_act)
    np.testing.assert_array_equal(torch.cat([p["obs"]["state"] for p in parts]).numpy(), expected_obs)


def test_window_contents_cond2_and_two_keys(counting_hdf5):
    ds = WindowDataset(load_demos(counting_hdf5, ["x", "y"]), horizon_steps=4, cond_steps=2)
    b = ds.get([0, 1, 2, 4])
    expected_obs = np.array(
        [
            [[10, 0, -1], [10, 0, -1]],  # episode start: padded with the first obs
            [[10, 0, -1], [11, 1, -1]],
            [[20, 0, -2], [20, 0, -2]],
            [[21, 1, -2], [22, 2, -2]],
        ],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(b["obs"]["state"].numpy(), expected_obs)
    np.testing.assert_array_equal(b["actions"][3].numpy(), _acts(200, 2, 4))


def test_short_episode_contributes_nothing(tmp_path):
    path = tmp_path / "short.hdf5"
    write_demos_hdf5(path, {"demo_0": _counting_demo(1, 3), "demo_1": _counting_demo(2, 6)})
    ds = WindowDataset(load_demos(path, ["x"]), horizon_steps=4, cond_steps=2)
    assert len(ds) == 3
    b = ds.get(torch.arange(3))
    np.testing.assert_array_equal(b["obs"]["state"][:, :, 0].numpy(), [[20, 20], [20, 21], [21, 22]])
    np.testing.assert_array_equal(b["actions"][:, 0, 0].numpy(), [200, 201, 202])


def test_every_demo_shorter_than_horizon(counting_hdf5):
    demos = load_demos(counting_hdf5, ["x"])
    with pytest.raises(DpftError, match=r"Every demo in '.*counting.hdf5' is shorter than horizon_steps=7 "
                                        r"\(the longest of the 2 demos has 6 steps\)"):
        WindowDataset(demos, horizon_steps=7, cond_steps=1)
    with pytest.raises(DpftError, match=r"shorter than horizon_steps=16"):
        build_datasets(counting_hdf5, ["x"], horizon_steps=16, cond_steps=2)


def test_no_window_crosses_an_episode_boundary(tiny_hdf5):
    demos = load_demos(tiny_hdf5, LOW_DIM_KEYS)
    ds = WindowDataset(demos, horizon_steps=4, cond_steps=3)
    lengths = demos.episode_lengths
    assert len(ds) == int(np.maximum(lengths - 4 + 1, 0).sum())
    obs_rows, act_rows = ds.window_rows(torch.arange(len(ds)))
    ends = torch.from_numpy(demos.episode_ends)
    ep_of_start = torch.searchsorted(ends, act_rows[:, :1].contiguous(), right=True)
    assert (torch.searchsorted(ends, act_rows, right=True) == ep_of_start).all()
    assert (torch.searchsorted(ends, obs_rows, right=True) == ep_of_start).all()
    # observation rows never decrease and the current observation is the action start row
    assert (obs_rows[:, 1:] >= obs_rows[:, :-1]).all() and (obs_rows[:, -1] == act_rows[:, 0]).all()
    # gathered values equal direct indexing of the stored arrays
    b = ds.get(torch.arange(len(ds)))
    np.testing.assert_array_equal(b["obs"]["state"].numpy(), demos.state[obs_rows.numpy()])
    np.testing.assert_array_equal(b["actions"].numpy(), demos.actions[act_rows.numpy()])


def test_image_batches(tiny_image_hdf5):
    demos = load_demos(tiny_image_hdf5, ["robot0_eef_pos", "agentview_image"])
    norm = MinMaxNormalizer.fit({"state": demos.state, "action": demos.actions})
    ds = WindowDataset(demos, horizon_steps=4, cond_steps=2, normalizer=norm)
    g = torch.Generator().manual_seed(0)
    b = ds.sample(5, g)
    img = b["obs"]["agentview_image"]
    assert img.dtype == torch.uint8 and img.shape == (5, 2, 16, 16, 3)
    assert b["obs"]["state"].dtype == torch.float32 and b["obs"]["state"].shape == (5, 2, 3)
    assert b["actions"].dtype == torch.float32 and b["actions"].shape == (5, 4, 7)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(len(ds), (5,), generator=g)
    obs_rows, act_rows = ds.window_rows(idx)
    np.testing.assert_array_equal(img.numpy(), demos.images["agentview_image"][obs_rows.numpy()])
    # stored state/actions are normalized and unnormalize back to the raw values
    np.testing.assert_allclose(norm.unnormalize("state", b["obs"]["state"]).numpy(),
                               demos.state[obs_rows.numpy()], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(norm.unnormalize("action", b["actions"]).numpy(),
                               demos.actions[act_rows.numpy()], rtol=1e-5, atol=1e-5)


def test_image_only_obs_has_no_state(tiny_image_hdf5):
    train, _, norm, info = build_datasets(tiny_image_hdf5, ["agentview_image"], 4, 1)
    assert norm.keys() == ["action"] and info["obs_dim"] == 0
    b = train.sample(3, torch.Generator().manual_seed(1))
    assert sorted(b["obs"]) == ["agentview_image"] and b["obs"]["agentview_image"].shape == (3, 1, 16, 16, 3)


def test_sampling_reproducible_from_generator_seed(tiny_hdf5):
    ds, _, _, _ = build_datasets(tiny_hdf5, LOW_DIM_KEYS, 4, 2)
    torch.manual_seed(123)
    a = ds.sample(16, torch.Generator().manual_seed(7))
    torch.manual_seed(999)  # the global RNG plays no role
    b = ds.sample(16, torch.Generator().manual_seed(7))
    c = ds.sample(16, torch.Generator().manual_seed(8))
    assert torch.equal(a["actions"], b["actions"]) and torch.equal(a["obs"]["state"], b["obs"]["state"])
    assert not torch.equal(a["actions"], c["actions"])
    # a saved generator state reproduces the stream
    g = torch.Generator().manual_seed(11)
    ds.sample(4, g)
    state = g.get_state()
    first = ds.sample(8, g)
    g2 = torch.Generator()
    g2.set_state(state)
    assert torch.equal(ds.sample(8, g2)["actions"], first["actions"])


def test_dataset_argument_errors(counting_hdf5):
    demos = load_demos(counting_hdf5, ["x"])
    ds = WindowDataset(demos, 4, 2)
    with pytest.raises(DpftError, match=r"indices in \[0, 5\] but the dataset has 5 windows"):
        ds.get([0, 5])
    with pytest.raises(DpftError, match=r"cond_steps must be a positive integer, got 0"):
        WindowDataset(demos, 4, 0)
    wrong = MinMaxNormalizer.fit({"state": np.zeros((2, 3)), "action": np.zeros((2, 2))})
    with pytest.raises(DpftError, match=r"'state' statistics with 1 features .* with state dim 3"):
        WindowDataset(demos, 4, 2, normalizer=wrong)


def test_learnable_file_actions_follow_expert(tmp_path):
    from tests.synth import learnable_action

    path = tmp_path / "learn.hdf5"
    meta = write_learnable_hdf5(path, num_demos=3, length=10, images=True)
    d = load_demos(path, meta["obs_keys"])
    assert d.obs_dim == meta["obs_dim"] == 6 and d.action_dim == meta["action_dim"] == 4
    np.testing.assert_allclose(d.actions, learnable_action(d.state.astype(np.float64)), atol=1e-6)
    assert d.images["agentview_image"].shape == (30, 16, 16, 3)
    assert describe(path)["num_samples"] == meta["num_samples"] == 30


# ------------------------------------------------------------------------------------------- describe
def test_describe_summary(tmp_path):
    path = tmp_path / "desc.hdf5"
    written = write_robomimic_hdf5(path, images=True, image_shape=(16, 16, 3))
    d = describe(path)
    assert d["num_demos"] == 4 and d["num_samples"] == 66 and d["total_attr"] == 66
    assert d["length"] == {"min": 12, "max": 21, "mean": 16.5, "std": pytest.approx(np.std([12, 15, 18, 21])),
                           "median": 16.5}
    assert d["obs"]["robot0_eef_pos"] == {"shape": (3,), "dtype": "float64", "kind": "low_dim"}
    assert d["obs"]["agentview_image"] == {"shape": (16, 16, 3), "dtype": "uint8", "kind": "image"}
    all_act = np.concatenate([w["actions"] for w in written.values()])
    assert d["action_dim"] == 7
    np.testing.assert_allclose(d["action_min"], all_act.min(0))
    np.testing.assert_allclose(d["action_max"], all_act.max(0))
    assert d["filter_keys"] == {"train": 3, "valid": 1}
    assert d["env_args"]["env_name"] == "Lift"
    assert d["extras"] == {"rewards": 4, "dones": 4, "states": 4, "next_obs": 4}
    assert d["warnings"] == []
    text = format_description(d)
    assert "Demos: 4   samples: 66" in text
    assert "Environment: Lift (type 1 = robosuite, version 1.5.2)" in text
    assert "agentview_image" in text and "(16, 16, 3)" in text
    assert "train  3 demos" in text and "valid  1 demo\n" in text
    assert "obs_dim 19" in text


def test_describe_warnings(tmp_path):
    path = tmp_path / "warn.hdf5"
    write_robomimic_hdf5(path, total_attr=5, filter_keys=False, env_args=False)
    with h5py.File(path, "r+") as f:
        f["data/demo_1/actions"][2, 3] = 4.0
    d = describe(path)
    assert d["env_args"] is None and d["filter_keys"] == {}
    assert any("data.attrs['total'] is 5 but the demos hold 66" in w for w in d["warnings"])
    assert any("outside [-1, 1]" in w for w in d["warnings"])
    assert "Warning: actions fall outside [-1, 1]" in format_description(d)


# ------------------------------------------------------------------------------------------- bad input
def test_missing_file(tmp_path):
    with pytest.raises(DpftError, match=r"Dataset file '.*nope.hdf5' does not exist"):
        load_demos(tmp_path / "nope.hdf5", ["object"])
    with pytest.raises(DpftError, match=r"does not exist"):
        describe(tmp_path / "nope.hdf5")


def test_not_hdf5(tmp_path):
    path = tmp_path / "notes.hdf5"
    path.write_text("this is a text file\n")
    with pytest.raises(DpftError, match=r"'.*notes.hdf5' is not an HDF5 file"):
        describe(path)


def test_no_data_group_and_no_demos(tmp_path):
    path = tmp_path / "nodata.hdf5"
    with h5py.File(path, "w") as f:
        f.create_group("episodes")
    with pytest.raises(DpftError, match=r"has no 'data' group.*Top-level entries found: \[episodes\]"):
        open_robomimic(path)
    path2 = tmp_path / "nodemos.hdf5"
    with h5py.File(path2, "w") as f:
        f.create_group("data/traj_0")
    with pytest.raises(DpftError, match=r"holds no demo_<i> groups \(entries found: \[traj_0\]\)"):
        load_demos(path2, ["object"])


def test_missing_obs_key_lists_present_keys(tiny_hdf5):
    with pytest.raises(DpftError) as e:
        load_demos(tiny_hdf5, ["robot0_eef_pos", "robot0_joint_pos"])
    msg = str(e.value)
    assert "obs key 'robot0_joint_pos' is missing from data/demo_0/obs" in msg
    assert "Keys present there: [object, robot0_eef_pos, robot0_eef_quat, robot0_gripper_qpos]" in msg


def test_obs_key_missing_from_one_demo(tiny_hdf5):
    with h5py.File(tiny_hdf5, "r+") as f:
        del f["data/demo_2/obs/object"]
    with pytest.raises(DpftError, match=r"obs key 'object' is missing from data/demo_2/obs"):
        load_demos(tiny_hdf5, ["object"])
    with pytest.raises(DpftError, match=r"obs key 'object' is present in 3 of 4 demos but missing from "
                                        r"data/\{demo_2\}/obs"):
        describe(tiny_hdf5)


def test_action_dim_mismatch_names_demos(tiny_hdf5):
    with h5py.File(tiny_hdf5, "r+") as f:
        a = f["data/demo_2/actions"][:, :6]
        del f["data/demo_2/actions"]
        f["data/demo_2/actions"] = a
    pattern = r"action dimension differs across demos: 6 in demo_2; 7 in demo_0, demo_1, demo_3"
    with pytest.raises(DpftError, match=pattern):
        load_demos(tiny_hdf5, ["object"])
    with pytest.raises(DpftError, match=pattern):
        describe(tiny_hdf5)


def test_nan_in_obs_names_demo_and_key(tiny_hdf5):
    with h5py.File(tiny_hdf5, "r+") as f:
        f["data/demo_1/obs/robot0_eef_quat"][4, 2] = np.nan
    pattern = r"data/demo_1/obs/robot0_eef_quat contains NaN \(step 4"
    with pytest.raises(DpftError, match=pattern):
        load_demos(tiny_hdf5, ["robot0_eef_pos", "robot0_eef_quat"])
    with pytest.raises(DpftError, match=pattern):
        describe(tiny_hdf5)
    load_demos(tiny_hdf5, ["object"])  # a key that is not loaded does not matter


def test_inf_in_actions_names_demo(tiny_hdf5):
    with h5py.File(tiny_hdf5, "r+") as f:
        f["data/demo_3/actions"][7, 5] = -np.inf
    pattern = r"data/demo_3/actions contains Inf \(step 7, dimension 5\)"
    with pytest.raises(DpftError, match=pattern):
        load_demos(tiny_hdf5, ["object"])
    with pytest.raises(DpftError, match=pattern):
        describe(tiny_hdf5)


def test_empty_filter_key(tiny_hdf5):
    with h5py.File(tiny_hdf5, "r+") as f:
        f.create_dataset("mask/empty", data=np.array([], dtype="S8"))
    pattern = r"filter key 'empty' \(mask/empty\) lists no demos"
    with pytest.raises(DpftError, match=pattern):
        load_demos(tiny_hdf5, ["object"], filter_key="empty")
    with pytest.raises(DpftError, match=pattern):
        describe(tiny_hdf5)
    assert load_demos(tiny_hdf5, ["object"], filter_key="train").num_demos == 3  # others still usable


def test_filter_key_naming_unknown_demo(tiny_hdf5):
    with h5py.File(tiny_hdf5, "r+") as f:
        f.create_dataset("mask/bad", data=np.array([b"demo_0", b"demo_42"]))
    with pytest.raises(DpftError, match=r"filter key 'bad' names demos that are not in data/: \[demo_42\]"):
        describe(tiny_hdf5)


def test_non_json_env_args(tmp_path):
    path = tmp_path / "env.hdf5"
    write_robomimic_hdf5(path, env_args="{'env_name': 'Lift'")
    with pytest.raises(DpftError, match=r"data.attrs\['env_args'\] is not valid JSON"):
        describe(path)
    with pytest.raises(DpftError, match=r"not valid JSON"):
        load_demos(path, ["object"])


def test_length_mismatch_names_demo(tiny_hdf5):
    with h5py.File(tiny_hdf5, "r+") as f:
        x = f["data/demo_1/obs/object"][:-1]
        del f["data/demo_1/obs/object"]
        f["data/demo_1/obs/object"] = x
    pattern = r"data/demo_1/obs/object has 14 steps but data/demo_1/actions has 15"
    with pytest.raises(DpftError, match=pattern):
        load_demos(tiny_hdf5, ["object"])
    with pytest.raises(DpftError, match=pattern):
        describe(tiny_hdf5)


def test_unusable_and_inconsistent_obs_keys(tiny_hdf5):
    with h5py.File(tiny_hdf5, "r+") as f:
        for i, T in enumerate([12, 15, 18, 21]):
            f["data/demo_%d/obs/depth" % i] = np.zeros((T, 4, 4), dtype=np.float32)
        q = f["data/demo_3/obs/robot0_eef_quat"][:, :3]
        del f["data/demo_3/obs/robot0_eef_quat"]
        f["data/demo_3/obs/robot0_eef_quat"] = q
    with pytest.raises(DpftError, match=r"obs key 'depth' has per-step shape \(4, 4\) and dtype float32"):
        load_demos(tiny_hdf5, ["depth"])
    with pytest.raises(DpftError, match=r"'robot0_eef_quat' has per-step shape \(4,\) \(float64\) in data/demo_0 "
                                        r"but \(3,\) \(float64\) in data/demo_3"):
        load_demos(tiny_hdf5, ["robot0_eef_quat"])
    with pytest.raises(DpftError, match=r"obs_keys must be a non-empty list"):
        load_demos(tiny_hdf5, "object")


def test_short_valid_split_is_skipped_with_warning(tmp_path):
    path = tmp_path / "shortvalid.hdf5"
    write_robomimic_hdf5(path, lengths=[12, 15, 18, 3])  # valid = demo_3 (3 steps)
    with h5py.File(path, "r+") as f:  # an unrelated broken filter key does not stop training
        f.create_dataset("mask/empty", data=np.array([], dtype="S8"))
    train, valid, _, info = build_datasets(path, LOW_DIM_KEYS, horizon_steps=4, cond_steps=2)
    assert valid is None and info["valid_demos"] == ["demo_3"] and info["num_valid_windows"] == 0
    assert info["warnings"] == ["all 1 validation demos are shorter than horizon_steps=4; validation is skipped"]
    assert len(train) == 9 + 12 + 15
