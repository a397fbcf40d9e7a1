"""RobosuiteEnv: robomimic observation names/shapes for the four DPPO tasks, image observations (upright), legacy
robomimic env_args (robosuite 1.4 controller configs), seeding, truncation, success, errors."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from dpft.errors import DpftError
from dpft.envs.render import setup_rendering

setup_rendering(require=False)  # pick the GL backend before robosuite imports mujoco
robosuite = pytest.importorskip("robosuite")

from dpft.envs.registry import EnvFactory, env_args_for_task, make_env  # noqa: E402
from dpft.envs.robosuite_env import (  # noqa: E402
    DEFAULT_MAX_EPISODE_STEPS, TASKS, RobosuiteEnv, convert_legacy_env_args, default_env_args,
)

pytestmark = pytest.mark.robosuite

#: controller config exactly as published robomimic v1.4 datasets store it (DPPO's cfg/robomimic/env_meta/*.json)
LEGACY_OSC = {
    "type": "OSC_POSE", "input_max": 1, "input_min": -1,
    "output_max": [0.05, 0.05, 0.05, 0.5, 0.5, 0.5], "output_min": [-0.05, -0.05, -0.05, -0.5, -0.5, -0.5],
    "kp": 150, "damping": 1, "impedance_mode": "fixed", "kp_limits": [0, 300], "damping_limits": [0, 10],
    "position_limits": None, "orientation_limits": None, "uncouple_pos_ori": True, "control_delta": True,
    "interpolation": None, "ramp_ratio": 0.2,
}


def legacy_env_args(env_name="Lift", robots=("Panda",), **extra):
    kwargs = {
        "has_renderer": False, "has_offscreen_renderer": False, "ignore_done": True, "use_object_obs": True,
        "use_camera_obs": False, "control_freq": 20, "controller_configs": copy.deepcopy(LEGACY_OSC),
        "robots": list(robots), "camera_depths": False, "camera_heights": 84, "camera_widths": 84,
        "reward_shaping": False, "render_gpu_device_id": 0,
    }
    kwargs.update(extra)
    return {"env_name": env_name, "env_version": "1.4.1", "type": 1, "env_kwargs": kwargs}


def robosuite_args(task):
    """env_args for ``task`` on robosuite itself (this file tests the robosuite adapter, not the default backend)."""
    args = env_args_for_task(task)
    args["env_kwargs"]["backend"] = "robosuite"
    return args


@pytest.fixture(scope="module")
def lift():
    env = make_env(robosuite_args("lift"), max_episode_steps=4, terminate_on_success=True)
    yield env
    env.close()


# ------------------------------------------------------------------------------------------------------------------
# env_args
# ------------------------------------------------------------------------------------------------------------------


def test_default_env_args():
    args = default_env_args("lift")
    assert json.loads(json.dumps(args)) == args  # storable in data.attrs["env_args"]
    assert (args["env_name"], args["type"], args["env_version"]) == ("Lift", 1, robosuite.__version__)
    kw = args["env_kwargs"]
    assert kw["robots"] == ["Panda"] and kw["control_freq"] == 20 and kw["reward_shaping"] is False
    assert kw["use_camera_obs"] is False and kw["has_offscreen_renderer"] is False and kw["ignore_done"] is True
    arm = kw["controller_configs"]["body_parts"]["right"]
    assert kw["controller_configs"]["type"] == "BASIC"
    assert (arm["type"], arm["input_type"], arm["gripper"]["type"]) == ("OSC_POSE", "delta", "GRIP")
    img = default_env_args("square", image_obs=True, camera_names=["agentview"], camera_size=32)["env_kwargs"]
    assert img["use_camera_obs"] and img["camera_names"] == ["agentview"] and img["camera_heights"] == 32
    tr = default_env_args("transport")
    assert tr["env_kwargs"]["robots"] == ["Panda", "Panda"] and tr["env_kwargs"]["env_configuration"] == "opposed"
    assert env_args_for_task("Can")["env_name"] == "PickPlaceCan"
    with pytest.raises(DpftError, match=r"Unknown robosuite task 'stack'; known tasks: lift \(Lift\), can"):
        default_env_args("stack")


def test_convert_legacy_controller_config():
    out = convert_legacy_env_args(legacy_env_args())
    kw = out["env_kwargs"]
    cfg = kw["controller_configs"]
    assert cfg["type"] == "BASIC" and set(cfg["body_parts"]) >= {"right"}
    arm = cfg["body_parts"]["right"]
    assert arm["type"] == "OSC_POSE" and arm["gripper"] == {"type": "GRIP"}
    assert arm["damping_ratio"] == 1 and arm["damping_ratio_limits"] == [0, 10]
    assert "damping" not in arm and "damping_limits" not in arm and "control_delta" not in arm
    assert arm["input_type"] == "delta" and arm["input_ref_frame"] == "world"
    assert arm["output_max"] == [0.05, 0.05, 0.05, 0.5, 0.5, 0.5] and arm["kp"] == 150
    assert kw["lite_physics"] is False  # robosuite <= 1.4 stepping
    assert "render_gpu_device_id" not in kw
    unversioned = legacy_env_args()  # robomimic v0.1 datasets (robosuite 1.2) carry no env_version
    del unversioned["env_version"]
    assert convert_legacy_env_args(unversioned)["env_kwargs"]["lite_physics"] is False
    assert out["env_version"] == "1.4.1"
    # idempotent, and robosuite 1.5 args pass through untouched
    assert convert_legacy_env_args(out) == out
    new = default_env_args("lift")
    assert convert_legacy_env_args(new) == new
    nested = copy.deepcopy(new)  # robosuite's JSON-file layout {"body_parts": {"arms": {"right": ...}}}
    nested["env_kwargs"]["controller_configs"]["body_parts"] = {
        "arms": {"right": new["env_kwargs"]["controller_configs"]["body_parts"]["right"]}}
    assert convert_legacy_env_args(nested) == new
    # per-robot list form, two arms, robosuite <= 1.4 env_configuration name
    two = legacy_env_args("TwoArmTransport", robots=("Panda", "Panda"), env_configuration="single-arm-opposed")
    two["env_kwargs"]["controller_configs"] = [copy.deepcopy(LEGACY_OSC), copy.deepcopy(LEGACY_OSC)]
    kw2 = convert_legacy_env_args(two)["env_kwargs"]
    assert kw2["env_configuration"] == "opposed"
    assert [c["body_parts"]["right"]["input_ref_frame"] for c in kw2["controller_configs"]] == ["world", "world"]


def test_convert_errors():
    with pytest.raises(DpftError, match=r"Unknown robosuite env_name 'Lyft'.*Lift.*NutAssemblySquare"):
        convert_legacy_env_args(dict(legacy_env_args(), env_name="Lyft"))
    bad = legacy_env_args()
    bad["env_kwargs"]["controller_configs"]["type"] = "OSC_FOO"
    with pytest.raises(DpftError, match=r"unknown controller type 'OSC_FOO'; accepted: .*OSC_POSE.*BASIC"):
        convert_legacy_env_args(bad)
    with pytest.raises(DpftError, match=r"unknown composite controller type 'FANCY'"):
        convert_legacy_env_args(legacy_env_args(controller_configs={"type": "FANCY", "body_parts": {}}))
    minimal = {"type": "BASIC", "body_parts": {"right": {"type": "OSC_POSE"}}}
    with pytest.raises(DpftError, match=r"\['body_parts'\]\['right'\] lacks 'interpolation', 'gripper'"):
        convert_legacy_env_args(legacy_env_args(controller_configs=minimal))
    with pytest.raises(DpftError, match=r"'bogus_key' that robosuite .* Lift does not accept; accepted keys: .*robots"):
        convert_legacy_env_args(legacy_env_args(bogus_key=1))
    with pytest.raises(DpftError, match=r"Unknown robot 'Pandaa'.*Panda"):
        convert_legacy_env_args(legacy_env_args(robots=("Pandaa",)))
    with pytest.raises(DpftError, match=r"type'\] is 2; robosuite environments have type 1"):
        convert_legacy_env_args(dict(legacy_env_args(), type=2))


# ------------------------------------------------------------------------------------------------------------------
# observations of every task
# ------------------------------------------------------------------------------------------------------------------

OBJECT_DIM = {"lift": 10, "can": 14, "square": 14, "transport": 41}


@pytest.mark.parametrize("task", list(TASKS))
def test_low_dim_obs_seeds_and_steps(task):
    env = RobosuiteEnv(default_env_args(task))
    try:
        two = task == "transport"
        assert env.action_dim == (14 if two else 7)
        assert env.max_episode_steps == DEFAULT_MAX_EPISODE_STEPS[TASKS[task]]
        robots = ["robot0", "robot1"] if two else ["robot0"]
        expected = {"object": (OBJECT_DIM[task],)}
        for r in robots:
            expected.update({r + "_eef_pos": (3,), r + "_eef_quat": (4,), r + "_gripper_qpos": (2,),
                             r + "_joint_pos": (7,), r + "_joint_vel": (7,), r + "_joint_pos_cos": (7,)})
        for key, shape in expected.items():
            assert env.obs_shapes[key] == shape, key
        assert not any(k.endswith("proprio-state") or k == "object-state" for k in env.obs_keys)
        assert not any(k.endswith("_image") for k in env.obs_keys)

        obs0 = env.reset(seed=0)
        state0 = env.get_state()
        assert state0.ndim == 1 and state0.dtype == np.float64
        for _ in range(3):
            obs, reward, terminated, truncated, info = env.step(np.zeros(env.action_dim))
            assert set(obs) == set(env.obs_keys)
            for k, v in obs.items():
                assert v.shape == env.obs_shapes[k] and v.dtype == env.obs_dtypes[k], k
            assert env.obs_dtypes["robot0_eef_pos"] == np.float64 and env.obs_dtypes["object"] == np.float64
            assert reward == 0.0 and not terminated and not truncated and info["success"] is False

        # same seed -> identical initial state (object placement and joint noise); other seed -> different
        env.reset(seed=1)
        state1 = env.get_state()
        obs0b = env.reset(seed=0)
        np.testing.assert_array_equal(env.get_state(), state0)
        for k in obs0:
            np.testing.assert_array_equal(obs0b[k], obs0[k])
        assert np.abs(state1 - state0).max() > 1e-3
        # ... and the same actions from it reproduce the same trajectory
        for _ in range(3):
            again = env.step(np.zeros(env.action_dim))[0]
        for k in obs:
            np.testing.assert_array_equal(again[k], obs[k])
        # robomimic's names for robosuite's arrays (a forced robosuite update computes the same values)
        raw = env.env._get_observations(force_update=True)
        np.testing.assert_array_equal(env.get_observation()["object"], raw["object-state"])
        np.testing.assert_array_equal(env.get_observation()["robot0_eef_pos"], raw["robot0_eef_pos"])
    finally:
        env.close()


def test_obs_keys_select_and_order(lift):
    env = RobosuiteEnv(default_env_args("lift", image_obs=True), obs_keys=["object", "robot0_eef_pos"])
    try:
        # no image key requested: cameras stay off even though env_args asked for them (10x faster)
        assert env.env.use_camera_obs is False and env.env.has_offscreen_renderer is False
        assert list(env.reset(seed=0)) == ["object", "robot0_eef_pos"]
        assert env.obs_shapes == {"object": (10,), "robot0_eef_pos": (3,)}
    finally:
        env.close()
    with pytest.raises(DpftError, match=r"'robot0_eef_vel_lin' are not produced .*available keys: object, "):
        RobosuiteEnv(default_env_args("lift"), obs_keys=["robot0_eef_pos", "robot0_eef_vel_lin"])


# ------------------------------------------------------------------------------------------------------------------
# images and rendering
# ------------------------------------------------------------------------------------------------------------------


def _mujoco_reference(env, camera, height, width):
    """The same camera rendered by mujoco.Renderer (which returns upright images), collision geoms hidden."""
    import mujoco

    opt = mujoco.MjvOption()
    opt.geomgroup[0] = 0
    renderer = mujoco.Renderer(env.env.sim.model._model, height, width)
    try:
        renderer.update_scene(env.env.sim.data._data, camera=camera, scene_option=opt)
        return renderer.render().astype(np.int32)
    finally:
        renderer.close()


def test_image_obs_upright_and_render():
    if setup_rendering(require=False) == "none":
        pytest.skip("no OpenGL backend on this machine")
    # low-dim env_args; asking for an image key switches on exactly that camera
    env = RobosuiteEnv(default_env_args("lift", camera_size=32), obs_keys=["agentview_image", "robot0_eef_pos"])
    try:
        assert env.env.use_camera_obs is True and list(env.env.camera_names) == ["agentview"]
        assert env.obs_shapes["agentview_image"] == (32, 32, 3) and env.obs_dtypes["agentview_image"] == np.uint8
        obs = env.reset(seed=0)
        img = obs["agentview_image"]
        assert img.dtype == np.uint8 and img.shape == (32, 32, 3) and img.flags["C_CONTIGUOUS"]
        raw = env.env._get_observations(force_update=True)["agentview_image"]
        np.testing.assert_array_equal(img, raw[::-1])  # robosuite's OpenGL-convention array, flipped
        ref = _mujoco_reference(env, "agentview", 32, 32)
        assert np.abs(img.astype(np.int32) - ref).mean() < 2.0  # upright
        assert np.abs(img[::-1].astype(np.int32) - ref).mean() > 20.0
        obs, *_ = env.step(np.zeros(7))
        assert obs["agentview_image"].shape == (32, 32, 3)

        frame = env.render(24, 40, camera="frontview")
        assert frame.shape == (24, 40, 3) and frame.dtype == np.uint8
        ref = _mujoco_reference(env, "frontview", 24, 40)
        assert np.abs(frame.astype(np.int32) - ref).mean() < 2.0
        assert np.abs(frame[::-1].astype(np.int32) - ref).mean() > 20.0
        assert env.render().shape == (256, 256, 3)  # render_size default
        with pytest.raises(DpftError, match=r"has no camera 'topview'; cameras: .*agentview"):
            env.render(camera="topview")
    finally:
        env.close()


# ------------------------------------------------------------------------------------------------------------------
# legacy env_args
# ------------------------------------------------------------------------------------------------------------------


def test_legacy_lift_env_steps_like_new_style(lift):
    env = make_env(legacy_env_args(backend="robosuite"))  # converted automatically
    try:
        assert isinstance(env, RobosuiteEnv)
        assert env.env.lite_physics is False
        assert set(env.obs_keys) == set(lift.obs_keys)
        assert env.obs_shapes == {k: lift.obs_shapes[k] for k in env.obs_keys}
        env.reset(seed=3)
        start = env.get_observation()["robot0_eef_pos"].copy()
        a = np.zeros(7)
        a[2] = 1.0  # +z: the OSC target moves up by 5 cm per step
        for _ in range(4):
            obs, reward, terminated, truncated, info = env.step(a)
        assert obs["robot0_eef_pos"][2] - start[2] > 0.025
        assert reward == 0.0 and info["success"] is False
    finally:
        env.close()


def test_legacy_transport_keeps_world_frame_actions():
    """robosuite <= 1.4 OSC deltas are world-frame: +x moves both (oppositely mounted) arms along world +x."""
    env = make_env(legacy_env_args("TwoArmTransport", robots=("Panda", "Panda"),
                                   env_configuration="single-arm-opposed"))
    try:
        env.reset(seed=0)
        obs0 = env.get_observation()
        a = np.zeros(14)
        a[0] = a[7] = 1.0
        for _ in range(4):
            obs = env.step(a)[0]
        for r in ("robot0", "robot1"):
            d = obs[r + "_eef_pos"] - obs0[r + "_eef_pos"]
            assert d[0] > 0.03 and abs(d[1]) < 0.01, (r, d)
        assert env.obs_shapes["object"] == (41,)
    finally:
        env.close()


# ------------------------------------------------------------------------------------------------------------------
# episode logic
# ------------------------------------------------------------------------------------------------------------------


def test_truncation_at_max_episode_steps(lift):
    lift.reset(seed=0)
    flags = [lift.step(np.zeros(7))[3] for _ in range(4)]
    assert flags == [False, False, False, True]
    lift.reset(seed=0)
    assert lift.elapsed_steps == 0 and lift.step(np.zeros(7))[3] is False


def test_success_when_cube_lifted(lift):
    lift.reset(seed=0)
    assert lift.is_success() is False
    raw = lift.env
    start, _ = raw.sim.model.get_joint_qpos_addr(raw.cube.joints[0])
    state = lift.get_state()
    state[1 + start + 2] += 0.15  # (time, qpos, qvel): cube z up by 15 cm
    lift.reset_to(state)
    assert lift.is_success() is True
    obs, reward, terminated, truncated, info = lift.step(np.zeros(7))
    assert info["success"] is True and reward == 1.0
    assert terminated is True  # terminate_on_success
    assert obs["object"][2] > raw.model.mujoco_arena.table_offset[2] + 0.04


def test_reset_to_round_trip(lift):
    lift.reset(seed=4)
    lift.step(np.full(7, 0.3))
    saved = lift.get_state()
    for _ in range(2):
        lift.step(np.full(7, -0.5))
    obs = lift.reset_to(saved)
    np.testing.assert_array_equal(lift.get_state(), saved)
    assert lift.elapsed_steps == 0
    # the observation describes the restored state: cube position = the cube free joint's qpos in that state
    raw = lift.env
    start, _ = raw.sim.model.get_joint_qpos_addr(raw.cube.joints[0])
    np.testing.assert_allclose(obs["object"][:3], saved[1 + start:1 + start + 3], atol=1e-12)
    # and stepping from it is deterministic
    after = lift.step(np.full(7, 0.2))[0]
    again = lift.reset_to(saved)
    np.testing.assert_array_equal(again["object"], obs["object"])
    np.testing.assert_array_equal(lift.step(np.full(7, 0.2))[0]["robot0_eef_pos"], after["robot0_eef_pos"])
    with pytest.raises(DpftError, match=r"state has 5 values but Lift needs 32"):
        lift.reset_to(np.zeros(5))


def test_step_errors_and_factory(lift):
    lift.reset(seed=0)
    with pytest.raises(DpftError, match=r"action has shape \(14,\); expected \(7,\)"):
        lift.step(np.zeros(14))
    with pytest.raises(DpftError, match="non-negative integer seed"):
        lift.reset(seed="3")
    factory = EnvFactory(legacy_env_args(), obs_keys=["robot0_eef_pos", "object"], kwargs={"max_episode_steps": 9})
    import pickle

    assert pickle.loads(pickle.dumps(factory)) == factory


def test_stepped_obs_equal_obs_of_the_stored_state():
    """Evaluation sees what a dataset holds: the observation after a step equals the observation recomputed
    from that step's stored MuJoCo state (what `dpft demos` and robomimic datasets contain)."""
    env = make_env(robosuite_args("lift"), max_episode_steps=50)
    other = make_env(robosuite_args("lift"), max_episode_steps=50)
    try:
        env.reset(seed=5)
        other.reset(seed=5)
        rng = np.random.default_rng(0)
        for _ in range(3):
            obs, *_ = env.step(rng.uniform(-1, 1, size=env.action_dim))
        replayed = other.reset_to(env.get_state())
        for key in ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object"):
            np.testing.assert_allclose(obs[key], replayed[key], atol=1e-9, err_msg=key)
    finally:
        env.close()
        other.close()


@pytest.mark.parametrize("task", ["can", "square", "transport"])
def test_image_obs_shapes_for_every_task(task):
    """Camera observations for the tasks beyond Lift (Lift's images are checked pixel by pixel above)."""
    args = default_env_args(task, image_obs=True, camera_size=32)
    camera = args["env_kwargs"]["camera_names"][0]
    key = camera + "_image"
    env = RobosuiteEnv(args, obs_keys=["robot0_eef_pos", key], max_episode_steps=10)
    try:
        assert env.obs_shapes[key] == (32, 32, 3) and env.obs_dtypes[key] == np.uint8
        obs = env.reset(seed=1)
        frames = [obs[key]]
        for _ in range(2):
            obs, reward, terminated, truncated, info = env.step(np.zeros(env.action_dim))
            frames.append(obs[key])
            assert isinstance(info["success"], bool) and not truncated
        for frame in frames:
            assert frame.shape == (32, 32, 3) and frame.dtype == np.uint8 and frame.std() > 1.0
        assert obs["robot0_eef_pos"].shape == (3,)
    finally:
        env.close()
