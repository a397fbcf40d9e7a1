"""Reward and success come from the same state (issue 19, item 1): a successful step earns the sparse reward.

robosuite's ``env.step`` computes its reward before the kinematics of the step's last physics sub-step are refreshed;
dpft reads success after the refresh. Near the success threshold the two disagreed (a success step with reward 0),
so an episode ending on success taught the critic that reaching the goal is worth nothing.
"""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.robosuite


def _expert_episode(rs, task, noise, seed, max_steps, terminate_on_success):
    from dpft.envs.experts import make_expert

    env = rs.RobosuiteEnv(rs.default_env_args(task), max_episode_steps=max_steps,
                          terminate_on_success=terminate_on_success)
    try:
        env.reset(seed=seed)
        expert = make_expert(task, noise=noise)
        expert.reset(env, rng=np.random.default_rng([seed, 1]))
        rewards, successes = [], []
        for _ in range(max_steps):
            action = np.clip(expert.act(env), -1.0, 1.0)
            _, reward, terminated, truncated, info = env.step(action)
            rewards.append(reward)
            successes.append(info["success"])
            if terminated or truncated:
                break
        return np.array(rewards), np.array(successes)
    finally:
        env.close()


def test_lift_threshold_crossing_in_the_last_physics_substep_is_rewarded(rs):
    """A cube thrown upward so that it crosses Lift's success height (table + 4 cm) during the last physics sub-step
    of a control step: robosuite's own reward (computed before the kinematics refresh) was 0 at that successful
    step; dpft's reward is 1, like the success flag, because both read the refreshed state."""
    env = rs.RobosuiteEnv(rs.default_env_args("lift"), max_episode_steps=5, terminate_on_success=True)
    try:
        env.reset(seed=0)
        raw = env.env
        cube = raw.cube_body_id
        qpos_addr = raw.sim.model.get_joint_qpos_addr(raw.cube.joints[0])[0]
        qvel_addr = raw.sim.model.get_joint_qvel_addr(raw.cube.joints[0])[0]
        threshold = raw.model.mujoco_arena.table_offset[2] + 0.04
        base = env.get_state()
        nq = raw.sim.model.nq

        def thrown(z):  # cube beside the table (60 cm away: free flight), at height z, moving up at 1 m/s
            st = base.copy()
            st[1 + qpos_addr] += 0.6
            st[1 + qpos_addr + 2] = z
            st[1 + nq + qvel_addr + 2] = 1.0
            return st

        stale = {}
        step = raw.step

        def recording_step(action):
            out = step(action)
            stale["z"] = float(raw.sim.data.body_xpos[cube][2])  # what robosuite's reward saw
            stale["reward"] = float(out[1])
            return out

        raw.step = recording_step
        zero = np.zeros(env.action_dim)
        env.reset_to(thrown(threshold - 0.03))
        env.step(zero)
        fresh = float(raw.sim.data.body_xpos[cube][2])
        assert fresh - stale["z"] > 1e-4  # the refresh moves the cube by one sub-step
        # shift the throw so that the threshold lies halfway between the stale and the refreshed height
        env.reset_to(thrown(threshold - 0.03 + threshold - 0.5 * (stale["z"] + fresh)))
        _, reward, terminated, _, info = env.step(zero)
        assert stale["z"] < threshold < float(raw.sim.data.body_xpos[cube][2])
        assert stale["reward"] == 0.0  # robosuite's pre-refresh reward misses the success
        assert info["success"] and terminated
        assert reward == 1.0
    finally:
        env.close()


def test_lift_sparse_return_positive_iff_success(rs):
    """Many sloppy Lift expert episodes ending on success: sparse return > 0 exactly in the successful ones, and the
    reward of the final (successful) step is 1."""
    outcomes = []
    for seed in range(8):
        rewards, successes = _expert_episode(rs, "lift", 1.5, seed, 80, terminate_on_success=True)
        np.testing.assert_array_equal(rewards, successes.astype(np.float64))
        outcomes.append(bool(successes[-1]))
        assert (rewards.sum() > 0) == bool(successes.any())
    assert any(outcomes) and not all(outcomes), outcomes  # the test needs both kinds of episodes


def test_shaped_reward_is_robosuite_reward_of_the_refreshed_state(rs):
    """reward_shaping=True: the step's reward is robosuite's shaped reward of the state the step ended in."""
    args = rs.default_env_args("lift")
    args["env_kwargs"]["reward_shaping"] = True
    env = rs.RobosuiteEnv(args, max_episode_steps=20)
    try:
        env.reset(seed=3)
        rng = np.random.default_rng(0)
        for _ in range(10):
            action = rng.uniform(-1, 1, size=env.action_dim)
            _, reward, _, _, _ = env.step(action)
            env.env.sim.forward()  # a no-op on the state: the kinematics are already refreshed
            assert reward == pytest.approx(float(env.env.reward(action)), abs=0.0)
            assert reward > 0.0  # the reaching term is positive everywhere
    finally:
        env.close()
