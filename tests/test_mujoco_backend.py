"""The mujoco backend (dpft.envs.mujoco_backend): one-step parity with robosuite along scripted-expert trajectories,
resets equal to robosuite's for a seed, expert success identical, batched vector stepping equal to env-by-env stepping,
backend selection and the errors for what it does not implement."""
from __future__ import annotations

import numpy as np
import pytest

from dpft.errors import DpftError
from dpft.envs.render import setup_rendering

setup_rendering(require=False)
pytest.importorskip("robosuite")

from dpft.envs import osc_batch as osc  # noqa: E402
from dpft.envs.mujoco_backend import (  # noqa: E402
    MujocoEnv, one_step_parity, reset_parity, split_backend,
)
from dpft.envs.registry import EnvFactory, make_env  # noqa: E402
from dpft.envs.robosuite_env import RobosuiteEnv, default_env_args  # noqa: E402

pytestmark = pytest.mark.robosuite

#: every key within 1e-6 (README "Simulation backends"); steps where robosuite's own dynamics are not determined to
#: 1e-6 (a 1e-12 perturbation of its state moves the next state as much) are counted apart by one_step_parity
TOL = {}


def fast_args(task, backend="mujoco"):
    args = default_env_args(task)
    args["env_kwargs"]["backend"] = backend
    return args


@pytest.mark.parametrize("task,noise,seed", [("lift", 0.0, 0), ("lift", 0.5, 1), ("can", 0.3, 0), ("square", 0.3, 0)])
def test_one_step_parity_along_expert_trajectories(task, noise, seed):
    r = one_step_parity(task, [seed], noise=noise, steps=40)
    assert r["steps"] == 40
    assert r["mismatch"] == []  # reward and success identical at every step
    assert r["ill"] <= 2
    for key, err in r["max_err"].items():
        assert err <= TOL.get(key, 1e-6), (key, err)
    assert r["max_err"]["qpos"] <= 1e-6


def test_resets_equal_robosuite_for_seeds():
    assert reset_parity("lift", range(20)) == 0.0
    assert reset_parity("can", range(5)) == 0.0


def test_scripted_expert_success_equal_on_both_backends():
    from dpft.envs.experts import EXPERTS

    outcome = {}
    for backend in ("robosuite", "mujoco"):
        env = make_env(fast_args("lift", backend))
        assert isinstance(env, MujocoEnv) == (backend == "mujoco")
        wins = []
        for seed in range(3):
            env.reset(seed=seed)
            expert = EXPERTS["lift"](noise=0.3)
            expert.reset(env, rng=np.random.default_rng(seed))
            success = False
            for _ in range(120):
                _, _, _, _, info = env.step(expert.act(env))
                success = success or info["success"]
                if expert.done:
                    break
            wins.append(success)
        outcome[backend] = wins
        env.close()
    assert outcome["mujoco"] == outcome["robosuite"] == [True, True, True]


def test_batched_vector_env_equals_env_by_env_stepping():
    from dpft.envs.vector import VectorEnv

    args = fast_args("lift")
    chunks = np.random.default_rng(0).uniform(-1, 1, size=(4, 3, 2, 7))
    runs = []
    for batched in (True, False):
        venv = VectorEnv([EnvFactory(args, kwargs={"max_episode_steps": 5})] * 3, cond_steps=2, act_steps=2,
                         mode="inline")
        if not batched:
            venv._prestep_batched = lambda cmds: None
        venv.reset([0, 1, 2])
        out = []
        for chunk in chunks:
            res = venv.step(chunk)
            out.append((res.obs["robot0_eef_pos"].copy(), res.reward.copy(), res.truncated.copy(),
                        res.info["steps"].copy()))
        venv.close()
        runs.append(out)
    for (o1, r1, t1, s1), (o2, r2, t2, s2) in zip(*runs):
        np.testing.assert_array_equal(o1, o2)  # the controller is computed row by row: batching changes nothing
        assert (r1 == r2).all() and (t1 == t2).all() and (s1 == s2).all()
    assert runs[0][2][2].all()  # episodes of 5 steps ended in the third chunk (auto-reset)


def test_backend_selection_and_errors():
    assert split_backend(default_env_args("lift"))[0] in ("mujoco", "robosuite")
    assert split_backend(fast_args("lift", "robosuite"))[0] == "robosuite"
    with pytest.raises(DpftError, match="backend.*'bullet'.*mujoco, robosuite"):
        split_backend(fast_args("lift", "bullet"))
    args = fast_args("lift")
    args["env_kwargs"]["reward_shaping"] = True
    with pytest.raises(DpftError, match="reward_shaping=True.*env_kwargs.backend=robosuite"):
        make_env(args)
    with pytest.raises(DpftError, match="TwoArmTransport.*Lift, PickPlaceCan, NutAssemblySquare"):
        MujocoEnv(default_env_args("transport"))
    with pytest.raises(DpftError, match="camera observations.*agentview_image"):
        MujocoEnv(fast_args("lift"), obs_keys=["agentview_image"])
    args = fast_args("lift")
    args["env_kwargs"]["controller_configs"]["body_parts"]["right"]["type"] = "OSC_POSITION"
    with pytest.raises(DpftError, match="arm controller OSC_POSITION.*robosuite instead"):
        MujocoEnv(args)


def test_nan_physics_state_cuts_the_episode():
    from dpft.envs.vector import VectorEnv

    venv = VectorEnv([EnvFactory(fast_args("lift"))] * 2, cond_steps=1, act_steps=1, mode="inline")
    venv.reset([0, 1])
    env = venv._handles[0].runner.env
    env.sim.datas[env.index].qvel[0] = np.nan
    res = venv.step(np.zeros((2, 1, 7)))
    assert res.truncated[0] and not res.truncated[1]
    assert res.info["episodes"][0]["failed"] is True or "non-finite" in str(res.info["episodes"][0])
    venv.close()


def test_torch_twin_equals_numpy():
    torch = pytest.importorskip("torch")
    xp = osc.torch_namespace()
    rng = np.random.default_rng(0)
    q = rng.normal(size=(16, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    for fn in (osc.quat2mat,):
        np.testing.assert_allclose(fn(q), fn(torch.as_tensor(q), xp).numpy(), atol=1e-6)
    v = rng.normal(size=(16, 3))
    np.testing.assert_allclose(osc.axisangle2quat(v), osc.axisangle2quat(torch.as_tensor(v), xp).numpy(), atol=1e-12)
    env = RobosuiteEnv(default_env_args("lift"))
    p = osc.OSCParams.from_robosuite(env.env.robots[0])
    env.close()
    n = 7
    a = rng.uniform(-1, 1, size=(16, 6))
    pos, mat = rng.normal(size=(16, 3)), osc.quat2mat(q)
    bpos, bmat = rng.normal(size=(16, 3)), osc.quat2mat(q[::-1].copy())
    g_np = osc.osc_goal(a, pos, mat, bpos, bmat, p)
    t = [torch.as_tensor(x) for x in (a, pos, mat, bpos, bmat)]
    g_t = osc.osc_goal(*t, p, xp=xp)
    for x, y in zip(g_np, g_t):
        np.testing.assert_allclose(x, y.numpy(), atol=1e-6)
    jac = rng.normal(size=(16, 6, n))
    mass = rng.normal(size=(16, n, n))
    mass = mass @ np.swapaxes(mass, 1, 2) + n * np.eye(n)
    rest = [rng.normal(size=(16, 6)), rng.normal(size=(16, 6)), jac, mass] + [rng.normal(size=(16, n)) for _ in range(4)]
    tau_np = osc.osc_torques(g_np[0], g_np[1], pos, mat, rest[0], bpos, bmat, rest[1], *rest[2:], p)
    tau_t = osc.osc_torques(*[torch.as_tensor(x) for x in (g_np[0], g_np[1], pos, mat, rest[0], bpos, bmat, rest[1])],
                            *[torch.as_tensor(x) for x in rest[2:]], p, xp=xp)
    np.testing.assert_allclose(tau_np, tau_t.numpy(), atol=1e-8)


@pytest.mark.slow
def test_finetune_records_the_backend_and_builds_its_envs_inline(tmp_path):
    """backend=robosuite|mujoco on `dpft finetune` is recorded in the run's meta env_args (rollouts of its checkpoints
    use the same physics); without it the run records the default; the mujoco backend's envs run inline."""
    from dpft.envs.vector import VectorEnv
    from tests.synth import write_robomimic_hdf5
    from tests.test_finetune import _finetuner, _pretrain

    data = tmp_path / "lift_synth.hdf5"
    write_robomimic_hdf5(data, num_demos=2, lengths=[10, 10], env_args=default_env_args("lift"))
    run = _pretrain(data, tmp_path / "run", "policy.mlp_dims=[8]", "policy.denoising_steps=4", "horizon_steps=2",
                    "act_steps=2", "obs_keys=[robot0_eef_pos,object]")
    for backend in ("robosuite", "mujoco", None):
        extra = [] if backend is None else ["backend=%s" % backend]
        ft = _finetuner(tmp_path / ("ft_%s" % backend), "agent=dppo", "checkpoint=%s" % run, "envs=2",
                        "agent.ft_denoising_steps=2", "max_episode_steps=4", *extra)
        try:
            want = backend or split_backend(default_env_args("lift"))[0]
            assert ft.meta["env_args"]["env_kwargs"]["backend"] == want
            assert isinstance(ft.env, VectorEnv) and ft.env.mode == ("inline" if want == "mujoco" else "process")
            obs = ft.env.reset([0, 1])
            assert obs["robot0_eef_pos"].shape[:2] == (2, 1)
        finally:
            ft.env.close()
    with pytest.raises(DpftError, match="backend='bullet' is not known; expected mujoco or robosuite"):
        _finetuner(tmp_path / "bad", "agent=dppo", "checkpoint=%s" % run, "backend=bullet")


def test_closed_envs_free_their_slot_in_the_shared_simulator():
    a = make_env(fast_args("lift"))
    b = make_env(fast_args("lift"))
    assert a.sim is b.sim and a.index != b.index
    n = len(a.sim.datas)
    a.close()
    c = make_env(fast_args("lift"))
    assert c.index == a.index and len(c.sim.datas) == n
    np.testing.assert_array_equal(c.reset(seed=3)["object"], b.reset(seed=3)["object"])
    b.close()
    c.close()


def test_gpu_check_script_parses():
    import os
    import subprocess

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "gpu_check.sh")
    res = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_frames_equal_robosuite_frames_of_the_same_state():
    rs = RobosuiteEnv(default_env_args("lift"))
    fast = make_env(fast_args("lift"))
    try:
        rs.reset(seed=4)
        fast.reset(seed=4)
        a = np.array([0.3, -0.2, 0.1, 0.0, 0.0, 0.1, 1.0])
        for _ in range(3):
            rs.step(a)
            fast.step(a)
        np.testing.assert_array_equal(fast.render(32, 32, "agentview"), rs.render(32, 32, "agentview"))
        with pytest.raises(DpftError, match="no camera 'nope'"):
            fast.render(8, 8, "nope")
    finally:
        fast.close()
        rs.close()


def test_pixel_env_args_and_keys_use_robosuite_unless_asked():
    from dpft.envs.rollout import env_mode_for

    args = default_env_args("lift", image_obs=True)
    assert env_mode_for(args) == "process"  # pixel checkpoints keep robosuite's worker processes
    img = make_env(args, obs_keys=["agentview_image", "robot0_eef_pos"])
    assert isinstance(img, RobosuiteEnv)  # the default backend falls back: images are robosuite's
    img.close()
    args["env_kwargs"]["backend"] = "mujoco"  # low-dim keys of an image dataset on the fast backend
    low = make_env(args, obs_keys=["robot0_eef_pos"])
    assert isinstance(low, MujocoEnv) and env_mode_for(args) == "inline"
    low.close()


def test_default_backend_can_be_changed_and_is_checked(monkeypatch):
    import dpft.envs.mujoco_backend as mb

    monkeypatch.setattr(mb, "DEFAULT_BACKEND", "robosuite")
    assert split_backend(default_env_args("lift"))[0] == "robosuite"
    monkeypatch.setattr(mb, "DEFAULT_BACKEND", "mujoco")
    assert split_backend(default_env_args("transport"))[0] == "robosuite"  # not implemented: robosuite
    monkeypatch.setattr(mb, "DEFAULT_BACKEND", "physx")
    with pytest.raises(DpftError, match="DPFT_DEFAULT_BACKEND is 'physx'; set it to one of mujoco, robosuite"):
        split_backend(default_env_args("lift"))
