"""FurnitureBench backend against the CPU fake; rotation helpers against hand-computed matrices."""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from dpft.errors import DpftError
from dpft.envs import rotation as rot
from dpft.envs.base import StepResult
from dpft.envs.furniture import (
    DEFAULT_STATE_OBS,
    TASKS,
    FurnitureEnv,
    import_isaacgym_first,
    isaacgym_install_message,
    make_furniture_env,
)
from dpft.envs.furniture_fake import REACH_THRESHOLD, FakeFurnitureRLSimEnv

DOWN6D = [1.0, 0.0, 0.0, 0.0, -1.0, 0.0]  # rot6d of pi about x (gripper pointing down)
Z90 = [0.0, 0.0, math.sqrt(0.5), math.sqrt(0.5)]  # xyzw: 90 degrees about z


def make(task="one_leg", num_envs=2, **kw):
    kw.setdefault("device", "cpu")
    return make_furniture_env(task, num_envs=num_envs, env_cls=FakeFurnitureRLSimEnv, **kw)


def goto(env, targets, gripper=-1.0):
    """Action chunk (N, act_steps, 10) commanding absolute positions ``targets`` (N, act_steps, 3) or (N, 3)."""
    targets = np.asarray(targets, dtype=np.float32)
    if targets.ndim == 2:
        targets = np.repeat(targets[:, None], env.act_steps, axis=1)
    chunk = np.zeros((env.num_envs, env.act_steps, 10), np.float32)
    chunk[..., :3] = targets
    chunk[..., 3:9] = DOWN6D
    chunk[..., 9] = gripper
    return chunk


# ----------------------------------------------------------------------------------------------- rotation
def test_rotation_identity_and_90deg_about_z_match_hand_computed():
    ident = rot.quat_xyzw_to_matrix(torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64))
    assert torch.allclose(ident, torch.eye(3, dtype=torch.float64))
    assert rot.quat_xyzw_to_rot6d(torch.tensor([0.0, 0.0, 0.0, 1.0])).tolist() == [1, 0, 0, 0, 1, 0]
    s = math.sqrt(0.5)
    qz = torch.tensor([0.0, 0.0, s, s], dtype=torch.float64)
    rz = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(rot.quat_xyzw_to_matrix(qz), rz, atol=1e-12)
    # rot6d = first two rows
    expected6d = torch.tensor([0.0, -1, 0, 1, 0, 0], dtype=torch.float64)
    assert torch.allclose(rot.quat_xyzw_to_rot6d(qz), expected6d, atol=1e-12)
    assert torch.allclose(rot.rot6d_to_matrix(torch.tensor([0.0, -1, 0, 1, 0, 0], dtype=torch.float64)), rz)
    assert torch.allclose(rot.matrix_to_quat_xyzw(rz), qz, atol=1e-12)
    # pi about x: w = 0, the pivot that must not be used is w
    rx = torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64))
    assert torch.allclose(rot.matrix_to_quat_xyzw(rx), torch.tensor([1.0, 0, 0, 0], dtype=torch.float64))
    # two 90 deg turns about z make 180 deg
    q180 = rot.quat_multiply(qz, qz)
    rz180 = torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64))
    assert torch.allclose(rot.quat_xyzw_to_matrix(q180), rz180, atol=1e-12)
    # Gram-Schmidt of a non-orthonormal 6-D input: a1=(2,0,0), a2=(1,1,0) -> identity
    assert torch.allclose(rot.rot6d_to_matrix(torch.tensor([2.0, 0, 0, 1, 1, 0])), torch.eye(3))


def test_rotation_round_trips_vectorized():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 5, 4, generator=g, dtype=torch.float64)
    q = rot.standardize_quat_xyzw(q / q.norm(dim=-1, keepdim=True))
    assert torch.allclose(rot.rot6d_to_quat_xyzw(rot.quat_xyzw_to_rot6d(q)), q, atol=1e-10)
    m = rot.quat_xyzw_to_matrix(q)
    assert torch.allclose(m @ m.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand(4, 5, 3, 3), atol=1e-12)
    assert torch.allclose(torch.det(m), torch.ones(4, 5, dtype=torch.float64), atol=1e-12)
    aa = torch.randn(50, 3, generator=g, dtype=torch.float64)
    aa = aa / aa.norm(dim=-1, keepdim=True) * torch.rand(50, 1, generator=g, dtype=torch.float64) * 3.0
    assert torch.allclose(rot.quat_xyzw_to_axis_angle(rot.axis_angle_to_quat_xyzw(aa)), aa, atol=1e-10)
    state = torch.cat([torch.randn(7, 3, generator=g), q[0, :1].float().expand(7, 4),
                       torch.randn(7, 7, generator=g)], dim=-1)
    s16 = rot.robot_state_quat_to_rot6d(state)
    assert s16.shape == (7, 16)
    assert torch.equal(s16[:, :3], state[:, :3]) and torch.equal(s16[:, 9:], state[:, 7:])
    action8 = torch.cat([torch.randn(3, generator=g), q[0, 0].float(), torch.tensor([0.5])])
    assert torch.allclose(rot.action_rot6d_to_quat(rot.action_quat_to_rot6d(action8)), action8, atol=1e-6)


def test_robot_state_dict_or_flat_gives_the_same_16d_state():
    from dpft.envs.furniture import robot_state_to_16d

    g = torch.Generator().manual_seed(1)
    parts = {"ee_pos": torch.randn(2, 3, generator=g), "ee_quat": torch.tensor([[0.0, 0, 0, 1], Z90]),
             "ee_pos_vel": torch.randn(2, 3, generator=g), "ee_ori_vel": torch.randn(2, 3, generator=g),
             "gripper_width": torch.tensor([[0.03], [0.06]]), "joint_positions": torch.randn(2, 7, generator=g)}
    flat = torch.cat([parts[k] for k in ("ee_pos", "ee_quat", "ee_pos_vel", "ee_ori_vel", "gripper_width")], -1)
    from_dict, from_flat = robot_state_to_16d(parts), robot_state_to_16d(flat)
    assert torch.equal(from_dict, from_flat) and from_dict.shape == (2, 16)
    assert torch.allclose(from_dict[1, 3:9], torch.tensor([0.0, -1, 0, 1, 0, 0]), atol=1e-6)
    single = robot_state_to_16d({k: v[0].numpy() for k, v in parts.items()})  # one env, (dim,) arrays
    assert torch.allclose(single, from_dict[:1])
    with pytest.raises(DpftError, match="lacks \\['gripper_width'\\]"):
        robot_state_to_16d({k: v for k, v in parts.items() if k != "gripper_width"})


# ----------------------------------------------------------------------------------------------- fake env
def test_fake_rejects_unknown_kwarg_and_bad_values_like_the_fork():
    base = dict(furniture="one_leg", randomness="low", num_envs=1, obs_keys=list(DEFAULT_STATE_OBS))
    with pytest.raises(TypeError, match="gpu_id"):
        FakeFurnitureRLSimEnv(gpu_id=0, **base)
    with pytest.raises(TypeError, match="observation_space"):
        FakeFurnitureRLSimEnv(observation_space="state", **base)
    with pytest.raises(AssertionError, match="diffik"):
        FakeFurnitureRLSimEnv(ctrl_mode="osc", **base)
    with pytest.raises(ValueError, match="Invalid rotation representation"):
        FakeFurnitureRLSimEnv(act_rot_repr="euler", **base)
    with pytest.raises(ValueError, match="Unknown furniture"):
        FakeFurnitureRLSimEnv(**dict(base, furniture="sofa"))
    with pytest.raises(ValueError, match="Invalid randomness"):
        FakeFurnitureRLSimEnv(**dict(base, randomness="med_collect"))
    with pytest.raises(ValueError, match="obstacle_pose"):
        FakeFurnitureRLSimEnv(**dict(base, obs_keys=["robot_state/ee_pos", "obstacle_pose"]))
    # the fork's four **kwargs names are accepted; randomness is FurnitureRLSimEnv's positional parameter
    env = FakeFurnitureRLSimEnv("med", True, "lamp", num_envs=1, obs_keys=list(DEFAULT_STATE_OBS),
                                pos_scalar=1, rot_scalar=1, stiffness=1000, damping=200)
    assert env.furniture_name == "lamp" and env.randomness == "med"


def test_fake_outputs_have_the_fork_types_and_shapes():
    env = FakeFurnitureRLSimEnv(furniture="one_leg", randomness="low", num_envs=3, obs_keys=list(DEFAULT_STATE_OBS),
                                concat_robot_state=False, act_rot_repr="rot_6d", action_type="pos")
    obs = env.reset()
    assert isinstance(obs["robot_state"], dict)
    assert [k for k in obs["robot_state"]] == ["ee_pos", "ee_quat", "ee_pos_vel", "ee_ori_vel", "gripper_width"]
    assert obs["robot_state"]["gripper_width"].shape == (3, 1)
    assert obs["parts_poses"].shape == (3, 42) and obs["parts_poses"].dtype == torch.float32
    action = torch.zeros(3, 10)
    action[:, 3:9] = torch.tensor(DOWN6D)
    obs, reward, done, info = env.step(action)
    assert reward.shape == (3, 1) and reward.dtype == torch.float32
    assert done.shape == (3, 1) and done.dtype == torch.bool
    assert info == {"obs_success": True, "action_success": True}
    assert env.env_steps.dtype == torch.int32 and env.env_steps.tolist() == [1, 1, 1]
    env.reset(torch.tensor([1], dtype=torch.int32))
    assert env.env_steps.tolist() == [1, 0, 1]
    lamp = FakeFurnitureRLSimEnv(furniture="lamp", randomness="low", num_envs=2, obs_keys=list(DEFAULT_STATE_OBS),
                                 concat_robot_state=True)
    o = lamp.reset()
    assert o["robot_state"].shape == (2, 14) and o["parts_poses"].shape == (2, 28)
    assert bool((o["robot_state"][:, 6] >= 0).all())  # ee_quat real part non-negative, as the fork reports it


def test_fake_delta_quat_actions_hold_still_with_a_zero_delta():
    env = FakeFurnitureRLSimEnv(furniture="one_leg", randomness="low", num_envs=1, obs_keys=list(DEFAULT_STATE_OBS),
                                concat_robot_state=True, act_rot_repr="quat", action_type="delta")
    before = env.reset()["robot_state"].clone()
    after, _, _, _ = env.step(torch.tensor([[0.0, 0, 0, 0, 0, 0, 1, -1]]))
    assert torch.allclose(after["robot_state"][:, :7], before[:, :7], atol=1e-6)


# ----------------------------------------------------------------------------------------------- adapter
def test_adapter_constructs_the_fork_env_with_its_real_keywords():
    env = make("round_table", num_envs=2, randomness="med")
    kw = env.sim_env.constructor_kwargs
    assert kw["furniture"] == "round_table" and kw["num_envs"] == 2 and kw["randomness"] == "med"
    assert (kw["act_rot_repr"], kw["action_type"], kw["ctrl_mode"]) == ("rot_6d", "pos", "diffik")
    assert kw["obs_keys"] == list(DEFAULT_STATE_OBS) and kw["concat_robot_state"] is True
    assert kw["headless"] is True and kw["np_step_out"] is False and kw["april_tags"] is False
    assert kw["max_env_steps"] == 1000 and kw["compute_device_id"] == 0
    assert env.env_args == {"env_name": "FurnitureRLSim-round_table", "type": "furniture",
                            "env_kwargs": {"furniture": "round_table", "randomness": "med"}}


def test_default_episode_lengths_and_obs_dims_per_task():
    expected = {"one_leg": (700, 42), "lamp": (1000, 28), "round_table": (1000, 28), "mug_rack": (400, 21),
                "factory_peg_hole": (200, 21)}
    for task, (steps, parts) in expected.items():
        env = make(task, num_envs=1)
        assert env.max_episode_steps == steps
        assert env.obs_shapes == {"robot_state": (16,), "parts_poses": (parts,)}
        assert env.action_dim == 10 and env.obs_keys == ["robot_state", "parts_poses"]
    assert 16 + TASKS["one_leg"].parts_poses_dim == 58 and 16 + TASKS["lamp"].parts_poses_dim == 44


def test_reset_obs_shapes_dtypes_and_6d_rotation_reproduces_the_quaternion():
    env = make("one_leg", num_envs=3, cond_steps=2)
    obs = env.reset(seeds=[5, 6, 7])
    assert set(obs) == {"robot_state", "parts_poses"}
    assert obs["robot_state"].shape == (3, 2, 16) and obs["robot_state"].dtype == np.float32
    assert obs["parts_poses"].shape == (3, 2, 42) and obs["parts_poses"].dtype == np.float32
    np.testing.assert_array_equal(obs["robot_state"][:, 0], obs["robot_state"][:, 1])  # padded with the first obs
    result = env.step(goto(env, [[0.5, 0.1, 0.3], [0.4, -0.1, 0.2], [0.6, 0.0, 0.35]]))
    raw = env.sim_env.get_observation()["robot_state"]  # the fork's 14-D [pos, quat xyzw, vel, ang vel, width]
    rs = torch.from_numpy(result.obs["robot_state"][:, -1])
    np.testing.assert_allclose(rs[:, :3], raw[:, :3], atol=1e-6)
    np.testing.assert_allclose(rot.rot6d_to_matrix(rs[:, 3:9]), rot.quat_xyzw_to_matrix(raw[:, 3:7]), atol=1e-5)
    np.testing.assert_allclose(rs[:, 9:], raw[:, 7:], atol=1e-6)
    np.testing.assert_allclose(result.obs["parts_poses"][:, -1], env.sim_env.get_observation()["parts_poses"], atol=0)


def test_seeded_resets_are_reproducible():
    a = make("one_leg", num_envs=2).reset(seeds=[3, 4])
    b = make("one_leg", num_envs=2).reset(seeds=[3, 4])
    c = make("one_leg", num_envs=2).reset(seeds=[9, 4])
    np.testing.assert_array_equal(a["parts_poses"], b["parts_poses"])
    assert not np.array_equal(a["parts_poses"], c["parts_poses"])


def test_chunk_sums_rewards_of_its_steps_and_success_after_assembly():
    # lamp: pairs (0, 1), (0, 2); the first half of the chunk goes to part 1, the second to part 2
    env = make("lamp", num_envs=2, act_steps=16, cond_steps=1)
    env.reset(seeds=[0, 0])
    parts = env.sim_env.part_positions()
    targets = np.zeros((2, 16, 3), np.float32)
    targets[0, :8], targets[0, 8:] = parts[0, 1], parts[0, 2]
    targets[1] = [0.3, 0.3, 0.4]  # env 1 goes nowhere near a part
    result = env.step(goto(env, targets))
    assert isinstance(result, StepResult)
    np.testing.assert_array_equal(result.reward, [2.0, 0.0])
    np.testing.assert_array_equal(result.success, [True, False])
    np.testing.assert_array_equal(result.terminated, [False, False])  # DPPO default: run to the time limit
    np.testing.assert_array_equal(result.truncated, [False, False])
    assert result.reward.dtype == np.float32 and result.success.dtype == bool
    result = env.step(goto(env, targets))
    np.testing.assert_array_equal(result.reward, [0.0, 0.0])  # sparse: no new pair
    np.testing.assert_array_equal(result.success, [True, False])  # success so far in this episode


def test_rewards_match_the_raw_fork_step_rewards_sparse_and_dense():
    torch.manual_seed(1)
    raw = FakeFurnitureRLSimEnv(furniture="round_table", randomness="low", num_envs=2,
                                obs_keys=list(DEFAULT_STATE_OBS), concat_robot_state=True, action_type="pos")
    raw.reset()
    parts = raw.part_positions()
    targets = np.zeros((2, 8, 3), np.float32)
    targets[:, :4] = parts[:, 1][:, None]
    targets[:, 4:] = parts[:, 2][:, None]
    targets[1, :4] = [0.3, 0.3, 0.4]
    per_step = []
    for sparse in (True, False):
        env = make("round_table", num_envs=2, act_steps=8, sparse_reward=sparse)
        env.reset(seeds=[1, 1])
        chunk = goto(env, targets)
        if sparse:
            for i in range(8):
                _, r, _, _ = raw.step(torch.from_numpy(chunk[:, i]))
                per_step.append(r.squeeze(1).numpy())
            per_step = np.stack(per_step)  # (8, N)
        result = env.step(chunk)
        expected = per_step.sum(0) if sparse else np.cumsum(per_step, axis=0).sum(0)
        np.testing.assert_allclose(result.reward, expected)
    assert per_step.sum() >= 2  # the scenario assembles something (env 0 both pairs)


def test_truncation_at_the_task_episode_length_and_final_obs_before_auto_reset():
    env = make("one_leg", num_envs=2, act_steps=8, cond_steps=2)  # default 700 steps = 87.5 chunks
    env.reset(seeds=[2, 2])
    target = np.array([[0.3, 0.2, 0.4], [0.35, -0.2, 0.3]], np.float32)
    chunks = 0
    while True:
        result = env.step(goto(env, target))
        chunks += 1
        if result.done.any():
            break
        assert chunks < 100
    assert chunks == 88
    np.testing.assert_array_equal(result.truncated, [True, True])
    np.testing.assert_array_equal(result.terminated, [False, False])
    np.testing.assert_array_equal(result.info["steps"], [4, 4])  # 700 = 87 * 8 + 4
    np.testing.assert_array_equal(result.info["episode_length"], [700, 700])
    assert [(e["env"], e["truncated"], e["failed"], e["return"]) for e in result.info["episodes"]] == [
        (0, True, False, 0.0), (1, True, False, 0.0)]
    # final_obs: the end effector sat at its target; obs: the next episode starts near home
    np.testing.assert_allclose(result.final_obs["robot_state"][:, -1, :3], target, atol=1e-5)
    np.testing.assert_allclose(result.final_obs["robot_state"][:, -2, :3], target, atol=1e-5)
    assert np.all(np.abs(result.obs["robot_state"][:, -1, :3] - [0.45, 0.0, 0.25]) <= 0.01 + 1e-6)
    np.testing.assert_array_equal(result.obs["robot_state"][:, 0], result.obs["robot_state"][:, 1])
    result = env.step(goto(env, target))
    assert not result.done.any() and result.info["steps"].tolist() == [8, 8]


def test_mid_chunk_episode_end_ignores_the_rest_of_the_chunk():
    env = make("factory_peg_hole", num_envs=1, act_steps=8, max_episode_steps=12)
    env.reset(seeds=[0])
    env.step(goto(env, [[0.45, 0.0, 0.25]]))
    targets = np.zeros((1, 8, 3), np.float32)
    targets[0, :4] = [0.45, 0.0, 0.25]
    targets[0, 4:] = [0.9, 0.9, 0.9]  # would move the end effector far away if it counted
    result = env.step(goto(env, targets))
    assert result.truncated.tolist() == [True]
    assert result.info["steps"].tolist() == [4] and result.info["episode_length"].tolist() == [12]
    np.testing.assert_allclose(result.final_obs["robot_state"][0, -1, :3], [0.45, 0.0, 0.25], atol=0.011)


def test_terminate_on_success_resets_only_that_env():
    env = make("one_leg", num_envs=2, act_steps=8, cond_steps=1, terminate_on_success=True)
    env.reset(seeds=[4, 4])
    leg = env.sim_env.part_positions()[:, 4]
    far = np.array([0.3, 0.3, 0.4], np.float32)
    result = env.step(goto(env, np.stack([leg[0], far])))
    np.testing.assert_array_equal(result.terminated, [True, False])
    np.testing.assert_array_equal(result.success, [True, False])
    np.testing.assert_array_equal(result.reward, [1.0, 0.0])
    assert np.linalg.norm(result.final_obs["robot_state"][0, -1, :3] - leg[0]) < REACH_THRESHOLD
    assert np.linalg.norm(result.obs["robot_state"][0, -1, :3] - [0.45, 0.0, 0.25]) < 0.02  # fresh episode
    for key in result.obs:  # rows of envs that did not end: final_obs equals obs
        np.testing.assert_array_equal(result.final_obs[key][1], result.obs[key][1])
    assert env.sim_env.env_steps.tolist()[0] == 0 and env.sim_env.already_assembled[0].tolist() == [False]
    result = env.step(goto(env, np.stack([far, far])))
    np.testing.assert_array_equal(result.success, [False, False])


def test_dense_reward_stops_counting_when_the_episode_ends_inside_the_chunk():
    # dense: each step earns the pairs assembled so far; one_leg terminates on its single pair, so the
    # finished episode earns exactly 1 (its last step) although its env keeps stepping with the batch
    env = make("one_leg", num_envs=2, act_steps=8, sparse_reward=False, terminate_on_success=True)
    env.reset(seeds=[4, 4])
    leg = env.sim_env.part_positions()[:, 4]
    result = env.step(goto(env, np.stack([leg[0], [0.3, 0.3, 0.4]])))
    assert result.terminated.tolist() == [True, False]
    assert result.info["steps"][0] < 8  # it ended inside the chunk
    np.testing.assert_array_equal(result.reward, [1.0, 0.0])
    assert result.info["episode_return"][0] == 1.0 and np.isnan(result.info["episode_return"][1])


def test_nan_observations_reset_the_env_are_counted_and_never_returned():
    env = make("one_leg", num_envs=3, act_steps=8, cond_steps=2)
    env.reset(seeds=[0, 0, 0])
    leg = env.sim_env.part_positions()[:, 4]
    env.sim_env.inject_nan([1], at_step=6)  # the 6th inner step of the first chunk
    result = env.step(goto(env, leg))
    for obs in (result.obs, result.final_obs):
        for value in obs.values():
            assert np.isfinite(value).all()
    np.testing.assert_array_equal(result.truncated, [False, True, False])
    np.testing.assert_array_equal(result.info["nan_resets"], [False, True, False])
    np.testing.assert_array_equal(result.info["failed"], [False, True, False])
    assert result.info["fail_reason"][1].startswith("env 1 returned a non-finite observation at env step 6")
    episodes = result.info["episodes"]
    assert [(e["env"], e["failed"], e["success"], e["length"]) for e in episodes] == [(1, True, False, 6)]
    np.testing.assert_array_equal(result.success, [True, False, True])  # env 1 had assembled, then NaN: failed
    assert result.info["nan_resets_total"] == 1 and env.nan_resets_total == 1
    np.testing.assert_array_equal(result.info["episode_length"], [-1, 6, -1])
    assert np.isnan(result.info["episode_return"][[0, 2]]).all() and result.info["episode_return"][1] == 1.0
    # env 1: final_obs holds its last finite observations (steps 4 and 5), obs the fresh episode
    assert np.linalg.norm(result.final_obs["robot_state"][1, -1, :3] - leg[1]) < 0.02
    assert np.linalg.norm(result.obs["robot_state"][1, -1, :3] - [0.45, 0.0, 0.25]) <= 0.02
    assert env.sim_env.env_steps.tolist() == [8, 0, 8]
    # a second fault later is added to the running total
    env.sim_env.inject_nan([0, 2], at_step=10)
    result = env.step(goto(env, leg))
    assert result.info["nan_resets"].tolist() == [True, False, True]
    assert result.info["nan_resets_total"] == 3 and env.nan_resets_total == 3
    np.testing.assert_array_equal(result.truncated, [True, False, True])


def test_nan_that_survives_a_reset_is_retried_then_zero_filled():
    env = make("one_leg", num_envs=2, act_steps=4, max_nan_reset_attempts=2)
    env.reset(seeds=[0, 0])
    env.sim_env.inject_nan([0], at_step=1, resets_to_clear=2)  # the first reset still gives NaN
    result = env.step(goto(env, [[0.45, 0.0, 0.25]] * 2))
    assert result.info["nan_resets"].tolist() == [True, False] and result.info["nan_reset_retries"] == 1
    assert result.info["nan_unrecovered"] == 0 and np.isfinite(result.obs["robot_state"]).all()
    env.sim_env.inject_nan([1], at_step=5, resets_to_clear=10)  # beyond 1 + 2 attempts
    with pytest.warns(UserWarning, match="non-finite"):
        result = env.step(goto(env, [[0.45, 0.0, 0.25]] * 2))
    assert result.info["nan_unrecovered"] == 1 and result.info["nan_reset_retries"] == 2
    for value in list(result.obs.values()) + list(result.final_obs.values()):
        assert np.isfinite(value).all()
    assert np.all(result.obs["parts_poses"][1, -1, :3] == 0.0)


def test_return_torch_keeps_tensors():
    env = make("one_leg", num_envs=2, return_torch=True)
    obs = env.reset()
    assert isinstance(obs["robot_state"], torch.Tensor) and obs["robot_state"].shape == (2, 1, 16)
    result = env.step(torch.from_numpy(goto(env, [[0.4, 0.0, 0.3]] * 2)))
    assert isinstance(result.reward, torch.Tensor) and result.reward.shape == (2,)
    assert isinstance(result.final_obs["parts_poses"], torch.Tensor)


def test_sample_perturbations_push_parts_only_when_enabled():
    moved = []
    for perturb in (False, True):
        env = make("one_leg", num_envs=2, sample_perturbations=perturb)
        first = env.reset(seeds=[0, 0])["parts_poses"][:, -1]
        result = env.step(goto(env, [[0.3, 0.3, 0.4]] * 2))  # far from every part
        moved.append(np.abs(result.obs["parts_poses"][:, -1] - first).max())
    assert moved[0] == 0.0 and 0.0 < moved[1] < 0.01


def test_bad_inputs_raise_dpft_errors_with_the_culprit():
    env = make("one_leg", num_envs=2, act_steps=4)
    with pytest.raises(DpftError, match="before reset"):
        env.step(np.zeros((2, 4, 10), np.float32))
    env.reset()
    with pytest.raises(DpftError, match=r"\(num_envs=2, act_steps=4, 10\).*\(2, 8, 10\)"):
        env.step(np.zeros((2, 8, 10), np.float32))
    bad = goto(env, [[0.4, 0.0, 0.3]] * 2)
    bad[1, 2, 5] = np.nan
    with pytest.raises(DpftError, match=r"non-finite actions for env\(s\) \[1\]"):
        env.step(bad)
    with pytest.raises(DpftError, match="factory_peg_hole"):
        make("peg_hole")
    with pytest.raises(DpftError, match="max_episode_steps"):
        make("square_table")
    with pytest.raises(DpftError, match="randomness"):
        make("one_leg", randomness="extreme")
    with pytest.raises(DpftError, match="3 seeds for 2 envs"):
        env.reset(seeds=[1, 2, 3])
    with pytest.raises(DpftError, match="act_steps"):
        make("one_leg", act_steps=0)
    with pytest.raises(DpftError, match="NVIDIA GPU"):
        make_furniture_env("one_leg", device="cpu")
    env.close()
    with pytest.raises(DpftError, match="after close"):
        env.step(goto(env, [[0.4, 0.0, 0.3]] * 2))


def test_missing_isaacgym_raises_install_instructions(monkeypatch):
    monkeypatch.setitem(sys.modules, "isaacgym", None)  # makes `import isaacgym` fail whether installed or not
    with pytest.raises(DpftError) as info:
        import_isaacgym_first()
    message = str(info.value)
    assert "Isaac Gym Preview 4" in message and "Python 3.8" in message
    assert "pip install -e isaacgym/python" in message and "ankile/furniture-bench" in message
    with pytest.raises(DpftError, match="Isaac Gym Preview 4"):
        make_furniture_env("one_leg", num_envs=1, device="cuda")
    order = isaacgym_install_message(ImportError(
        "PyTorch was imported before isaacgym modules.  Please import torch after isaacgym modules."))
    assert "import dpft.envs.furniture" in order and "before anything that imports torch" in order


def _run_with_stub_isaacgym(tmp_path, code):
    """Run ``code`` in a fresh interpreter where ``isaacgym.gymapi`` refuses to load after torch (as Isaac Gym's
    gymdeps does)."""
    import os
    import subprocess

    pkg = tmp_path / "isaacgym"
    pkg.mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "gymapi.py").write_text(
        "import sys\n"
        "if 'torch' in sys.modules:\n"
        "    raise ImportError('PyTorch was imported before isaacgym modules.  '\n"
        "                      'Please import torch after isaacgym modules.')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), root, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_importing_the_backend_loads_isaacgym_before_torch(tmp_path):
    ok = _run_with_stub_isaacgym(tmp_path, (
        "import dpft.envs.furniture as f, sys\n"
        "assert 'isaacgym.gymapi' in sys.modules and 'torch' in sys.modules\n"
        "assert f.import_isaacgym_first() is sys.modules['isaacgym.gymapi']\n"
        "print('loaded')\n"))
    assert ok.returncode == 0 and "loaded" in ok.stdout, ok.stderr
    late = _run_with_stub_isaacgym(tmp_path, (
        "import torch\n"
        "import dpft.envs.furniture as f\n"
        "from dpft.errors import DpftError\n"
        "try:\n"
        "    f.import_isaacgym_first()\n"
        "except DpftError as e:\n"
        "    print('ERR', e)\n"))
    assert late.returncode == 0, late.stderr
    assert "ERR" in late.stdout and "PyTorch was imported first" in late.stdout
    assert "import dpft.envs.furniture" in late.stdout


def test_wrapping_a_sim_env_with_the_wrong_parts_dim_is_reported():
    sim = FakeFurnitureRLSimEnv(furniture="lamp", randomness="low", num_envs=1, obs_keys=list(DEFAULT_STATE_OBS),
                                concat_robot_state=True, action_type="pos")
    env = FurnitureEnv(sim, task="one_leg")  # lamp sim (28) claimed to be one_leg (42)
    with pytest.raises(DpftError, match=r"parts_poses for task 'one_leg' has shape \(1, 28\); expected \(1, 42\)"):
        env.reset()


class _LegPolicy:
    """Scripted policy: command the end effector onto one_leg's leg (part 4: parts_poses[28:31])."""

    def __init__(self, act_steps):
        self.meta = {"obs_keys": ["robot_state", "parts_poses"], "cond_steps": 1, "act_steps": act_steps,
                     "action_dim": 10}

    def act(self, obs, deterministic=True):
        leg = obs["parts_poses"][:, -1, 28:31]
        chunk = np.zeros((leg.shape[0], self.meta["act_steps"], 10), np.float32)
        chunk[..., :3] = leg[:, None]
        chunk[..., 3:9] = DOWN6D
        chunk[..., 9] = -1.0
        return chunk


def test_runs_under_the_generic_rollout():
    from dpft.envs.rollout import rollout

    env = make("one_leg", num_envs=3, act_steps=4, max_episode_steps=20)
    result = rollout(_LegPolicy(4), env, episodes=5, seed=0, progress=False)
    assert result["num_episodes"] == 5 and result["success_rate"] == 1.0 and result["num_failed"] == 0
    assert result["mean_return"] == 1.0 and result["mean_length"] == 20
    env.sim_env.inject_nan([0], at_step=env.sim_env.total_steps + 2)  # next run, first chunk: episode 0 fails
    result = rollout(_LegPolicy(4), env, episodes=3, seed=0, progress=False)
    assert result["num_failed"] == 1 and result["success_rate"] == 2 / 3


# ----------------------------------------------------------------------------------------------- issue 24
def test_a_missing_fork_dependency_is_named_with_its_install_command(tmp_path, monkeypatch):
    """The fork imports ipdb at module level without installing it: the error names ipdb and its pip command, not
    "install ankile's fork"."""
    import types

    from dpft.envs import furniture as fb

    gym = types.ModuleType("isaacgym")
    gym.gymapi = types.ModuleType("isaacgym.gymapi")
    monkeypatch.setitem(sys.modules, "isaacgym", gym)
    monkeypatch.setitem(sys.modules, "isaacgym.gymapi", gym.gymapi)
    pkg = tmp_path / "furniture_bench" / "envs"
    pkg.mkdir(parents=True)
    (tmp_path / "furniture_bench" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "furniture_rl_sim_env.py").write_text("raise ModuleNotFoundError('ipdb')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.split(".")[0] == "furniture_bench"]:
        monkeypatch.delitem(sys.modules, name)
    try:
        with pytest.raises(DpftError, match=r"module 'ipdb' is missing.*pip install ipdb==0\.13\.13") as info:
            fb._load_fork_env_class()
        assert "clvrai" not in str(info.value)
        # the interpreter's own wording names the module too
        (pkg / "furniture_rl_sim_env.py").write_text("import ipdb_not_installed_here\n")
        for name in [m for m in sys.modules if m.split(".")[0] == "furniture_bench"]:
            del sys.modules[name]
        with pytest.raises(DpftError, match=r"'ipdb_not_installed_here' is missing.*pip install ipdb_not_installed_here"):
            fb._load_fork_env_class()
        # the fork itself missing keeps the "install ankile's fork" advice
        (pkg / "furniture_rl_sim_env.py").unlink()
        for name in [m for m in sys.modules if m.split(".")[0] == "furniture_bench"]:
            del sys.modules[name]
        with pytest.raises(DpftError, match="Install ankile's fork"):
            fb._load_fork_env_class()
    finally:
        for name in [m for m in sys.modules if m.split(".")[0] == "furniture_bench"]:
            del sys.modules[name]
    assert "pip install ipdb==0.13.13" in isaacgym_install_message()


def test_fake_stores_the_gripper_command_every_step_like_the_fork():
    """A small positive command (|grasp| <= 0.019) does not close on its own step, but it becomes the remembered
    command, so a second one closes the gripper (the fork stores last_grasp every step; the old fake never closed)."""
    sim = FakeFurnitureRLSimEnv("low", furniture="one_leg", num_envs=1, obs_keys=list(DEFAULT_STATE_OBS),
                                action_type="pos")
    sim.reset()
    width = float(sim.gripper[0, 0])
    action = torch.tensor([[0.45, 0.0, 0.25] + DOWN6D + [0.01]])
    sim.step(action)
    assert float(sim.last_grasp[0]) == pytest.approx(0.01)
    assert float(sim.gripper[0, 0]) == pytest.approx(width)  # target still "open": max width
    sim.step(action)
    assert float(sim.gripper[0, 0]) == pytest.approx(width * 0.5)  # target "closed" (0), tracking gain 0.5
    sim.reset()
    assert float(sim.last_grasp[0]) == pytest.approx(0.01)  # reset leaves it alone, as the fork does


def test_partial_reset_advances_running_envs_and_the_history_takes_the_refreshed_state():
    env = make("one_leg", num_envs=2, act_steps=1, cond_steps=2)
    env.reset(seeds=[0, 0])
    sim = env.sim_env
    target = np.array([[0.55, 0.1, 0.2]] * 2, np.float32)
    env.step(goto(env, target))
    before = sim.ee_pos[0].clone()
    sim.inject_nan([1], at_step=2)  # env 1's episode is cut on the next step, so env 1 alone is reset
    calls = sim.refresh_calls
    result = env.step(goto(env, target))
    assert result.info["nan_resets"].tolist() == [False, True] and sim.refresh_calls == calls + 1
    stepped = before + 0.5 * (torch.tensor(target[0]) - before)  # the fake's env step
    refreshed = stepped + (0.5 / 6) * (torch.tensor(target[0]) - stepped)  # one simulate() call: 1/6 of a step
    np.testing.assert_allclose(sim.ee_pos[0].numpy(), refreshed.numpy(), atol=1e-6)
    # env 0's newest history entry is its post-refresh state; the one before is the previous step's
    np.testing.assert_allclose(result.obs["robot_state"][0, -1, :3], refreshed.numpy(), atol=1e-6)
    np.testing.assert_allclose(result.obs["robot_state"][0, 0, :3], before.numpy(), atol=1e-6)
    assert not np.allclose(result.obs["robot_state"][0, -1, :3], stepped.numpy(), atol=1e-5)
    # lamp: ten refreshes to record the bulb rest poses, then the usual one
    lamp = FakeFurnitureRLSimEnv("low", furniture="lamp", num_envs=1, obs_keys=list(DEFAULT_STATE_OBS))
    lamp.reset()
    assert lamp.refresh_calls == 11


def test_chunk_end_truncation_runs_and_rewards_the_whole_last_chunk():
    """DPPO checks the time limit after the chunk: 700 steps with act_steps 8 run 88 chunks = 704 steps."""
    lengths = {}
    for chunk_end in (False, True):
        env = make("one_leg", num_envs=1, act_steps=8, truncate_at_chunk_end=chunk_end)
        env.reset(seeds=[0])
        for t in range(88):
            result = env.step(goto(env, [[0.45, 0.0, 0.3]]))
            if result.truncated[0]:
                break
        lengths[chunk_end] = (t + 1, int(result.info["episode_length"][0]), int(result.info["steps"][0]))
    assert lengths[False] == (88, 700, 4)
    assert lengths[True] == (88, 704, 8)


def test_max_env_steps_reaches_the_fork_and_defaults_to_the_episode_length():
    assert make("lamp", num_envs=1).sim_env.max_env_steps == 1000
    assert make("lamp", num_envs=1, max_env_steps=100_000_000).sim_env.max_env_steps == 100_000_000
    with pytest.raises(DpftError, match="max_env_steps=0"):
        make("lamp", num_envs=1, max_env_steps=0)


def test_sparse_return_positive_iff_success_over_many_episodes():
    """Issue 19 item 1 on the furniture backend: reward and success come from the same fork step, so over many
    episodes of a policy that succeeds sometimes (one_leg: one pair) the sparse return is > 0 exactly when the
    episode succeeded, with or without terminate_on_success."""
    for terminate in (True, False):
        env = make("one_leg", num_envs=8, act_steps=4, cond_steps=1, max_episode_steps=12,
                   terminate_on_success=terminate)
        env.reset(seeds=list(range(8)))
        rng = np.random.default_rng(0)
        ended = []
        for _ in range(30):
            leg = env.sim_env.part_positions()[:, 4]
            aim = leg + rng.normal(scale=0.6 * REACH_THRESHOLD, size=leg.shape).astype(np.float32)
            result = env.step(goto(env, aim))
            done = np.asarray(result.terminated) | np.asarray(result.truncated)
            for i in np.flatnonzero(done):
                ended.append((float(result.info["episode_return"][i]), bool(result.success[i])))
        returns = np.array([r for r, _ in ended])
        success = np.array([s for _, s in ended])
        assert len(ended) >= 30 and success.any() and not success.all(), (len(ended), success.mean())
        np.testing.assert_array_equal(returns > 0, success)
