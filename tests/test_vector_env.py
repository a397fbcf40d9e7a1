"""VectorEnv: history stacking, chunk stepping, auto-reset, seeds, faults, recording (on the fake env)."""
from __future__ import annotations

import functools
import os
import signal

import numpy as np
import pytest

from dpft.errors import DpftError
from dpft.envs.fake_env import FakeEnv
from dpft.envs.vector import VectorEnv, WorkerError

KEYS = ("robot0_eef_pos", "object")


def fake(**kw):
    return functools.partial(FakeEnv, **kw)


def manual_episode(seed, actions, **kw):
    """Step one FakeEnv by hand: list of (obs, reward, terminated, truncated, success) after reset."""
    env = FakeEnv(**kw)
    out = [(env.reset(seed=seed), 0.0, False, False, False)]
    for a in actions:
        obs, r, te, tr, info = env.step(a)
        out.append((obs, r, te, tr, info["success"]))
        if te or tr:
            break
    return out


def test_history_padding_and_stacking_by_value():
    actions = np.array([[1.0, 0.0, 0.0], [0.0, -1.0, 0.5], [0.2, 0.2, 0.2]])
    with VectorEnv([fake(), fake()], cond_steps=3, act_steps=1, mode="inline") as venv:
        obs = venv.reset(seeds=[4, 9])
        ref = [manual_episode(s, actions) for s in (4, 9)]
        for i in range(2):
            first = ref[i][0][0]
            for k in KEYS:
                assert obs[k].shape == (2, 3, 3)
                np.testing.assert_array_equal(obs[k][i], np.stack([first[k]] * 3))
        for t in range(3):
            res = venv.step(np.stack([actions[t:t + 1]] * 2))
            for i in range(2):
                # history = obs at steps t-1, t, t+1 (clamped at 0 = front padding), current last
                want = [ref[i][max(0, s)][0] for s in (t - 1, t, t + 1)]
                for k in KEYS:
                    np.testing.assert_array_equal(res.obs[k][i], np.stack([w[k] for w in want]))
                assert res.obs[KEYS[0]].dtype == np.float64


def test_chunk_reward_sum_early_stop_and_auto_reset_final_obs():
    actions = np.array([[0.5, 0.1, -0.3]] * 3)
    n = 2
    with VectorEnv([fake(max_episode_steps=5)] * n, cond_steps=2, act_steps=3, mode="inline") as venv:
        venv.reset(seeds=[3, 4])
        ref = manual_episode(3, [actions[0]] * 10, max_episode_steps=5)
        assert len(ref) == 6  # reset + 5 steps (truncated)
        res1 = venv.step(np.stack([actions] * n))
        np.testing.assert_array_equal(res1.info["steps"], [3, 3])
        assert res1.reward.dtype == np.float32
        assert res1.reward[0] == pytest.approx(sum(r for _, r, _, _, _ in ref[1:4]), rel=1e-6)
        assert not res1.done.any()
        res2 = venv.step(np.stack([actions] * n))
        # only 2 of the 3 actions run: the time limit ends the episode after step 5
        np.testing.assert_array_equal(res2.info["steps"], [2, 2])
        assert res2.reward[0] == pytest.approx(ref[4][1] + ref[5][1], rel=1e-6)
        np.testing.assert_array_equal(res2.truncated, [True, True])
        np.testing.assert_array_equal(res2.terminated, [False, False])
        # final_obs: the last two observations before the reset
        for k in KEYS:
            np.testing.assert_array_equal(res2.final_obs[k][0], np.stack([ref[4][0][k], ref[5][0][k]]))
        # obs: the next episode of env 0, seed 3 + 1 * num_envs = 5, front-padded
        first = FakeEnv().reset(seed=5)
        for k in KEYS:
            np.testing.assert_array_equal(res2.obs[k][0], np.stack([first[k]] * 2))
        ep0 = [e for e in res2.info["episodes"] if e["env"] == 0][0]
        assert ep0["seed"] == 3 and ep0["length"] == 5 and not ep0["failed"] and ep0["truncated"]
        assert ep0["return"] == pytest.approx(sum(r for _, r, _, _, _ in ref[1:]), rel=1e-9)
        assert res2.info["episode_length"][0] == 5
        assert res2.info["episode_return"][0] == pytest.approx(ep0["return"])
        # episode bookkeeping restarts for the new episode
        res3 = venv.step(np.stack([actions] * n))
        assert res3.info["episodes"] == [] and np.isnan(res3.info["episode_return"]).all()


def test_termination_vs_truncation_and_sticky_success():
    # step_size 2: one action (goal - pos) / 2 lands exactly on the goal; then (1, 1, 1) leaves it.
    with VectorEnv([fake(step_size=2.0, max_episode_steps=4),
                    fake(step_size=2.0, max_episode_steps=4, terminate_on_success=True)],
                   cond_steps=1, act_steps=1, mode="inline") as venv:
        obs = venv.reset(seeds=[7, 7])
        to_goal = (obs["object"][:, -1] - obs["robot0_eef_pos"][:, -1]) / 2.0
        res = venv.step(to_goal[:, None, :])
        np.testing.assert_array_equal(res.success, [True, True])
        np.testing.assert_array_equal(res.terminated, [False, True])
        np.testing.assert_array_equal(res.truncated, [False, False])
        assert res.info["episodes"][0]["env"] == 1 and res.info["episodes"][0]["success"]
        assert res.info["episodes"][0]["terminated"] and not res.info["episodes"][0]["truncated"]
        away = np.ones((2, 1, 3))
        res = venv.step(away)
        # env 0 left the goal but success stays set for its episode; env 1 is in a new episode
        np.testing.assert_array_equal(res.success, [True, False])
        for _ in range(2):
            res = venv.step(away)
        assert res.truncated[0] and not res.terminated[0] and res.success[0]
        ep = [e for e in res.info["episodes"] if e["env"] == 0][0]
        assert ep["success"] and ep["length"] == 4 and ep["truncated"]
        assert not res.success[1]  # env 1's second episode never reached the goal


def run_random(venv, seeds, chunks, rng_seed=0):
    """Drive a VectorEnv with seeded random actions; return everything it produced."""
    rng = np.random.default_rng(rng_seed)
    trace = [venv.reset(seeds=seeds)]
    episodes = []
    for _ in range(chunks):
        res = venv.step(rng.uniform(-1, 1, size=(venv.num_envs, venv.act_steps, 3)))
        trace.append((res.obs, res.final_obs, res.reward, res.terminated, res.truncated, res.success))
        episodes += [{k: v for k, v in e.items() if k != "frames"} for e in res.info["episodes"]]
    return trace, episodes


def assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b


def test_seeds_reproducible_across_runs_and_modes_with_more_envs_than_cores():
    n = 5  # more workers than the 2 cores of the build machine
    fns = [fake(max_episode_steps=6)] * n
    seeds = [10, 11, 12, 13, 14]
    with VectorEnv(fns, cond_steps=2, act_steps=4, mode="inline") as venv:
        inline_a = run_random(venv, seeds, 6)
    with VectorEnv(fns, cond_steps=2, act_steps=4, mode="inline") as venv:
        inline_b = run_random(venv, seeds, 6)
    with VectorEnv(fns, cond_steps=2, act_steps=4, mode="process") as venv:
        assert len(set(venv.worker_pids)) == n and os.getpid() not in venv.worker_pids
        proc = run_random(venv, seeds, 6)
    assert_same(inline_a, inline_b)
    assert_same(inline_a, proc)
    # seed stream: env i runs seeds[i], seeds[i] + 5, seeds[i] + 10, ...
    by_env = {}
    for e in proc[1]:
        by_env.setdefault(e["env"], []).append(e["seed"])
    assert by_env[0] == [10, 15, 20] and by_env[4] == [14, 19, 24]  # 2 chunks (4 + 2 steps) per episode
    assert all(e["length"] == 6 for e in proc[1])


def test_reset_none_continues_streams_and_reset_envs_explicit_seed():
    with VectorEnv([fake(), fake()], mode="inline") as venv:
        with pytest.raises(DpftError, match="never reset"):
            venv.step(np.zeros((2, 1, 3)))
        part = venv.reset_envs([0], seeds=[3])  # env 1 was never reset: zeros
        np.testing.assert_array_equal(part["object"][0, -1], FakeEnv().reset(seed=3)["object"])
        assert not part["object"][1].any()
        first = venv.reset()  # streams start at 0, 1
        np.testing.assert_array_equal(first["object"][1, -1], FakeEnv().reset(seed=1)["object"])
        again = venv.reset()  # next stream seeds: 2, 3
        np.testing.assert_array_equal(again["object"][0, -1], FakeEnv().reset(seed=2)["object"])
        obs = venv.reset_envs([1], seeds=[42])
        np.testing.assert_array_equal(obs["object"][1, -1], FakeEnv().reset(seed=42)["object"])
        np.testing.assert_array_equal(obs["object"][0], again["object"][0])


def test_active_mask_and_held_envs_without_auto_reset():
    with VectorEnv([fake(max_episode_steps=2)] * 2, act_steps=2, mode="inline") as venv:
        obs = venv.reset(seeds=[0, 1])
        res = venv.step(np.ones((2, 2, 3)), active=np.array([True, False]), auto_reset=False)
        np.testing.assert_array_equal(res.info["steps"], [2, 0])
        assert res.reward[1] == 0.0
        for k in KEYS:
            np.testing.assert_array_equal(res.obs[k][1], obs[k][1])
            np.testing.assert_array_equal(res.obs[k][0], res.final_obs[k][0])  # held, not reset
        assert res.truncated[0] and res.info["needs_reset"][0] and not res.info["needs_reset"][1]
        with pytest.raises(DpftError, match=r"env\(s\) \[0\] ended their episode"):
            venv.step(np.ones((2, 2, 3)))
        venv.reset_envs([0], seeds=[9])
        res = venv.step(np.ones((2, 2, 3)))
        assert [e["seed"] for e in res.info["episodes"]] == [9, 1]


def test_recording_frames_inline():
    with VectorEnv([fake(max_episode_steps=3)] * 2, act_steps=3, mode="inline") as venv:
        venv.set_recording(1, True, size=(24, 32))
        assert venv.is_recording(1) and not venv.is_recording(0)
        venv.reset(seeds=[0, 1])
        res = venv.step(np.full((2, 3, 3), 0.5))
        eps = {e["env"]: e for e in res.info["episodes"]}
        assert "frames" not in eps[0]
        frames = eps[1]["frames"]
        assert frames.dtype == np.uint8 and frames.shape == (4, 24, 32, 3)  # reset frame + 3 steps
        env = FakeEnv(max_episode_steps=3)
        env.reset(seed=1)
        np.testing.assert_array_equal(frames[0], env.render(24, 32))
        for _ in range(3):
            env.step(np.full(3, 0.5))
        np.testing.assert_array_equal(frames[-1], env.render(24, 32))
        # recording continues into the auto-reset episode; turning it off drops the frames
        res = venv.step(np.full((2, 3, 3), 0.5))
        assert res.info["episodes"][1]["frames"].shape == (4, 24, 32, 3)
        venv.set_recording(1, False)
        res = venv.step(np.full((2, 3, 3), 0.5))
        assert all("frames" not in e for e in res.info["episodes"])
        np.testing.assert_array_equal(venv.render(0, 8, 8), venv.render(0, 8, 8))
        assert venv.get_state(0).shape == (7,)


def test_kill_worker_restarts_and_reports_failed_episode():
    fns = [fake(max_episode_steps=8)] * 3
    with VectorEnv(fns, act_steps=2, mode="inline") as venv:
        ref_trace, ref_eps = run_random(venv, [0, 1, 2], 6)
    with VectorEnv(fns, act_steps=2, mode="process") as venv:
        rng = np.random.default_rng(0)
        venv.reset(seeds=[0, 1, 2])
        episodes = []
        old_pid = venv.worker_pids[1]
        for t in range(6):
            if t == 2:
                os.kill(old_pid, signal.SIGKILL)
            res = venv.step(rng.uniform(-1, 1, size=(3, 2, 3)))
            if t == 2:
                np.testing.assert_array_equal(res.info["failed"], [False, True, False])
                np.testing.assert_array_equal(res.truncated, [False, True, False])
                assert venv.worker_pids[1] != old_pid and venv.worker_pids[0] != old_pid
                # final_obs of the cut episode = the last good history (after 2 chunks = 4 steps)
                for k in KEYS:
                    np.testing.assert_array_equal(res.final_obs[k][1], ref_trace[2][0][k][1])
                # env 1 continues with the next seed of its stream (1 + 3)
                np.testing.assert_array_equal(res.obs["object"][1, -1], FakeEnv().reset(seed=4)["object"])
                for k in KEYS:  # the other envs are untouched
                    np.testing.assert_array_equal(res.obs[k][[0, 2]], ref_trace[3][0][k][[0, 2]])
            episodes += res.info["episodes"]
    failed = [e for e in episodes if e["failed"]]
    assert len(failed) == 1
    assert failed[0]["env"] == 1 and failed[0]["seed"] == 1 and failed[0]["length"] == 4
    assert "worker 1" in failed[0]["reason"] and "died (exit code -9)" in failed[0]["reason"]
    assert "at env step 4" in failed[0]["reason"]
    assert [e for e in episodes if e["env"] != 1] == [e for e in ref_eps if e["env"] != 1]


def test_hung_worker_times_out_and_is_restarted():
    with VectorEnv([fake(hang_on_seed=1, fault_step=2), fake()], act_steps=1, mode="process",
                   worker_timeout_s=1.5) as venv:
        venv.reset(seeds=[1, 2])
        venv.step(np.zeros((2, 1, 3)))
        res = venv.step(np.zeros((2, 1, 3)))  # env 0 hangs at its step 2
        assert res.info["failed"][0] and not res.info["failed"][1]
        assert "worker 0" in res.info["fail_reason"][0] and "did not answer within 1.5 s" in res.info["fail_reason"][0]
        assert res.info["steps"][1] == 1
        res = venv.step(np.zeros((2, 1, 3)))  # seed 1 + 2 = 3 does not hang
        assert not res.info["failed"].any()


def test_env_exception_and_nan_observation_end_episode_as_failed():
    with VectorEnv([fake(raise_on_seed=0), fake(nan_on_seed=1)], act_steps=4, cond_steps=2,
                   mode="inline") as venv:
        venv.reset(seeds=[0, 1])
        res = venv.step(np.zeros((2, 4, 3)))
        np.testing.assert_array_equal(res.info["failed"], [True, True])
        np.testing.assert_array_equal(res.info["nan_resets"], [False, True])
        assert "env 0 raised RuntimeError: FakeEnv fault injected at step 3" in res.info["fail_reason"][0]
        assert "non-finite value in observation 'robot0_eef_pos' at env step 3" in res.info["fail_reason"][1]
        assert np.isfinite(res.final_obs["robot0_eef_pos"]).all()
        assert res.info["steps"][1] == 3 and res.info["episodes"][1]["length"] == 3
        # both continue with their next stream seeds (2 and 3)
        np.testing.assert_array_equal(res.obs["object"][:, -1],
                                      np.stack([FakeEnv().reset(seed=s)["object"] for s in (2, 3)]))


class AlwaysRaises(FakeEnv):
    def step(self, action):
        raise ValueError("broken env")


def test_repeated_failures_raise_instead_of_looping():
    with VectorEnv([AlwaysRaises], mode="inline", max_consecutive_failures=3) as venv:
        venv.reset(seeds=[0])
        for _ in range(2):
            assert venv.step(np.zeros((1, 1, 3))).info["failed"][0]
        with pytest.raises(WorkerError, match="env 0 failed 3 times in a row.*broken env"):
            venv.step(np.zeros((1, 1, 3)))


def bad_factory_dpft():
    raise DpftError("env_args key 'env_name' is missing")


def bad_factory_value():
    raise ValueError("no such robot")


def test_worker_errors_are_reported_in_the_parent():
    with pytest.raises(DpftError, match="env_args key 'env_name' is missing"):
        VectorEnv([bad_factory_dpft], mode="process")
    with pytest.raises(WorkerError, match=r"env 0 failed to build its env: ValueError: no such robot(.|\n)*Traceback"):
        VectorEnv([bad_factory_value], mode="process")
    with pytest.raises(DpftError, match="cannot be pickled"):
        VectorEnv([lambda: FakeEnv()], mode="process")


def test_bad_input_messages_and_close():
    with pytest.raises(DpftError, match="cond_steps must be an integer >= 1"):
        VectorEnv([fake()], cond_steps=0, mode="inline")
    with pytest.raises(DpftError, match="mode must be 'process' or 'inline'"):
        VectorEnv([fake()], mode="thread")
    with pytest.raises(DpftError, match="context must be 'forkserver' or 'spawn'"):
        VectorEnv([fake()], context="fork")
    venv = VectorEnv([fake(), fake()], act_steps=2, mode="process")
    try:
        with pytest.raises(DpftError, match="got 1 seeds for 2 envs"):
            venv.reset(seeds=[0])
        venv.reset(seeds=[0, 1])
        with pytest.raises(DpftError, match=r"shape \(num_envs, act_steps, action_dim\) = \(2, 2, 3\), got \(2, 1, 3\)"):
            venv.step(np.zeros((2, 1, 3)))
        with pytest.raises(DpftError, match=r"non-finite \(NaN/inf\) actions for env\(s\) \[1\]"):
            venv.step(np.stack([np.zeros((2, 3)), np.full((2, 3), np.nan)]))
        procs = [h.process for h in venv._handles]
    finally:
        venv.close()
    assert not any(p.is_alive() for p in procs)
    venv.close()  # idempotent
    with pytest.raises(DpftError, match="closed"):
        venv.reset()


def env_from_environ():
    """Encodes what the worker sees in its environment into max_episode_steps."""
    return FakeEnv(max_episode_steps=int(os.environ["DPFT_TEST_FAKE_STEPS"]) + 100 * int(os.environ["OMP_NUM_THREADS"]))


def test_workers_see_the_parents_current_environment_and_one_thread(monkeypatch):
    with VectorEnv([fake()], mode="process"):  # make sure the forkserver already runs
        pass
    monkeypatch.setenv("DPFT_TEST_FAKE_STEPS", "7")  # set after the forkserver started
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    with VectorEnv([env_from_environ], mode="process") as venv:
        assert venv.max_episode_steps == 107
    assert os.environ["OMP_NUM_THREADS"] == "4"


@pytest.mark.robosuite
def test_robosuite_lift_in_a_worker_matches_in_process():
    pytest.importorskip("robosuite")
    from dpft.envs.registry import EnvFactory, env_args_for_task

    env_args = env_args_for_task("lift")
    # robosuite draws the cube size once, at construction, from the env's rng: a construction seed makes two
    # instances (worker and in-process) identical
    env_args["env_kwargs"]["seed"] = 0
    factory = EnvFactory(env_args, obs_keys=["robot0_eef_pos", "object"], kwargs={"max_episode_steps": 3})
    actions = np.random.default_rng(0).uniform(-1, 1, size=(2, 1, 2, 7))
    runs = []
    for mode in ("process", "inline"):
        with VectorEnv([factory], cond_steps=2, act_steps=2, mode=mode) as venv:
            assert venv.obs_shapes == {"robot0_eef_pos": (3,), "object": (10,)} and venv.action_dim == 7
            trace = [venv.reset(seeds=[5])]
            for chunk in actions:
                res = venv.step(chunk)
                trace.append((res.obs, res.final_obs, res.reward, res.info["steps"]))
            runs.append(trace)
    assert_same(runs[0], runs[1])
    np.testing.assert_array_equal(runs[0][2][3], [1])  # 2 + 1 steps: the time limit cut the second chunk
    assert not np.array_equal(runs[0][2][1]["object"], runs[0][2][0]["object"])  # auto-reset to seed 6
