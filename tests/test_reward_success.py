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


def test_can_expert_success_step_has_reward_one(rs):
    """The scripted Can expert (noise 0.5, seed 6) reached success at step 194 with reward 0 before the fix: now every
    step's sparse reward is exactly 1.0 when the step is a success and 0.0 otherwise."""
    rewards, successes = _expert_episode(rs, "can", 0.5, 6, 200, terminate_on_success=False)
    assert successes.any(), "the episode should reach success"
    np.testing.assert_array_equal(rewards, successes.astype(np.float64))


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
