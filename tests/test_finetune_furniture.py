"""dpft finetune on FurnitureBench through the CPU fake simulator (``env_args["env_kwargs"]["simulator"] = "fake"``):
every agent (dppo, ppo, residual_ppo, idql) runs 2 iterations from a tiny pretrained furniture checkpoint with its
``<agent>_furniture`` preset, logs env_steps = envs x n_steps x act_steps per iteration, writes a checkpoint that
``dpft.load_policy`` rebuilds and ``dpft.envs.rollout.rollout`` / ``dpft rollout`` evaluate in the fake; a run killed
after iteration 1 and resumed ends with the same weights as an uninterrupted one (the fake is seeded from torch's
global generator, which FurnitureEnv.reset seeds); a missing Isaac Gym and an unknown simulator are reported."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

from dpft.config import compose
from dpft.errors import DpftError
from dpft.envs.furniture import make_furniture_env
from dpft.envs.furniture_fake import FakeFurnitureRLSimEnv
from tests.synth import write_demos_hdf5

DOWN6D = [1.0, 0.0, 0.0, 0.0, -1.0, 0.0]  # rot6d of pi about x (gripper pointing down)
TINY_PRE = ["steps=4", "batch_size=8", "save_every=4", "val_every=0", "progress=false", "num_threads=1",
            "data.valid_ratio=0", "warmup_steps=1", "obs_keys=[robot_state,parts_poses]"]
# 2 envs x 3 chunks; episodes of 8 env steps (a multiple of act_steps 2, so no episode ends inside a chunk)
TINY_FT = ["envs=2", "n_steps=3", "iterations=2", "eval_episodes=2", "progress=false", "max_episode_steps=8",
           "eval_every=1", "save_every=1", "agent.batch_size=6", "agent.update_epochs=2",
           "agent.n_critic_warmup_itr=0", "num_threads=1"]
AGENT_ARGS = {
    "dppo": ["agent=dppo", "agent.critic_dims=[16,16,16]"],
    "ppo": ["agent=ppo", "agent.critic_dims=[16,16,16]"],
    "residual_ppo": ["agent=residual_ppo", "agent.critic_dims=[16,16]", "agent.mlp_dims=[16,16]"],
    "idql": ["agent=idql", "agent.batch_size=8", "agent.replay_ratio=4", "agent.replay_size=64",
             "agent.num_candidates=3", "agent.critic_dims=[16,16,16]"],
}


def furniture_env_args(simulator="fake"):
    kw = {"furniture": "one_leg", "randomness": "low", "act_rot_repr": "rot_6d", "action_type": "pos",
          "ctrl_mode": "diffik", "max_episode_steps": 700}  # what tools/convert_furniture_demos.py records
    if simulator is not None:
        kw["simulator"] = simulator
    return {"env_name": "FurnitureRLSim-one_leg", "type": "furniture", "env_version": "ankile/furniture-bench",
            "env_kwargs": kw}


def write_fake_demos(path, env_args, num=3, steps=16):
    """Demos recorded in the fake: the end effector is commanded towards one_leg's leg (part 4) with noise."""
    rng = np.random.default_rng(0)
    env = make_furniture_env("one_leg", num_envs=num, act_steps=1, max_episode_steps=steps, device="cpu",
                             env_cls=FakeFurnitureRLSimEnv)
    obs = env.reset(seeds=[7] * num)
    rec = {k: [] for k in ("robot_state", "parts_poses", "actions")}
    for _ in range(steps):
        action = np.zeros((num, 10), np.float32)
        action[:, :3] = obs["parts_poses"][:, -1, 28:31] + rng.normal(0, 0.01, (num, 3))
        action[:, 3:9] = DOWN6D
        action[:, 9] = rng.choice([-1.0, 1.0], num)
        rec["robot_state"].append(obs["robot_state"][:, -1])
        rec["parts_poses"].append(obs["parts_poses"][:, -1])
        rec["actions"].append(action)
        obs = env.step(action[:, None]).obs
    env.close()
    demos = {"demo_%d" % i: {"obs": {"robot_state": np.stack(rec["robot_state"])[:, i],
                                     "parts_poses": np.stack(rec["parts_poses"])[:, i]},
                             "actions": np.stack(rec["actions"])[:, i]} for i in range(num)}
    write_demos_hdf5(str(path), demos, env_args=env_args)
    return str(path)


def _pretrain(dataset, out, *extra):
    from dpft.agents.pretrain import pretrain

    pretrain(compose("pretrain", ["dataset=%s" % dataset, "out=%s" % out] + TINY_PRE + list(extra)))
    return str(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny pretrained furniture checkpoints: diffusion (DDPM 20 steps, DDIM-able) and Gaussian, chunks of 4, 2
    executed; plus a diffusion run whose env_args name no simulator (Isaac Gym) and one with an unknown one."""
    d = tmp_path_factory.mktemp("furn")
    data = write_fake_demos(d / "fake.hdf5", furniture_env_args("fake"))
    out = {"diffusion": _pretrain(data, d / "diff", "policy.mlp_dims=[16,16,16]", "policy.denoising_steps=20",
                                  "horizon_steps=4", "act_steps=2"),
           "gaussian": _pretrain(data, d / "gauss", "policy=gaussian_mlp", "policy.mlp_dims=[16,16]",
                                 "horizon_steps=4", "act_steps=2")}
    for name, sim in (("isaacgym", None), ("unknown", "bullet")):
        other = write_fake_demos(d / ("%s.hdf5" % name), furniture_env_args(sim), num=1, steps=4)
        out[name] = _pretrain(other, d / name, "policy.mlp_dims=[8]", "policy.denoising_steps=5", "steps=1",
                              "save_every=1", "batch_size=2")
    return out


def _args(out, agent, ckpt, *extra):
    from dpft.cli import _with_preset

    return _with_preset(["checkpoint=%s" % ckpt, "out=%s" % out] + TINY_FT + AGENT_ARGS[agent] + list(extra))


def _ckpt_for(runs, agent):
    return runs["gaussian" if agent == "ppo" else "diffusion"]


def _final_tensors(run):
    from dpft.checkpoint import find_latest, read_tensors

    d = find_latest(str(run))
    out = {"model": read_tensors(os.path.join(d, "model.safetensors"))}
    ts = os.path.join(d, "training_state")
    for f in sorted(os.listdir(ts)):
        if f.endswith(".safetensors"):
            out[f] = read_tensors(os.path.join(ts, f))
    return out


def _no_host_array(self, *args, **kwargs):
    raise AssertionError("np.asarray of a torch tensor: a CUDA tensor from Isaac Gym would refuse it")


@pytest.mark.parametrize("agent", ["dppo", "ppo", "residual_ppo", "idql"])
def test_finetune_runs_on_the_fake_and_its_checkpoint_rolls_out(tmp_path, runs, agent, monkeypatch):
    import dpft
    from dpft.agents.finetune import finetune
    from dpft.envs.rollout import rollout

    args = _args(tmp_path / "ft", agent, _ckpt_for(runs, agent))
    assert args[0] == "preset=%s_furniture" % agent  # ResiP / DPPO furniture defaults, overridden by TINY_FT
    cfg = compose("finetune", args)
    assert cfg.terminate_on_success is False  # furniture presets: episodes run to the time limit
    from dpft.cli import _with_preset

    full = compose("finetune", _with_preset(["checkpoint=%s" % _ckpt_for(runs, agent), "out=o"] + AGENT_ARGS[agent]))
    assert (full.envs, full.eval_episodes) == ((1024, 1024) if agent == "residual_ppo" else (1000, 1000))
    assert full.max_episode_steps is None  # the task's length (env_args), not one_leg's 700 for every task
    # the run's env returns torch tensors (return_torch=True): the collector and the evaluation must copy them
    # explicitly (.cpu()), never through numpy's __array__, which fails on the GPU tensors Isaac Gym gives
    monkeypatch.setattr(torch.Tensor, "__array__", _no_host_array)
    final = finetune(cfg)
    monkeypatch.undo()
    assert os.path.basename(final) == "step_00000002"
    recs = [json.loads(line) for line in open(tmp_path / "ft" / "metrics.jsonl")]
    meta = json.load(open(os.path.join(final, "meta.json")))
    act_steps = int(meta["act_steps"])  # residual PPO acts every env step (1); the others execute 2 of 4
    assert act_steps == (1 if agent == "residual_ppo" else 2)
    assert [r["iteration"] for r in recs] == [0, 1, 2]
    assert [r["env_steps"] for r in recs] == [0, 2 * 3 * act_steps, 2 * 2 * 3 * act_steps]
    for r in recs:  # evaluated before training and after every iteration: 2 episodes of 8 env steps
        assert r["eval/episodes"] == 2 and r["eval/length"] == 8 and 0.0 <= r["eval/success_rate"] <= 1.0
    for r in recs[1:]:
        assert r["train/success_rate"] is None or 0.0 <= r["train/success_rate"] <= 1.0
        assert r["train/nan_episodes"] == 0
    assert meta["env_args"]["env_kwargs"]["simulator"] == "fake"

    policy = dpft.load_policy(str(tmp_path / "ft"))
    env = make_furniture_env("one_leg", num_envs=2, act_steps=act_steps, cond_steps=1, max_episode_steps=8,
                             device="cpu", env_cls=FakeFurnitureRLSimEnv)
    try:
        res = rollout(policy, env, episodes=3, seed=100000, progress=False)
    finally:
        env.close()
    assert res["num_episodes"] == 3 and res["num_failed"] == 0 and res["mean_length"] == 8
    # the checkpoint evaluates exactly as the run's final evaluation did (same seeds, same fake, same policy)
    env = make_furniture_env("one_leg", num_envs=2, act_steps=act_steps, cond_steps=1, max_episode_steps=8,
                             device="cpu", env_cls=FakeFurnitureRLSimEnv, return_torch=True)
    try:
        res = rollout(policy, env, episodes=2, seed=int(cfg.eval_seed), progress=False)
    finally:
        env.close()
    assert res["mean_return"] == pytest.approx(recs[-1]["eval/return"], abs=1e-9)
    assert res["success_rate"] == recs[-1]["eval/success_rate"]


def test_simulator_override_and_dpft_rollout_without_isaacgym(tmp_path, runs, monkeypatch):
    """``simulator=fake`` dry-runs a checkpoint recorded for Isaac Gym (converted demos name no simulator); the
    fine-tuned run records the fake in its meta, so `dpft rollout` of it builds the fake too. Isaac Gym is made
    unimportable: neither command needs it."""
    from dpft.cli import main

    monkeypatch.setitem(sys.modules, "isaacgym", None)
    args = _args(tmp_path / "ft", "dppo", runs["isaacgym"], "iterations=1", "simulator=fake", "agent.use_ddim=false",
                 "agent.ft_denoising_steps=2")
    assert main(["finetune"] + args) == 0
    meta = json.load(open(tmp_path / "ft" / "checkpoints" / "step_00000001" / "meta.json"))
    assert meta["env_args"]["env_kwargs"]["simulator"] == "fake"
    assert main(["rollout", "checkpoint=%s" % (tmp_path / "ft"), "episodes=2", "envs=2", "max_episode_steps=6",
                 "out=%s" % (tmp_path / "eval"), "progress=false"]) == 0
    res = json.load(open(tmp_path / "eval" / "result.json"))
    assert res["num_episodes"] == 2 and res["num_failed"] == 0 and res["mean_length"] <= 6  # ends on success too
    with pytest.raises(DpftError, match="simulator='mujoco' is not known; expected isaacgym or fake"):
        compose("finetune", args + ["simulator=mujoco"])


@pytest.mark.parametrize("agent", ["dppo", "residual_ppo", "idql"])
def test_resume_on_the_fake_equals_an_uninterrupted_run(tmp_path, runs, agent):
    from dpft.agents.finetune import finetune

    ckpt = _ckpt_for(runs, agent)
    finetune(compose("finetune", _args(tmp_path / "full", agent, ckpt)))  # 2 iterations
    finetune(compose("finetune", _args(tmp_path / "part", agent, ckpt, "iterations=1")))  # "killed" after it 1
    finetune(compose("finetune", _args(tmp_path / "part", agent, ckpt, "resume=true")))
    a, b = _final_tensors(tmp_path / "full"), _final_tensors(tmp_path / "part")
    assert a.keys() == b.keys() and len(a) > 2
    for group in a:
        assert a[group].keys() == b[group].keys(), group
        for k in a[group]:
            assert torch.equal(a[group][k], b[group][k]), (group, k)
    ra = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    rb = [json.loads(line) for line in open(tmp_path / "part" / "metrics.jsonl")]
    assert [r["eval/return"] for r in ra] == [r["eval/return"] for r in rb]
    assert [r["env_steps"] for r in ra] == [r["env_steps"] for r in rb]


def test_missing_isaacgym_is_reported_with_the_install_hint(tmp_path, runs, monkeypatch):
    from dpft.agents.finetune import finetune

    monkeypatch.setitem(sys.modules, "isaacgym", None)  # `import isaacgym` fails whether installed or not
    with pytest.raises(DpftError) as e:
        finetune(compose("finetune", _args(tmp_path / "ft", "dppo", runs["isaacgym"], "agent.use_ddim=false",
                                           "agent.ft_denoising_steps=2")))
    msg = str(e.value)
    assert "Isaac Gym Preview 4" in msg and "pip install -e isaacgym/python" in msg and "ankile/furniture-bench" in msg


def test_unknown_simulator_is_refused_naming_the_key(tmp_path, runs):
    from dpft.agents.finetune import finetune
    from dpft.envs.furniture import furniture_env_from_args

    with pytest.raises(DpftError) as e:
        finetune(compose("finetune", _args(tmp_path / "ft", "dppo", runs["unknown"], "agent.use_ddim=false",
                                           "agent.ft_denoising_steps=2")))
    msg = str(e.value)
    assert "env_args['env_kwargs']['simulator']='bullet'" in msg and "'isaacgym', 'fake'" in msg
    env = furniture_env_from_args(furniture_env_args("fake"), 1, 2, 1)  # the recorded (task default) length
    assert (env.max_episode_steps, env.num_envs, env.act_steps, env.task) == (700, 1, 2, "one_leg")
    lamp = {"type": "furniture", "env_kwargs": {"furniture": "lamp", "simulator": "fake"}}
    assert furniture_env_from_args(lamp, 1, 1, 1).max_episode_steps == 1000  # TASKS default
    assert furniture_env_from_args(lamp, 1, 1, 1, max_episode_steps=9).max_episode_steps == 9
    with pytest.raises(DpftError, match=r"\['action_type'\]='delta'.*action_type='pos' only"):
        args = furniture_env_args("fake")
        args["env_kwargs"]["action_type"] = "delta"
        furniture_env_from_args(args, 1, 2, 1)


def test_a_reset_episode_starts_with_the_open_gripper_command():
    """The fork keeps ``last_grasp`` across resets: after an episode that closed the gripper (+1), a first action
    with |grasp| <= grasp_margin (0.019) would close it again. FurnitureEnv resets the command to "open" (-1) with
    every reset, so the width stays at one_leg's max 0.065 (0.065 + 0.5 * (0.065 - 0.065)), as in a fresh env."""
    env = make_furniture_env("one_leg", num_envs=2, act_steps=1, max_episode_steps=3, device="cpu",
                             env_cls=FakeFurnitureRLSimEnv)
    chunk = np.zeros((2, 1, 10), np.float32)
    chunk[..., :3] = [0.45, 0.0, 0.25]
    chunk[..., 3:9] = DOWN6D
    chunk[..., 9] = 1.0  # close
    env.reset(seeds=[0, 0])
    closed = env.step(chunk).obs["robot_state"][:, -1, 15]
    np.testing.assert_allclose(closed, 0.0325, atol=1e-6)  # half-way from 0.065 to 0
    chunk[..., 9] = 0.01  # inside the margin: keep the current command
    for reset in (lambda: env.reset(seeds=[0, 0]),  # full reset (iteration boundary)
                  lambda: env.step(chunk)):  # the episode's 3rd step: auto-reset at the time limit
        # (the fake stores every step's command as the fork does, so the measured step must be the new episode's first)
        env.step(np.concatenate([chunk[..., :9], np.ones((2, 1, 1), np.float32)], -1))  # close again
        reset()
        width = env.step(chunk).obs["robot_state"][:, -1, 15]
        np.testing.assert_allclose(width, 0.065, atol=1e-6)
    env.close()
