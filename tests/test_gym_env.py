"""GymEnv (gymnasium MuJoCo v5) and the env registry (make_env, env_args_for_task, EnvFactory)."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from dpft.errors import DpftError
from dpft.envs.render import setup_rendering

setup_rendering(require=False)  # choose the GL backend before mujoco is imported
gym = pytest.importorskip("gymnasium")
pytest.importorskip("mujoco")

from dpft.envs.gym_env import GYM_TASKS, GymEnv, default_gym_env_args  # noqa: E402
from dpft.envs.registry import EnvFactory, env_args_for_task, make_env  # noqa: E402

pytestmark = pytest.mark.gym


@pytest.fixture
def hopper():
    env = GymEnv(default_gym_env_args("hopper"), max_episode_steps=5, render_size=32)
    yield env
    env.close()


def test_default_args():
    assert default_gym_env_args("hopper") == {"env_name": "Hopper-v5", "type": 2, "env_kwargs": {}}
    assert default_gym_env_args("Walker2d-v5")["env_name"] == "Walker2d-v5"
    assert env_args_for_task("halfcheetah") == {"env_name": "HalfCheetah-v5", "type": 2, "env_kwargs": {}}
    with pytest.raises(DpftError, match="known tasks: hopper"):
        default_gym_env_args("ant")


def test_hopper_obs_and_steps_match_gymnasium(hopper):
    assert hopper.obs_shapes == {"obs": (11,)}
    assert hopper.obs_dtypes == {"obs": np.dtype(np.float64)}
    assert hopper.action_dim == 3 and hopper.max_episode_steps == 5
    obs = hopper.reset(seed=7)
    ref = gym.make("Hopper-v5")
    ref_obs, _ = ref.reset(seed=7)
    np.testing.assert_array_equal(obs["obs"], ref_obs)
    actions = np.random.default_rng(0).uniform(-1, 1, (5, 3))
    for t, a in enumerate(actions):
        obs, reward, terminated, truncated, info = hopper.step(a)
        ref_obs, ref_reward, ref_term, _, _ = ref.step(a.astype(np.float32))
        np.testing.assert_allclose(obs["obs"], ref_obs, rtol=0, atol=1e-12)
        assert reward == pytest.approx(ref_reward) and terminated == ref_term
        assert info["success"] is False
        assert truncated == (t == 4), t  # the time limit (5) ends the episode at the 5th step exactly
    ref.close()


def test_default_time_limit_is_gymnasium_spec():
    env = GymEnv(default_gym_env_args("hopper"))
    assert env.max_episode_steps == gym.spec("Hopper-v5").max_episode_steps == 1000
    env.close()


def test_seeds_and_state_round_trip(hopper):
    a = hopper.reset(seed=1)["obs"]
    b = hopper.reset(seed=2)["obs"]
    c = hopper.reset(seed=1)["obs"]
    np.testing.assert_array_equal(a, c)
    assert not np.array_equal(a, b)
    hopper.step(np.full(3, 0.5))
    state = hopper.get_state()
    assert state.shape == (1 + 6 + 6,)
    after_one = hopper.step(np.full(3, -0.5))[0]["obs"]
    hopper.step(np.full(3, 0.9))
    restored = hopper.reset_to(state)
    np.testing.assert_array_equal(hopper.get_state(), state)
    np.testing.assert_array_equal(hopper.step(np.full(3, -0.5))[0]["obs"], after_one)
    assert restored["obs"].shape == (11,)
    with pytest.raises(DpftError, match="state has 3 values but Hopper-v5 needs 13"):
        hopper.reset_to(np.zeros(3))


def test_render_sizes(hopper):
    hopper.reset(seed=0)
    frame = hopper.render()
    assert frame.shape == (32, 32, 3) and frame.dtype == np.uint8
    small = hopper.render(48, 64)
    assert small.shape == (48, 64, 3) and small.dtype == np.uint8
    assert small.std() > 5  # a real picture (floor, body), not a blank buffer
    big = hopper.render(300, 400)  # larger than the model's offscreen buffer: grown automatically
    assert big.shape == (300, 400, 3)
    tracked = hopper.render(48, 64, camera="track")
    assert tracked.shape == (48, 64, 3)
    with pytest.raises(DpftError, match="has no camera 'nope'; cameras: track"):
        hopper.render(camera="nope")


def test_errors(hopper):
    with pytest.raises(DpftError, match="before reset"):
        GymEnv(default_gym_env_args("hopper")).step(np.zeros(3))
    hopper.reset(seed=0)
    with pytest.raises(DpftError, match=r"action has shape \(4,\); expected \(3,\)"):
        hopper.step(np.zeros(4))
    with pytest.raises(DpftError, match="one observation key, 'obs'"):
        GymEnv(default_gym_env_args("hopper"), obs_keys=["state"])
    with pytest.raises(DpftError, match="Unknown gymnasium env_name 'Hopper-v99'.*Hopper-v5"):
        GymEnv({"env_name": "Hopper-v99", "type": 2, "env_kwargs": {}})
    with pytest.raises(DpftError, match="type 2"):
        GymEnv({"env_name": "Hopper-v5", "type": 1, "env_kwargs": {}})
    with pytest.raises(DpftError, match="non-negative integer seed"):
        hopper.reset(seed=-1)


def test_make_env_dispatch_and_errors():
    env = make_env(default_gym_env_args("walker2d"), max_episode_steps=3, render_camera=None)
    assert isinstance(env, GymEnv) and env.obs_shapes == {"obs": (17,)} and env.max_episode_steps == 3
    env.close()
    env = make_env({"env_name": "HalfCheetah-v5", "type": "2", "env_kwargs": {}})
    assert env.obs_shapes == {"obs": (17,)} and env.action_dim == 6
    env.close()
    with pytest.raises(DpftError, match="make_furniture_env"):
        make_env({"env_name": "one_leg", "type": "furniture", "env_kwargs": {}})
    with pytest.raises(DpftError, match=r"Unknown env_args\['type'\] 3"):
        make_env({"env_name": "x", "type": 3})
    with pytest.raises(DpftError, match="has no 'type'"):
        make_env({"env_name": "Hopper-v5"})
    with pytest.raises(DpftError, match="unknown keyword.*'fps'"):
        make_env(default_gym_env_args("hopper"), fps=3)
    with pytest.raises(DpftError, match="Unknown task 'stack'; robosuite tasks: lift, can, square, transport; gym "
                                        "tasks: hopper, walker2d, halfcheetah"):
        env_args_for_task("stack")
    with pytest.raises(DpftError, match="state observations only"):
        env_args_for_task("hopper", image_obs=True)
    assert set(GYM_TASKS) == {"hopper", "walker2d", "halfcheetah"}


def test_env_factory_pickles_and_builds():
    factory = EnvFactory(default_gym_env_args("hopper"), obs_keys=["obs"], kwargs={"max_episode_steps": 7})
    clone = pickle.loads(pickle.dumps(factory))
    assert clone == factory
    env = clone()
    assert isinstance(env, GymEnv) and env.max_episode_steps == 7 and env.obs_keys == ["obs"]
    env.close()
    with pytest.raises(DpftError, match="unknown keyword"):
        EnvFactory(default_gym_env_args("hopper"), kwargs={"seed": 1})
    with pytest.raises(DpftError, match="has no 'type'"):
        EnvFactory({"env_name": "Hopper-v5"})


def test_checkpoint_trained_on_gym_data_rolls_out_in_process(tmp_path):
    """Gym locomotion end to end: a robomimic-layout file recorded from Hopper-v5 (random actions), a short
    pretraining run, and `rollout_checkpoint` rebuilding Hopper from the checkpoint's env_args and batching the
    envs in-process (no worker processes)."""
    from dpft.agents.pretrain import pretrain
    from dpft.config import compose
    from dpft.envs.gym_env import default_gym_env_args
    from dpft.envs.registry import make_env
    from dpft.envs.rollout import rollout_checkpoint
    from tests.synth import write_demos_hdf5

    env_args = default_gym_env_args("hopper")
    env = make_env(env_args, max_episode_steps=30)
    rng = np.random.default_rng(0)
    demos = {}
    for i in range(3):
        obs, rows, acts = env.reset(seed=i), [], []
        for _ in range(30):
            a = rng.uniform(-1, 1, env.action_dim)
            rows.append(obs["obs"])
            acts.append(a)
            obs, _, terminated, truncated, _ = env.step(a)
            if terminated or truncated:
                break
        demos["demo_%d" % i] = {"obs": {"obs": np.array(rows)}, "actions": np.array(acts)}
    env.close()
    path = str(tmp_path / "hopper.hdf5")
    write_demos_hdf5(path, demos, env_args=env_args)
    run = str(tmp_path / "run")
    pretrain(compose("pretrain", [f"dataset={path}", f"out={run}", "obs_keys=[obs]", "steps=5", "batch_size=8",
                                  "save_every=5", "val_every=0", "progress=false", "num_threads=1",
                                  "policy.mlp_dims=[16,16,16]", "policy.denoising_steps=3", "data.valid_ratio=0"]))
    result = rollout_checkpoint(run, episodes=3, num_envs=2, seed=7, out_dir=str(tmp_path / "eval"), progress=False,
                                env_options={"max_episode_steps": 8})
    assert [ep["seed"] for ep in result["episodes"]] == [7, 8, 9]
    assert all(1 <= ep["length"] <= 8 and not ep["failed"] for ep in result["episodes"])
    assert result["success_rate"] is None and result["has_success"] is False  # locomotion: no success signal
    assert result["policy"]["obs_keys"] == ["obs"]
