"""Scripted experts: the OU noise process (numbers), registry errors, and closed-loop success of the Lift, Can and
Square experts in RobosuiteEnv; noise changes the actions but keeps the episode plausible and seeded."""
from __future__ import annotations

import numpy as np
import pytest

from dpft.errors import DpftError
from dpft.envs.experts import EXPERTS, CanExpert, LiftExpert, OrnsteinUhlenbeck, make_expert


# ------------------------------------------------------------------------------------------- no simulator needed
def test_ou_noise_has_stationary_std_and_lag_correlation():
    ou = OrnsteinUhlenbeck(dim=3, std=0.35, theta=0.15)
    rng = np.random.default_rng(0)
    xs = np.stack([ou.sample(rng) for _ in range(40000)])[1000:]  # drop the burn-in from x = 0
    assert xs.shape == (39000, 3)
    np.testing.assert_allclose(xs.std(axis=0), 0.35, rtol=0.06)
    np.testing.assert_allclose(xs.mean(axis=0), 0.0, atol=0.03)
    for lag in (1, 5):
        corr = np.mean([np.corrcoef(xs[:-lag, d], xs[lag:, d])[0, 1] for d in range(3)])
        assert corr == pytest.approx(0.85 ** lag, abs=0.03)
    ou.reset()
    np.testing.assert_array_equal(ou.x, np.zeros(3))


def test_ou_noise_is_reproducible_from_its_generator():
    a = OrnsteinUhlenbeck(2, 1.0, 0.2)
    b = OrnsteinUhlenbeck(2, 1.0, 0.2)
    ra, rb = np.random.default_rng(7), np.random.default_rng(7)
    np.testing.assert_array_equal([a.sample(ra) for _ in range(5)], [b.sample(rb) for _ in range(5)])


def test_ou_noise_rejects_bad_parameters():
    with pytest.raises(DpftError, match="theta must be in"):
        OrnsteinUhlenbeck(3, 0.1, 0.0)
    with pytest.raises(DpftError, match="std must be >= 0"):
        OrnsteinUhlenbeck(3, -0.1, 0.5)


def test_registry_and_errors():
    assert EXPERTS["lift"] is LiftExpert and EXPERTS["can"] is CanExpert
    assert isinstance(make_expert("lift", noise=0.2), LiftExpert)
    with pytest.raises(DpftError, match=r"No scripted expert for task 'transport'.*can, lift"):
        make_expert("transport")
    with pytest.raises(DpftError, match="noise must be a finite number >= 0"):
        LiftExpert(noise=-0.1)
    with pytest.raises(DpftError, match="noise must be a finite number >= 0"):
        LiftExpert(noise=float("nan"))
    with pytest.raises(DpftError, match=r"act\(\) was called before"):
        LiftExpert().act()
    with pytest.raises(DpftError, match="needs a robosuite environment"):
        LiftExpert().reset(object())


# --------------------------------------------------------------------------------------------------- robosuite
@pytest.fixture(scope="module")
def lift_env(rs):
    env = rs.RobosuiteEnv(rs.default_env_args("lift"))
    yield env
    env.close()


def rollout(env, expert, seed, max_steps, rng_seed=None):
    """Run ``expert`` from ``env.reset(seed)``; return (actions (T, 7), success at the end, ever succeeded)."""
    env.reset(seed=seed)
    expert.reset(env, rng=np.random.default_rng(seed if rng_seed is None else rng_seed))
    actions, ever, success = [], False, False
    for _ in range(max_steps):
        a = expert.act(env)
        actions.append(a)
        _, _, _, _, info = env.step(a)
        success = info["success"]
        ever = ever or success
        if expert.done:
            break
    return np.array(actions), success, ever


@pytest.mark.robosuite
def test_lift_expert_succeeds_and_is_deterministic(lift_env):
    runs = []
    for seed in (0, 1, 2):
        actions, success, _ = rollout(lift_env, LiftExpert(), seed, 150)
        assert success, "Lift expert failed on seed %d" % seed
        assert actions.shape[1] == 7 and 40 <= len(actions) <= 80
        assert np.all(np.abs(actions) <= 1.0)
        np.testing.assert_array_equal(actions[:, 3:6], 0.0)  # no rotation for Lift
        assert actions[0, 6] == -1.0 and actions[-1, 6] == 1.0  # open on approach, closed at the end
        runs.append(actions)
    # noise 0 draws no randomness: the same seed gives the same episode whatever the generator
    again, _, _ = rollout(lift_env, LiftExpert(), 0, 150, rng_seed=123)
    np.testing.assert_array_equal(again, runs[0])


@pytest.mark.robosuite
def test_noise_changes_actions_but_episode_stays_plausible(lift_env):
    clean, _, _ = rollout(lift_env, LiftExpert(noise=0.0), 0, 150)
    noisy, success, _ = rollout(lift_env, LiftExpert(noise=0.5), 0, 200, rng_seed=11)
    same, _, _ = rollout(lift_env, LiftExpert(noise=0.5), 0, 200, rng_seed=11)
    other, _, _ = rollout(lift_env, LiftExpert(noise=0.5), 0, 200, rng_seed=12)
    np.testing.assert_array_equal(noisy, same)  # seeded
    n = min(len(clean), len(noisy), len(other))
    assert np.abs(noisy[:n, :3] - clean[:n, :3]).max() > 0.05
    assert np.abs(noisy[:n, :3] - other[:n, :3]).max() > 0.05
    # plausible: bounded actions, the cube is still lifted, not much longer than the clean demo
    assert success
    assert np.all(np.abs(noisy) <= 1.0)
    assert len(noisy) <= 3 * len(clean)
    # the perturbation is temporally correlated: consecutive translation actions stay close
    step_change = np.abs(np.diff(noisy[:, :3], axis=0)).mean()
    assert step_change < 0.2


@pytest.mark.robosuite
def test_expert_rejects_env_of_another_task(lift_env):
    from dpft.envs.experts import SquareExpert

    with pytest.raises(DpftError, match="CanExpert drives robosuite 'PickPlaceCan'.*'Lift'"):
        CanExpert().reset(lift_env)
    with pytest.raises(DpftError, match="SquareExpert drives robosuite 'NutAssemblySquare'"):
        SquareExpert().reset(lift_env)


@pytest.mark.robosuite
def test_can_expert_places_the_can(rs):
    env = rs.RobosuiteEnv(rs.default_env_args("can"))
    try:
        expert = CanExpert()
        actions, success, _ = rollout(env, expert, 0, 300)
        assert expert.done and success
        raw = env.env
        can = raw.sim.data.body_xpos[raw.obj_body_id["Can"]]
        target = raw.target_bin_placements[raw.object_to_id["can"]]
        # inside the target bin quadrant (robosuite's check: a quarter of the bin size around the placement)
        assert abs(can[0] - target[0]) < raw.bin_size[0] / 4 and abs(can[1] - target[1]) < raw.bin_size[1] / 4
        assert actions[-1, 6] == -1.0  # released
    finally:
        env.close()


@pytest.mark.robosuite
def test_square_expert_puts_the_nut_on_the_peg(rs):
    if "square" not in EXPERTS:
        pytest.skip("no Square expert registered")
    env = rs.RobosuiteEnv(rs.default_env_args("square"))
    try:
        expert = EXPERTS["square"]()
        actions, success, _ = rollout(env, expert, 0, 400)
        assert expert.done and success
        assert np.abs(actions[:, 5]).max() > 0.05  # it turned the gripper to the handle
    finally:
        env.close()
