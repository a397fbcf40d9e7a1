"""dpft finetune: config errors by message, PPO ratio 1 on the first minibatch, stored chain log-probs equal
recomputed ones, truncation bootstrap in the collector, exact resume, fine-tuned checkpoints through load_policy
and `dpft rollout`, and a learning test (PPO from scratch on Hopper)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from dpft.errors import DpftError
from dpft.envs.render import setup_rendering

setup_rendering(require=False)
pytest.importorskip("gymnasium")
pytest.importorskip("mujoco")

from dpft.config import compose  # noqa: E402
from dpft.envs.gym_env import default_gym_env_args  # noqa: E402
from tests.synth import write_demos_hdf5  # noqa: E402

HOPPER = default_gym_env_args("hopper")
TINY_PRE = ["steps=4", "batch_size=8", "save_every=4", "val_every=0", "progress=false", "num_threads=1",
            "data.valid_ratio=0", "warmup_steps=1", "obs_keys=[obs]"]
TINY_FT = ["envs=2", "n_steps=8", "iterations=2", "eval_episodes=2", "progress=false", "max_episode_steps=20",
           "agent.batch_size=16", "agent.update_epochs=2", "agent.critic_dims=[16,16,16]", "agent.n_critic_warmup_itr=0"]


def _pretrain(dataset, out, *extra):
    from dpft.agents.pretrain import pretrain

    pretrain(compose("pretrain", ["dataset=%s" % dataset, "out=%s" % out] + TINY_PRE + list(extra)))
    return str(out)


@pytest.fixture(scope="module")
def hopper_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("hopper_data")
    rng = np.random.default_rng(0)
    demos = {"demo_%d" % i: {"obs": {"obs": rng.normal(size=(20, 11))}, "actions": rng.uniform(-0.8, 0.8, (20, 3))}
             for i in range(3)}
    write_demos_hdf5(str(d / "synth.hdf5"), demos, env_args=HOPPER)
    return str(d / "synth.hdf5")


@pytest.fixture(scope="module")
def diffusion_run(hopper_data, tmp_path_factory):
    return _pretrain(hopper_data, tmp_path_factory.mktemp("diff") / "run", "policy.mlp_dims=[16,16,16]",
                     "policy.denoising_steps=5", "horizon_steps=4", "act_steps=2")


@pytest.fixture(scope="module")
def gaussian_run(hopper_data, tmp_path_factory):
    return _pretrain(hopper_data, tmp_path_factory.mktemp("gauss") / "run", "policy=gaussian_mlp",
                     "policy.mlp_dims=[16,16]", "horizon_steps=3", "act_steps=3")


def _ft(out, *args):
    from dpft.cli import _with_preset

    return compose("finetune", _with_preset(["out=%s" % out] + TINY_FT + list(args)))


def _finetuner(out, *args):
    from dpft.agents.finetune import Finetuner

    return Finetuner(_ft(out, *args))


def _kill_9_after_checkpoint(out, args, step=2, timeout=300.0):
    """Run ``dpft finetune out=OUT`` (the tiny settings plus ``args``) in a subprocess and SIGKILL it as soon as
    its checkpoint ``step`` exists (raising with its stderr if it ends first)."""
    import subprocess
    import sys
    import time

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "dpft", "finetune", "out=%s" % out] + TINY_FT + list(args)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=repo)
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + timeout
        while not os.path.isdir(os.path.join(str(out), "checkpoints", "step_%08d" % step)):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline
            time.sleep(0.01)
        proc.kill()
    finally:
        proc.wait()
    assert proc.returncode == -9


# ---------------------------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("args,needle", [
    (["checkpoint=a", "env=hopper"], "either checkpoint= or env="),
    ([], "Pass checkpoint=RUN_DIR"),
    (["env=hopper", "agent=dppo"], "only agent=ppo"),
    (["env=hopper", "agent=ppo", "iterations=0"], "iterations=0 must be >= 1"),
    (["env=hopper", "agent=ppo", "envs=0"], "envs=0 must be >= 1"),
    (["env=hopper", "agent=ppo", "n_steps=-1"], "n_steps=-1 must be >= 1"),
    (["env=hopper", "agent=ppo", "agent.gamma=1.5"], "agent.gamma=1.5 must be in [0, 1]"),
    (["env=hopper", "agent=ppo", "agent.logprob_reduction=max"], "agent.logprob_reduction='max'"),
])
def test_config_errors_name_the_setting(tmp_path, args, needle):
    with pytest.raises(DpftError) as e:
        compose("finetune", ["out=%s" % (tmp_path / "o")] + args)
    assert needle in str(e.value)


def test_wrong_checkpoint_kind_and_ft_steps_range(tmp_path, diffusion_run, gaussian_run):
    with pytest.raises(DpftError, match="agent=ppo fine-tunes a gaussian policy.*holds a diffusion policy.*use agent=dppo"):
        _finetuner(tmp_path / "a", "agent=ppo", "checkpoint=%s" % diffusion_run)
    with pytest.raises(DpftError, match="agent=dppo fine-tunes a diffusion policy.*holds a gaussian policy"):
        _finetuner(tmp_path / "b", "agent=dppo", "checkpoint=%s" % gaussian_run)
    with pytest.raises(DpftError, match="ft_denoising_steps=9 must be between 1 and the policy's 5 sampling steps"):
        _finetuner(tmp_path / "c", "agent=dppo", "checkpoint=%s" % diffusion_run, "agent.ft_denoising_steps=9")
    with pytest.raises(DpftError, match="does not exist"):
        _finetuner(tmp_path / "d", "agent=dppo", "checkpoint=%s" % (tmp_path / "nope"))
    with pytest.raises(DpftError, match="does not exist.*resume=true rebuilds the policy from the checkpoint the run "
                                        "started from.*source_checkpoint"):
        _finetuner(tmp_path / "d", "agent=dppo", "checkpoint=%s" % (tmp_path / "nope"), "resume=true")


def test_cli_help_lists_options(capsys):
    from dpft.cli import main

    assert main(["finetune", "--help"]) == 0
    out = capsys.readouterr().out
    for key in ("iterations", "n_steps", "eval_every", "agent.ft_denoising_steps", "agent.clip_coef",
                "agent.gamma_denoising", "agent.target_kl", "agent.n_critic_warmup_itr", "resume"):
        assert key in out


def test_preset_follows_the_env_family(tmp_path, diffusion_run):
    from dpft.cli import _with_preset

    assert _with_preset(["agent=dppo", "checkpoint=%s" % diffusion_run])[0] == "preset=dppo_gym"
    assert _with_preset(["agent=ppo", "env=hopper"])[0] == "preset=ppo_scratch"
    assert _with_preset(["preset=dppo_robomimic", "checkpoint=%s" % diffusion_run])[0] == "preset=dppo_robomimic"
    cfg = compose("finetune", _with_preset(["agent=dppo", "checkpoint=%s" % diffusion_run, "out=o"]))
    assert cfg.agent.gamma == 0.99 and cfg.n_steps == 250  # DPPO's gym settings
    cfg = compose("finetune", _with_preset(["agent=dppo", "checkpoint=%s" % diffusion_run, "out=o", "agent.gamma=0.9"]))
    assert cfg.agent.gamma == 0.9  # the command line wins over the preset


# ---------------------------------------------------------------------------------------------- the math in the loop
def test_dppo_first_minibatch_ratio_is_one_and_chain_logprobs_match(tmp_path, diffusion_run):
    t = _finetuner(tmp_path / "r", "agent=dppo", "checkpoint=%s" % diffusion_run, "agent.ft_denoising_steps=3")
    try:
        n = t.env.num_envs
        t.collector.reset([100 + i for i in range(n)])
        ro = t.collector.collect(4)
        chain, logp = ro.act["chain"], ro.act["logprob"]
        assert chain.shape == (4, n, 4, 4, 3) and logp.shape == (4, n, 3, 4, 3)
        obs = {k: v.flatten(0, 1) for k, v in ro.obs.items()}
        with torch.no_grad():
            again = t.model.chain_log_prob(obs, chain.flatten(0, 1))
        torch.testing.assert_close(again, logp.flatten(0, 1), rtol=1e-5, atol=1e-5)
        adv, _ = t.agent.advantages(ro)
        flat = {"obs": obs, "act": {k: v.flatten(0, 1) for k, v in ro.act.items()}, "adv": adv.reshape(-1)}
        idx = torch.arange(t.agent.num_samples(ro))
        _, info = t.agent.policy_loss(ro, flat, idx)
        assert abs(float(info["ratio"]) - 1.0) < 1e-5 and float(info["clipfrac"]) == 0.0
    finally:
        t.close()


def test_ppo_first_minibatch_ratio_exactly_one(tmp_path, gaussian_run):
    t = _finetuner(tmp_path / "r", "agent=ppo", "checkpoint=%s" % gaussian_run)
    try:
        t.collector.reset([7, 8])
        ro = t.collector.collect(3)
        adv, _ = t.agent.advantages(ro)
        flat = {"obs": {k: v.flatten(0, 1) for k, v in ro.obs.items()},
                "act": {k: v.flatten(0, 1) for k, v in ro.act.items()}, "adv": adv.reshape(-1)}
        loss, info = t.agent.policy_loss(ro, flat, torch.arange(6))
        assert float(info["ratio"]) == pytest.approx(1.0, abs=1e-6) and float(info["approx_kl"]) == pytest.approx(0, abs=1e-7)
    finally:
        t.close()


def test_collector_bootstraps_truncation_from_final_obs(tmp_path, gaussian_run):
    """max_episode_steps=6 with chunks of 3: every env truncates after 2 chunks; next_values at that step is V of
    the final observation, not of the reset observation that follows."""
    t = _finetuner(tmp_path / "r", "agent=ppo", "checkpoint=%s" % gaussian_run, "max_episode_steps=6")
    try:
        t.collector.reset([1, 2])
        ro = t.collector.collect(4)
        ended = ro.terminated | ro.truncated
        assert bool(ended[1].all()) or bool(ro.terminated[:2].any())
        for step in range(3):
            for i in range(2):
                if ro.truncated[step, i]:
                    assert not torch.isclose(ro.next_values[step, i], ro.values[step + 1, i])
                elif not ro.terminated[step, i]:
                    assert ro.next_values[step, i] == ro.values[step + 1, i]
        assert len(ro.episodes) >= 1 and all(e["length"] <= 6 for e in ro.episodes)
    finally:
        t.close()


# ---------------------------------------------------------------------------------------------- end to end
def _weights(run):
    from dpft.checkpoint import find_latest, read_tensors

    d = find_latest(run)
    return read_tensors(os.path.join(d, "model.safetensors")), read_tensors(
        os.path.join(d, "training_state", "tensors_critic.safetensors"))


@pytest.mark.parametrize("agent", ["dppo", "ppo"])
def test_resume_gives_the_same_weights(tmp_path, agent, diffusion_run, gaussian_run):
    from dpft.agents.finetune import finetune

    ckpt = diffusion_run if agent == "dppo" else gaussian_run
    base = ["agent=%s" % agent, "checkpoint=%s" % ckpt, "agent.ft_denoising_steps=3", "iterations=3", "save_every=1",
            "eval_every=0"]
    finetune(_ft(tmp_path / "full", *base))
    finetune(_ft(tmp_path / "part", *(base[:3] + ["iterations=1", "save_every=1", "eval_every=0"])))
    finetune(_ft(tmp_path / "part", *(base + ["resume=true"])))
    a, ca = _weights(tmp_path / "full")
    b, cb = _weights(tmp_path / "part")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for k in ca:
        assert torch.equal(ca[k], cb[k]), k
    with pytest.raises(DpftError, match="differ from the run"):
        finetune(_ft(tmp_path / "part", *(base + ["resume=true", "agent.actor_lr=0.5"])))
    other = "ppo" if agent == "dppo" else "dppo"
    with pytest.raises(DpftError):
        finetune(_ft(tmp_path / "part", "agent=%s" % other, "checkpoint=%s" % ckpt, "resume=true",
                     "agent.ft_denoising_steps=3"))


def test_finetuned_checkpoint_loads_and_rolls_out(tmp_path, diffusion_run):
    import dpft
    from dpft.agents.finetune import finetune
    from dpft.cli import main

    out = tmp_path / "ft"
    final = finetune(_ft(out, "agent=dppo", "checkpoint=%s" % diffusion_run, "agent.ft_denoising_steps=2"))
    assert os.path.basename(final) == "step_00000002"
    assert os.path.isfile(out / "finetune_curves.png") and os.path.isfile(out / "config.yaml")
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in recs] == [0, 1, 2] and "eval/return" in recs[0] and "eval/return" in recs[-1]
    assert "eval/success_rate" not in recs[0]  # Hopper has no success signal: returns only
    assert 0 < recs[-1]["env_steps"] <= 2 * 2 * 8 * 2  # iterations x envs x n_steps x act_steps (Hopper may fall)
    assert recs[1]["env_steps"] < recs[2]["env_steps"]
    policy = dpft.load_policy(str(out))
    assert policy.model.ft_denoising_steps == 2 and policy.meta["policy_kind"] == "diffusion"
    obs = np.zeros((3, 1, 11), dtype=np.float32)
    a1 = policy.act(obs, generator=torch.Generator().manual_seed(0))
    a2 = policy.act(obs, generator=torch.Generator().manual_seed(0))
    assert a1.shape == (3, 2, 3) and np.array_equal(a1, a2)
    assert main(["rollout", "checkpoint=%s" % out, "episodes=2", "envs=1", "max_episode_steps=10",
                 "out=%s" % (tmp_path / "eval"), "progress=false"]) == 0
    res = json.load(open(tmp_path / "eval" / "result.json"))
    assert res["num_episodes"] == 2 and res["num_failed"] == 0


@pytest.mark.slow
def test_ppo_from_scratch_learns_hopper(tmp_path):
    """CleanRL's recipe on Hopper-v5: 8 iterations of 2048 steps raise the deterministic return well above the
    untrained policy's (seeded; about 25 s on one core)."""
    from dpft.agents.finetune import finetune

    out = tmp_path / "scratch"
    finetune(compose("finetune", ["preset=ppo_scratch", "agent=ppo", "env=hopper", "out=%s" % out, "iterations=8",
                                  "eval_every=8", "eval_episodes=3", "progress=false", "num_threads=1"]))
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    first, last = recs[0]["eval/return"], recs[-1]["eval/return"]
    assert recs[-1]["env_steps"] == 8 * 2048
    assert last > first + 50, (first, last)


@pytest.mark.robosuite
def test_dppo_on_robosuite_lift_resumes_exactly_after_kill_9_and_rolls_out(rs, tmp_path):
    """A tiny Lift diffusion checkpoint (synthetic Lift-shaped data): DPPO in robosuite worker processes, run by
    ``dpft finetune`` in a subprocess killed with SIGKILL once its second checkpoint exists, then resumed with
    resume=true, ends with the same weights as an uninterrupted run; the result rolls out."""
    from dpft.agents.finetune import finetune
    from dpft.cli import main
    from tests.synth import write_robomimic_hdf5

    data = tmp_path / "lift_synth.hdf5"
    write_robomimic_hdf5(data, num_demos=2, lengths=[10, 10], env_args=rs.default_env_args("lift"))
    run = _pretrain(data, tmp_path / "run", "policy.mlp_dims=[16,16,16]", "policy.denoising_steps=4",
                    "horizon_steps=2", "act_steps=2", "obs_keys=[robot0_eef_pos,object]")
    base = ["agent=dppo", "checkpoint=%s" % run, "agent.ft_denoising_steps=2", "envs=2", "n_steps=3",
            "max_episode_steps=10", "eval_every=0", "eval_episodes=1", "save_every=1", "iterations=4",
            "num_threads=1"]
    killed = tmp_path / "killed"
    _kill_9_after_checkpoint(killed, base)
    finetune(_ft(killed, *(base + ["resume=true"])))
    finetune(_ft(tmp_path / "full", *base))
    a, ca = _weights(tmp_path / "full")
    b, cb = _weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(ca[k], cb[k]) for k in ca)
    rec = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    assert rec[-1]["env_steps"] == 4 * 2 * 3 * 2  # iterations x envs x chunks x act_steps (no episode ended early)
    assert [r["env_steps"] for r in map(json.loads, open(killed / "metrics.jsonl"))] == [r["env_steps"] for r in rec]
    assert main(["rollout", "checkpoint=%s" % (tmp_path / "full"), "episodes=1", "envs=1", "max_episode_steps=6",
                 "progress=false", "out=%s" % (tmp_path / "ev")]) == 0
