"""record_demos (`dpft demos policy=RUN_DIR ...`): rollouts of a checkpoint written as a robomimic HDF5 file, read
back (shapes, rewards vs returns, dones, next_obs, env_args, masks), replayed in the env, filtered, and errors."""
from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest

from dpft.errors import DpftError
from dpft.envs.render import setup_rendering

setup_rendering(require=False)  # choose the GL backend before mujoco is imported
pytest.importorskip("gymnasium")
pytest.importorskip("mujoco")

from dpft.envs.gym_env import GymEnv, default_gym_env_args  # noqa: E402
from dpft.envs.record import record_demos  # noqa: E402
from tests.synth import write_demos_hdf5, write_robomimic_hdf5  # noqa: E402

HOPPER = default_gym_env_args("hopper")
TINY = ["steps=4", "batch_size=8", "save_every=4", "val_every=0", "progress=false", "num_threads=1",
        "data.valid_ratio=0", "warmup_steps=1"]


def _pretrain(dataset, out, *extra):
    from dpft.agents.pretrain import pretrain
    from dpft.config import compose

    pretrain(compose("pretrain", ["dataset=%s" % dataset, "out=%s" % out] + TINY + list(extra)))
    return str(out)


@pytest.fixture(scope="module")
def hopper_data(tmp_path_factory):
    """A synthetic Gym-shaped file: random obs/actions in Hopper's shapes, Hopper's env_args."""
    d = tmp_path_factory.mktemp("hopper_data")
    rng = np.random.default_rng(0)
    demos = {"demo_%d" % i: {"obs": {"obs": rng.normal(size=(20, 11))}, "actions": rng.uniform(-0.8, 0.8, (20, 3))}
             for i in range(3)}
    write_demos_hdf5(str(d / "synth.hdf5"), demos, env_args=HOPPER)
    return str(d / "synth.hdf5")


@pytest.fixture(scope="module")
def hopper_run(hopper_data, tmp_path_factory):
    """A tiny Gaussian checkpoint for Hopper-v5 (chunks of 3 actions, 2 observations of history), trained for a
    few steps on the synthetic Gym-shaped file."""
    return _pretrain(hopper_data, tmp_path_factory.mktemp("hopper") / "run", "policy=gaussian_mlp",
                     "policy.mlp_dims=[16,16]", "obs_keys=[obs]", "horizon_steps=4", "act_steps=3", "cond_steps=2")


@pytest.fixture(scope="module")
def policy(hopper_run):
    import dpft

    return dpft.load_policy(hopper_run)


def read(path):
    with h5py.File(path, "r") as f:
        data = f["data"]
        demos = {}
        for name in data:
            g = data[name]
            demos[name] = {
                "attrs": dict(g.attrs),
                "obs": {k: g["obs"][k][()] for k in g["obs"]},
                "next_obs": {k: g["next_obs"][k][()] for k in g["next_obs"]},
                **{k: g[k][()] for k in ("actions", "rewards", "dones", "states") if k in g},
            }
        masks = {k: [x.decode() for x in f["mask"][k][()]] for k in f["mask"]}
        return demos, dict(data.attrs), masks


@pytest.fixture(scope="module")
def recorded(policy, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("rec") / "sub" / "hopper.hdf5")
    summary = record_demos(policy, num=4, out=out, seed=5, envs=2, max_episode_steps=10, progress=False)
    return out, summary


@pytest.mark.gym
def test_gym_file_layout_rewards_dones_env_args_masks(recorded):
    out, summary = recorded
    demos, attrs, masks = read(out)
    assert summary["path"] == out and summary["kept"] == summary["attempted"] == 4  # gym: no success filter
    assert sorted(demos) == ["demo_0", "demo_1", "demo_2", "demo_3"]
    env_args = json.loads(attrs["env_args"])
    assert env_args == dict(HOPPER, max_episode_steps=10)
    lengths = []
    for i in range(4):
        d = demos["demo_%d" % i]
        n = int(d["attrs"]["num_samples"])
        lengths.append(n)
        assert d["attrs"]["seed"] == 5 + i and d["attrs"]["episode"] == i  # episode i runs with seed + i
        assert 1 <= n <= 10 and (d["attrs"]["truncated"] == (n == 10)) and (d["attrs"]["terminated"] == (n < 10))
        assert set(d["obs"]) == set(d["next_obs"]) == {"obs"}
        assert d["obs"]["obs"].shape == d["next_obs"]["obs"].shape == (n, 11)
        assert d["obs"]["obs"].dtype == np.float64
        assert d["actions"].shape == (n, 3) and d["actions"].dtype == np.float64
        assert d["rewards"].shape == (n,) and d["rewards"].dtype == np.float64
        assert d["states"].shape == (n, 13)  # (time, qpos 6, qvel 6) before each action
        np.testing.assert_array_equal(d["dones"], np.eye(n, dtype=np.int64)[-1])
        np.testing.assert_array_equal(d["obs"]["obs"][1:], d["next_obs"]["obs"][:-1])
        assert d["rewards"].sum() == summary["returns"][i] == d["attrs"]["return"]
        assert summary["episodes"][i]["return"] == pytest.approx(summary["returns"][i], abs=1e-9)
    assert attrs["total"] == sum(lengths) == summary["samples"]
    assert sorted(masks["train"] + masks["valid"]) == sorted(demos) and len(masks["valid"]) == 1
    assert summary["num_train"] == 3 and summary["num_valid"] == 1 and summary["max_episode_steps"] == 10


@pytest.mark.gym
def test_replay_from_seed_and_state_reproduces_observations(recorded):
    out, _ = recorded
    demos, _, _ = read(out)
    env = GymEnv(HOPPER, max_episode_steps=10)
    try:
        for d in demos.values():
            np.testing.assert_array_equal(env.reset(seed=int(d["attrs"]["seed"]))["obs"], d["obs"]["obs"][0])
            for t, a in enumerate(d["actions"]):
                np.testing.assert_array_equal(env.get_state(), d["states"][t])
                obs, reward, _, _, _ = env.step(a)
                np.testing.assert_array_equal(obs["obs"], d["next_obs"]["obs"][t])
                assert reward == d["rewards"][t]
            start = env.reset_to(d["states"][0])["obs"]
            np.testing.assert_allclose(start, d["obs"]["obs"][0], rtol=0, atol=1e-12)
    finally:
        env.close()


@pytest.mark.gym
def test_actions_are_the_policys_chunks(recorded, policy):
    """Deterministic, no noise: each chunk of 3 stored actions is policy.act on the 2-observation history
    (front-padded with the first observation), as `dpft rollout` would execute it."""
    out, _ = recorded
    demos, _, _ = read(out)
    d = demos["demo_0"]
    obs = d["obs"]["obs"]
    for t in range(0, len(d["actions"]), 3):
        hist = np.stack([obs[max(t - 1, 0)], obs[t]])[None]
        want = policy.act({"obs": hist}, deterministic=True)[0]
        k = min(3, len(d["actions"]) - t)
        # (recorded in a batch of 2 envs, recomputed alone: float32 matmuls may differ in the last bit)
        np.testing.assert_allclose(d["actions"][t:t + k], want[:k], rtol=0, atol=1e-6)


@pytest.mark.gym
def test_same_episodes_for_any_number_of_envs(recorded, policy, tmp_path):
    out, _ = recorded
    one = str(tmp_path / "one.hdf5")
    record_demos(policy, num=4, out=one, seed=5, envs=1, max_episode_steps=10, progress=False)
    a, attrs_a, masks_a = read(out)
    b, attrs_b, masks_b = read(one)
    assert attrs_a == attrs_b and masks_a == masks_b and sorted(a) == sorted(b)
    for name in a:  # the same episodes; batches of 2 and 1 may differ in the last bit of a float32 matmul
        assert a[name]["attrs"]["seed"] == b[name]["attrs"]["seed"] and len(a[name]["actions"]) == len(b[name]["actions"])
        np.testing.assert_allclose(a[name]["actions"], b[name]["actions"], rtol=0, atol=1e-5)
        np.testing.assert_allclose(a[name]["obs"]["obs"], b[name]["obs"]["obs"], rtol=0, atol=1e-5)


@pytest.mark.gym
def test_noise_in_normalized_units_is_seeded_and_in_range(recorded, policy, tmp_path):
    out, _ = recorded
    clean, _, _ = read(out)
    paths = [str(tmp_path / ("noisy%d.hdf5" % i)) for i in range(2)]
    for p in paths:
        record_demos(policy, num=2, out=p, seed=5, max_episode_steps=10, noise=0.5, progress=False)
    a, _, _ = read(paths[0])
    b, _, _ = read(paths[1])
    lo, hi = policy.normalizer.min("action"), policy.normalizer.max("action")
    for name in a:
        np.testing.assert_array_equal(a[name]["actions"], b[name]["actions"])  # same seed, same noise
        act = a[name]["actions"]
        assert np.all(act >= lo - 1e-6) and np.all(act <= hi + 1e-6)  # clamped to the data's range
    first = a["demo_0"]["actions"][0]
    assert not np.allclose(first, clean["demo_0"]["actions"][0])  # same start state, perturbed action
    with pytest.raises(DpftError, match="noise .* must be a finite number >= 0"):
        record_demos(policy, num=1, out=str(tmp_path / "x.hdf5"), noise=-0.1)


@pytest.mark.gym
def test_min_return_filter_keeps_episode_order_and_errors(recorded, policy, tmp_path):
    _, summary = recorded
    returns = sorted(summary["returns"])
    threshold = (returns[1] + returns[2]) / 2  # two of the four episodes of seeds 5..8 pass
    out = str(tmp_path / "best.hdf5")
    s = record_demos(policy, num=2, out=out, seed=5, max_episode_steps=10, min_return=threshold, max_attempts=4,
                     progress=False)
    demos, _, _ = read(out)
    want = [e["seed"] for e in summary["episodes"] if e["return"] >= threshold]
    assert [demos["demo_%d" % i]["attrs"]["seed"] for i in range(2)] == want
    assert all(r >= threshold for r in s["returns"]) and s["kept"] == 2
    assert [e["kept"] for e in s["episodes"]] == [e["return"] >= threshold for e in s["episodes"]]
    bad = str(tmp_path / "none.hdf5")
    with pytest.raises(DpftError, match=r"only 0 of 3 episodes passed the filters .*min_return=1000000000.0"):
        record_demos(policy, num=1, out=bad, max_episode_steps=5, min_return=1e9, progress=False)
    assert not os.path.exists(bad) and os.listdir(tmp_path) == ["best.hdf5"]  # no temporary file left


@pytest.mark.gym
def test_diffusion_checkpoint_sampling_is_seeded(hopper_data, tmp_path):
    """A diffusion checkpoint records too; stochastic sampling draws from a generator seeded with `seed`."""
    run = _pretrain(hopper_data, tmp_path / "diff", "policy=diffusion_mlp", "policy.mlp_dims=[16,16,16]",
                    "policy.denoising_steps=3", "obs_keys=[obs]", "horizon_steps=2", "act_steps=2")
    acts = []
    for i, det in enumerate((False, False, True)):
        out = str(tmp_path / ("d%d.hdf5" % i))
        s = record_demos(run, num=1, out=out, seed=2, max_episode_steps=6, deterministic=det, progress=False)
        assert s["kept"] == 1 and s["policy"] == os.path.abspath(run)
        acts.append(read(out)[0]["demo_0"]["actions"])
    np.testing.assert_array_equal(acts[0], acts[1])  # same seed: same samples
    assert not np.allclose(acts[0][0], acts[2][0])  # same first state, stochastic vs deterministic sampling


class _Spy:
    """A policy object that records reset(rows) and act batch sizes."""

    def __init__(self, policy):
        self.inner, self.meta, self.normalizer = policy, policy.meta, policy.normalizer
        self.resets, self.batches = [], []

    def reset(self, rows=None):
        self.resets.append(list(rows))

    def act(self, obs, deterministic=True):
        self.batches.append(len(obs["obs"]))
        return self.inner.act(obs, deterministic=deterministic)


@pytest.mark.gym
def test_policy_reset_rows_at_episode_starts(policy, tmp_path):
    spy = _Spy(policy)
    s = record_demos(spy, num=3, out=str(tmp_path / "spy.hdf5"), envs=2, max_episode_steps=4, progress=False)
    # 4 steps = chunks of 3 + 1: both envs end together, env 0 takes the third episode
    assert spy.resets == [[0, 1], [0]] and s["attempted"] == 3
    assert set(spy.batches) == {2}  # rows are env indices: the batch always holds every env


@pytest.mark.gym
def test_file_passes_data_info_and_pretrains(recorded, tmp_path, capsys):
    from dpft.cli import main

    out, _ = recorded
    assert main(["data", "info", out]) == 0
    assert "Hopper-v5" in capsys.readouterr().out
    run = _pretrain(out, tmp_path / "run2", "policy=gaussian_mlp", "policy.mlp_dims=[8]", "obs_keys=[obs]",
                    "horizon_steps=2", "act_steps=2")
    import dpft

    assert dpft.load_policy(run).meta["env_args"] == dict(HOPPER, max_episode_steps=10)


@pytest.mark.gym
def test_cli_records_and_reports_errors(hopper_run, tmp_path, capsys):
    from dpft.cli import main

    out = str(tmp_path / "cli.hdf5")
    assert main(["demos", "policy=%s" % hopper_run, "num=2", "out=%s" % out, "max_episode_steps=5", "task=hopper",
                 "progress=false", "envs=2", "seed=3"]) == 0
    demos, attrs, _ = read(out)
    assert [d["attrs"]["seed"] for _, d in sorted(demos.items())] == [3, 4]
    assert json.loads(attrs["env_args"])["max_episode_steps"] == 5
    assert "wrote 2 demos" in capsys.readouterr().out
    assert main(["demos", "policy=%s" % hopper_run, "num=0", "out=%s" % out]) == 2
    assert "num=0 must be >= 1" in capsys.readouterr().err
    assert main(["demos", "policy=%s" % hopper_run, "num=1", "out=%s" % out, "task=lift", "overwrite=true"]) == 2
    assert "task='lift' (Lift) does not match the checkpoint" in capsys.readouterr().err
    assert read(out)[0].keys() == demos.keys()  # a failed command leaves the file as it was


@pytest.mark.gym
def test_errors(hopper_run, tmp_path):
    out = str(tmp_path / "x.hdf5")
    with pytest.raises(DpftError, match="policy=.*not a directory; pass a dpft run directory"):
        record_demos(str(tmp_path / "missing"), num=1, out=out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DpftError, match="policy=.*empty.* is not a usable dpft checkpoint"):
        record_demos(str(tmp_path / "empty"), num=1, out=out)
    with pytest.raises(DpftError, match=r"task='walker2d' \(Walker2d-v5\) does not match the checkpoint .* env "
                                        r"'Hopper-v5'"):
        record_demos(hopper_run, num=1, out=out, task="walker2d")
    for num in (0, -2, 1.5):
        with pytest.raises(DpftError, match="num .* must be an integer >= 1"):
            record_demos(hopper_run, num=num, out=out)
    with pytest.raises(DpftError, match="image_obs=True needs a robosuite task"):
        record_demos(hopper_run, num=1, out=out, image_obs=True)
    with pytest.raises(DpftError, match="is a directory"):
        record_demos(hopper_run, num=1, out=str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["empty"]


# --------------------------------------------------------------------------------------------------- robosuite
@pytest.mark.robosuite
def test_robosuite_lift_states_replay(rs, tmp_path):
    """A tiny Lift checkpoint (synthetic Lift-shaped data) recorded for one short episode: robomimic's standard keys,
    states, and reset_to(states[0]) + the stored actions reproduce the observations."""
    data = tmp_path / "lift_synth.hdf5"
    write_robomimic_hdf5(data, num_demos=2, lengths=[10, 10], env_args=rs.default_env_args("lift"))
    run = _pretrain(data, tmp_path / "run", "policy=gaussian_mlp", "policy.mlp_dims=[8]", "horizon_steps=2",
                    "act_steps=2")
    out = str(tmp_path / "lift.hdf5")
    s = record_demos(run, num=1, out=out, max_episode_steps=5, keep_failures=True, image_obs=True,
                     camera_names=["agentview"], camera_size=16, progress=False)
    demos, attrs, _ = read(out)
    d = demos["demo_0"]
    env_args = json.loads(attrs["env_args"])
    assert s["kept"] == 1 and d["actions"].shape == (5, 7) and env_args["max_episode_steps"] == 5
    assert d["states"].shape[0] == 5 and not d["attrs"]["success"]  # kept although it failed (keep_failures)
    low = {"robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "robot0_joint_pos", "object"}
    assert low <= set(d["obs"]) and "agentview_image" in d["obs"]
    img = d["obs"]["agentview_image"]
    assert img.dtype == np.uint8 and img.shape == (5, 16, 16, 3)
    kw = env_args["env_kwargs"]
    assert kw["use_camera_obs"] and kw["camera_names"] == ["agentview"] and kw["camera_heights"] == [16]
    # the backend that produced the file is recorded beside env_kwargs (robomimic's robosuite.make knows no such key)
    assert "backend" not in kw and env_args["backend"] in ("mujoco", "robosuite")
    keys = sorted(k for k in d["obs"] if not k.endswith("_image"))
    env = rs.RobosuiteEnv(rs.default_env_args("lift"), obs_keys=keys)
    try:
        env.reset(seed=0)
        first = env.reset_to(d["states"][0])
        for k in keys:
            np.testing.assert_allclose(first[k], d["obs"][k][0], rtol=0, atol=1e-6)
        for t, a in enumerate(d["actions"]):
            obs = env.step(a)[0]
            for k in keys:
                np.testing.assert_allclose(obs[k], d["next_obs"][k][t], rtol=0, atol=1e-6, err_msg=k)
        for t in (0, 4):  # images are those of the stored states (rendered from the refreshed state)
            env.reset_to(d["states"][t])
            np.testing.assert_array_equal(env.render(16, 16, "agentview"), img[t])
    finally:
        env.close()
