"""dpft finetune agent=residual_ppo (ResiP on the shared loop): end to end on gym Hopper and robosuite Lift
checkpoints, frozen base, first PPO minibatch at ratio 1, exact resume, load_policy + `dpft rollout`."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from dpft.envs.render import setup_rendering

setup_rendering(require=False)
pytest.importorskip("gymnasium")
pytest.importorskip("mujoco")

from dpft.errors import DpftError  # noqa: E402
from tests.test_finetune import _ft, _pretrain, _weights, diffusion_run, gaussian_run, hopper_data  # noqa: E402,F401

RES = ["agent=residual_ppo", "agent.mlp_dims=[16,16]", "agent.critic_dims=[16,16]", "agent.batch_size=16",
       "agent.update_epochs=2", "n_steps=8", "eval_every=0"]


def test_wrong_checkpoint_kind_is_refused(tmp_path, gaussian_run, diffusion_run):
    from dpft.agents.finetune import finetune

    with pytest.raises(DpftError, match="needs a pretrained diffusion checkpoint as its base.*gaussian"):
        finetune(_ft(tmp_path / "o", "checkpoint=%s" % gaussian_run, *RES))
    with pytest.raises(DpftError, match="base_act_steps=9 must be <= the base's horizon_steps=4"):
        finetune(_ft(tmp_path / "o2", "checkpoint=%s" % diffusion_run, *RES, "agent.residual_base_act_steps=9"))


def test_residual_ppo_on_hopper_end_to_end(tmp_path, diffusion_run):
    import dpft
    from dpft.agents.finetune import Finetuner
    from dpft.checkpoint import load_checkpoint
    from dpft.cli import main
    from dpft.rl.residual import ResidualPolicy

    out = tmp_path / "ft"
    trainer = Finetuner(_ft(out, "checkpoint=%s" % diffusion_run, *RES))
    try:
        assert trainer.env.act_steps == 1 and trainer.meta["base_act_steps"] == 2  # the checkpoint's act_steps
        agent = trainer.agent
        n_res = sum(p.numel() for p in agent.actor_parameters())
        assert n_res == (11 + 3) * 16 + 16 + 16 * 16 + 16 + 16 * 3  # the residual MLP only: no bias, fixed std
        trainer.collector.reset([0, 1])
        ro = trainer.collector.collect(8)
        # zero-init residual: the executed normalized action is base + 0.1 * sample, the mean is exactly the base
        x = agent.model.residual_input(ro.obs["state"].flatten(0, 1), ro.obs["base_action"].flatten(0, 1))
        assert float(agent.model.residual(x).detach().abs().max()) == 0.0
        np.testing.assert_allclose(ro.act["action"][:, :, 0].flatten(0, 1).numpy(),
                                   (ro.obs["base_action"] + 0.1 * ro.act["residual"]).clamp(-1, 1).flatten(0, 1).numpy(),
                                   atol=1e-7)
        assert agent.cache.plans == 2 * 4  # 8 steps, re-plan every 2, no episode ended
        flat = {"obs": {k: v.flatten(0, 1) for k, v in ro.obs.items()},
                "act": {k: v.flatten(0, 1) for k, v in ro.act.items()}, "adv": torch.linspace(-1, 1, 16)}
        _, first = agent.policy_loss(ro, flat, torch.arange(16))  # stored log-probs = the sampler's own
        assert float(first["ratio"]) == 1.0 and float(first["approx_kl"]) == 0.0
        info = agent.update(ro)
        assert info["grad_steps"] == 2 * 1 and info["kl_stop"] is False  # 16 samples = 1 minibatch x 2 epochs
    finally:
        trainer.close()
    from dpft.checkpoint import find_latest
    from tests.test_finetune import TINY_FT

    # the command a user types (the preset residual_ppo_gym is picked from the checkpoint's env family)
    assert main(["finetune", "out=%s" % (tmp_path / "ft2"), "checkpoint=%s" % diffusion_run] + TINY_FT + RES) == 0
    final = find_latest(str(tmp_path / "ft2"))
    cfg = open(tmp_path / "ft2" / "config.yaml").read()
    assert "gamma: 0.99\n" in cfg and "residual_scale: 0.1" in cfg  # preset gamma, agent default
    recs = [json.loads(line) for line in open(tmp_path / "ft2" / "metrics.jsonl")]
    assert recs[-1]["env_steps"] == 2 * 2 * 8 and "eval/return" in recs[0] and "eval/return" in recs[-1]
    assert "eval/success_rate" not in recs[0]  # Hopper has no success signal: returns only
    # the base is frozen: its weights in the fine-tuned checkpoint are the pretrained EMA weights, bit for bit
    src = load_checkpoint(diffusion_run)
    ft = load_checkpoint(final)
    assert ft.meta["policy_kind"] == "residual" and ft.meta["act_steps"] == 1
    for k, v in src.ema_state.items():
        assert torch.equal(ft.model_state["base." + k], v), k
    assert float(ft.model_state["residual.trunk.layers.4.weight"].abs().max()) > 0  # the residual head moved
    policy = dpft.load_policy(str(tmp_path / "ft2"))
    assert isinstance(policy, ResidualPolicy) and policy.weights == "model"
    obs = np.zeros((3, 1, 11), dtype=np.float32)
    policy.reset()
    a1 = policy.act(obs, generator=torch.Generator().manual_seed(0))
    policy.reset()
    a2 = policy.act(obs, generator=torch.Generator().manual_seed(0))
    assert a1.shape == (3, 1, 3) and np.array_equal(a1, a2)
    assert main(["rollout", "checkpoint=%s" % (tmp_path / "ft2"), "episodes=2", "envs=2", "max_episode_steps=10",
                 "out=%s" % (tmp_path / "eval"), "progress=false"]) == 0
    res = json.load(open(tmp_path / "eval" / "result.json"))
    assert res["num_episodes"] == 2 and res["num_failed"] == 0 and res["mean_length"] <= 10


def test_residual_ppo_resumes_exactly(tmp_path, diffusion_run):
    from dpft.agents.finetune import finetune

    base = ["checkpoint=%s" % diffusion_run] + RES + ["save_every=1"]
    finetune(_ft(tmp_path / "full", *(base + ["iterations=3"])))
    finetune(_ft(tmp_path / "part", *(base + ["iterations=1"])))
    finetune(_ft(tmp_path / "part", *(base + ["iterations=3", "resume=true"])))
    a, ca = _weights(tmp_path / "full")
    b, cb = _weights(tmp_path / "part")
    assert a.keys() == b.keys() and any(k.startswith("residual.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for k in ca:
        assert torch.equal(ca[k], cb[k]), k


@pytest.mark.robosuite
def test_residual_ppo_on_robosuite_lift(rs, tmp_path):
    """A tiny Lift diffusion checkpoint (synthetic Lift-shaped data) fine-tuned with residual PPO in robosuite
    worker processes, then rolled out from the fine-tuned directory."""
    from dpft.agents.finetune import finetune
    from dpft.cli import main
    from tests.synth import write_robomimic_hdf5

    data = tmp_path / "lift_synth.hdf5"
    write_robomimic_hdf5(data, num_demos=2, lengths=[10, 10], env_args=rs.default_env_args("lift"))
    run = _pretrain(data, tmp_path / "run", "policy.mlp_dims=[16,16,16]", "policy.denoising_steps=4",
                    "horizon_steps=4", "act_steps=2", "obs_keys=[robot0_eef_pos,object]")
    finetune(_ft(tmp_path / "ft", "checkpoint=%s" % run, *RES, "envs=2", "n_steps=4", "max_episode_steps=10",
                 "eval_episodes=1", "agent.use_ddim=true", "agent.ddim_steps=2"))
    rec = [json.loads(line) for line in open(tmp_path / "ft" / "metrics.jsonl")]
    assert rec[-1]["env_steps"] == 2 * 2 * 4 and rec[-1]["grad_steps"] >= 1
    meta = json.load(open(os.path.join(str(tmp_path / "ft"), "checkpoints", "step_00000002", "meta.json")))
    assert meta["policy_spec"]["use_ddim"] is True and meta["policy_spec"]["ddim_steps"] == 2
    assert main(["rollout", "checkpoint=%s" % (tmp_path / "ft"), "episodes=1", "envs=1", "max_episode_steps=6",
                 "progress=false", "out=%s" % (tmp_path / "ev")]) == 0
    res = json.load(open(tmp_path / "ev" / "result.json"))
    assert res["num_episodes"] == 1 and res["mean_length"] == 6


def test_residual_checkpoint_records_demos(tmp_path, diffusion_run):
    """`dpft demos policy=FT_DIR` records rollouts of a residual checkpoint (stateful policy, reset per episode):
    the actions it stores are those the deterministic policy gives for the stored observations."""
    import h5py

    from dpft.agents.finetune import finetune
    from dpft.cli import main

    ft = str(tmp_path / "ft")
    finetune(_ft(ft, "checkpoint=%s" % diffusion_run, *RES, "iterations=1"))
    out = str(tmp_path / "demos.hdf5")
    assert main(["demos", "policy=%s" % ft, "num=2", "out=%s" % out, "max_episode_steps=5", "task=hopper",
                 "progress=false", "envs=2", "seed=3"]) == 0
    with h5py.File(out, "r") as f:
        lengths = sorted(int(f["data/%s/actions" % d].shape[0]) for d in f["data"])
        acts = f["data/demo_0/actions"][...]
    assert len(lengths) == 2 and max(lengths) <= 5 and acts.shape[1] == 3 and np.isfinite(acts).all()


def test_inril_network_separation_trains_the_base_by_il(tmp_path, diffusion_run):
    """IN-RIL's network separation on residual PPO: IL steps move the base (its diffusion loss), RL the residual;
    without separation the alignment monitor compares gradients in the residual's space."""
    from dpft.agents.finetune import finetune
    from dpft.checkpoint import load_checkpoint

    src = load_checkpoint(diffusion_run)
    finetune(_ft(tmp_path / "sep", "checkpoint=%s" % diffusion_run, *RES, "inril.separation=network", "inril.m=1",
                 "inril.batch_size=8", "inril.monitor_every=1"))
    ft = load_checkpoint(str(tmp_path / "sep"))
    moved = [k for k, v in src.ema_state.items() if not torch.equal(ft.model_state["base." + k], v)]
    assert any(k.startswith("network.") for k in moved)  # IL stepped the base's denoiser
    recs = [json.loads(line) for line in open(tmp_path / "sep" / "metrics.jsonl")]
    assert recs[-1]["inril/g_il_norm"] > 0 and np.isfinite(recs[-1]["eval/il_loss_heldout"])
    finetune(_ft(tmp_path / "mon", "checkpoint=%s" % diffusion_run, *RES, "inril.monitor_every=1"))
    ft = load_checkpoint(str(tmp_path / "mon"))
    assert all(torch.equal(ft.model_state["base." + k], v) for k, v in src.ema_state.items())  # base stays frozen
    recs = [json.loads(line) for line in open(tmp_path / "mon" / "metrics.jsonl")]
    assert -1.0 <= recs[-1]["inril/cos"] <= 1.0 and recs[-1]["inril/g_il_norm"] > 0


@pytest.mark.slow
def test_residual_ppo_learns_on_hopper(tmp_path):
    """A poor base (diffusion policy on random-action demos: Hopper falls at once, eval return ~19) with a residual
    of scale 0.5: 10 seeded iterations of 8 envs x 250 steps raise the deterministic return (about 50 s on one core;
    30 iterations reach ~92)."""
    from dpft.agents.finetune import finetune
    from dpft.cli import _with_preset
    from dpft.config import compose
    from dpft.envs.gym_env import default_gym_env_args
    from tests.synth import write_demos_hdf5

    rng = np.random.default_rng(0)
    demos = {"demo_%d" % i: {"obs": {"obs": rng.normal(size=(40, 11))}, "actions": rng.uniform(-0.8, 0.8, (40, 3))}
             for i in range(5)}
    write_demos_hdf5(str(tmp_path / "hop.hdf5"), demos, env_args=default_gym_env_args("hopper"))
    run = _pretrain(tmp_path / "hop.hdf5", tmp_path / "run", "steps=200", "batch_size=64", "save_every=200",
                    "warmup_steps=10", "policy.mlp_dims=[64,64,64]", "policy.denoising_steps=10", "horizon_steps=4",
                    "act_steps=4")
    out = tmp_path / "ft"
    finetune(compose("finetune", _with_preset([
        "agent=residual_ppo", "checkpoint=%s" % run, "out=%s" % out, "envs=8", "n_steps=250", "max_episode_steps=250",
        "iterations=10", "eval_every=10", "eval_episodes=8", "agent.batch_size=2000", "agent.mlp_dims=[64,64]",
        "agent.critic_dims=[64,64]", "progress=false", "num_threads=1", "inril.monitor_every=0",
        "agent.residual_scale=0.5"])))
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    first, last = recs[0]["eval/return"], recs[-1]["eval/return"]
    assert recs[-1]["env_steps"] == 10 * 8 * 250
    assert last > first + 8, (first, last)
