"""dpft finetune under faults: an env episode cut by a non-finite observation or reward is terminated (never
bootstrapped), counted in the metrics, and training goes on; NaN gradients stop the run with a message and keep
the last good checkpoint (which resumes); a missing env extra is named; resume=true needs a run of the same agent;
a run killed with kill -9 resumes to the weights of an uninterrupted run."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

from dpft.envs.base import Env
from dpft.errors import DpftError
from tests.test_finetune import (  # noqa: F401
    _finetuner, _ft, _kill_9_after_checkpoint, _weights, diffusion_run, gaussian_run, hopper_data)


class _NonFiniteAt(Env):
    """Wraps an env; at env step ``at`` of every episode the observation (``what="obs"``) or the reward
    (``what="reward"``) is NaN."""

    def __init__(self, inner: Env, at: int, what: str):
        self.inner, self.at, self.what = inner, int(at), what
        self.obs_shapes, self.obs_dtypes = inner.obs_shapes, inner.obs_dtypes
        self.action_dim, self.max_episode_steps = inner.action_dim, inner.max_episode_steps
        self.t = 0

    def reset(self, seed=None):
        self.t = 0
        return self.inner.reset(seed=seed)

    def step(self, action):
        obs, r, term, trunc, info = self.inner.step(action)
        self.t += 1
        if self.t == self.at:
            if self.what == "obs":
                obs = {k: np.full_like(v, np.nan) for k, v in obs.items()}
            else:
                r = float("nan")
        return obs, r, term, trunc, info

    def close(self):
        self.inner.close()


def _faulty_envs(monkeypatch, at: int, what: str) -> None:
    from dpft.envs.registry import EnvFactory

    make = EnvFactory.__call__
    monkeypatch.setattr(EnvFactory, "__call__", lambda self: _NonFiniteAt(make(self), at, what))


@pytest.mark.parametrize("what", ["obs", "reward"])
def test_nonfinite_episode_is_terminated_counted_and_training_goes_on(tmp_path, monkeypatch, gaussian_run, what):
    """Chunks of 3 env steps, NaN at env step 5: every episode still running after the first chunk is cut in the
    second one -- terminated (no V(final obs) bootstrap: its advantage is r - V(s)), not truncated, not a success,
    counted as a NaN episode; a finetune run in such envs completes with finite weights."""
    from dpft.agents.finetune import finetune

    _faulty_envs(monkeypatch, at=5, what=what)
    t = _finetuner(tmp_path / "r", "agent=ppo", "checkpoint=%s" % gaussian_run, "agent.reward_scale_running=false")
    try:
        t.collector.reset([3, 4])
        ro = t.collector.collect(3)
        alive = ~(ro.terminated[0] | ro.truncated[0])
        assert bool(alive.any())
        assert bool(ro.terminated[1][alive].all()) and not bool(ro.truncated[1][alive].any())
        cut = [e for e in ro.episodes if e["failed"]]
        assert len(cut) == int(alive.sum()) and ro.nan_episodes == len(cut)
        assert all(e["length"] == 5 and not e["success"] for e in cut)
        adv, _ = t.agent.advantages(ro)
        torch.testing.assert_close(adv[1][alive], (ro.reward[1] - ro.values[1])[alive])
    finally:
        t.close()
    out = tmp_path / "ft"
    finetune(_ft(out, "agent=ppo", "checkpoint=%s" % gaussian_run))
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["iteration"] for r in recs] == [0, 1, 2]
    assert all(r["train/nan_episodes"] >= 1 and r["train/failed_episodes"] == r["train/nan_episodes"] for r in recs[1:])
    weights, critic = _weights(out)
    assert all(bool(torch.isfinite(v).all()) for v in list(weights.values()) + list(critic.values()))


def test_nan_gradients_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch, gaussian_run):
    from dpft.agents.finetune import finetune
    from dpft.agents.ppo import PPOAgent
    from dpft.checkpoint import find_latest

    loss_of = PPOAgent.policy_loss

    def diverging(self, ro, flat, idx):
        loss, info = loss_of(self, ro, flat, idx)
        return (loss * float("nan") if self.train_iterations >= 1 else loss), info

    base = ["agent=ppo", "checkpoint=%s" % gaussian_run, "iterations=3", "save_every=1", "eval_every=0"]
    monkeypatch.setattr(PPOAgent, "policy_loss", diverging)
    with pytest.raises(DpftError, match="NaN/Inf gradients at training iteration 1.*last good checkpoint is kept"):
        finetune(_ft(tmp_path / "ft", *base))
    assert os.path.basename(find_latest(str(tmp_path / "ft"))) == "step_00000001"
    weights, _ = _weights(tmp_path / "ft")
    assert all(bool(torch.isfinite(v).all()) for v in weights.values())
    monkeypatch.setattr(PPOAgent, "policy_loss", loss_of)
    assert os.path.basename(finetune(_ft(tmp_path / "ft", *(base + ["resume=true"])))) == "step_00000003"


def test_missing_env_extra_and_unknown_task_are_named(tmp_path, monkeypatch, gaussian_run):
    monkeypatch.setitem(sys.modules, "gymnasium", None)  # as if the [gym] extra were not installed
    with pytest.raises(DpftError, match=r"pip install 'dpft\[gym\]'"):
        _finetuner(tmp_path / "a", "agent=ppo", "checkpoint=%s" % gaussian_run)
    monkeypatch.undo()
    with pytest.raises(DpftError, match="Unknown task 'hoper'.*gym tasks: .*hopper"):
        _finetuner(tmp_path / "b", "agent=ppo", "env=hoper")


def test_resume_after_kill_9_gives_the_same_weights(tmp_path, gaussian_run):
    """``dpft finetune`` in a subprocess, killed with SIGKILL once its second checkpoint exists, resumed with
    resume=true: the final actor and critic equal an uninterrupted run's bit for bit."""
    from dpft.agents.finetune import finetune

    args = ["agent=ppo", "checkpoint=%s" % gaussian_run, "iterations=10", "save_every=1", "eval_every=0",
            "num_threads=1"]
    killed = tmp_path / "killed"
    _kill_9_after_checkpoint(killed, args, timeout=120)
    finetune(_ft(killed, *(args + ["resume=true"])))
    finetune(_ft(tmp_path / "full", *args))
    (a, ca), (b, cb) = _weights(tmp_path / "full"), _weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(ca[k], cb[k]) for k in ca)


def test_resume_needs_a_run_of_the_same_agent(tmp_path, diffusion_run):
    from dpft.agents.finetune import finetune

    with pytest.raises(DpftError, match="resume=true but out='.*' holds no run to resume"):
        finetune(_ft(tmp_path / "none", "agent=dppo", "checkpoint=%s" % diffusion_run, "resume=true"))
    out = tmp_path / "ft"
    finetune(_ft(out, "agent=dppo", "checkpoint=%s" % diffusion_run, "iterations=1", "eval_every=0",
                 "agent.ft_denoising_steps=3"))
    with pytest.raises(DpftError, match="resume=true with agent=idql, but the run in '.*' was trained with agent=dppo"):
        finetune(_ft(out, "agent=idql", "checkpoint=%s" % diffusion_run, "iterations=2", "resume=true",
                     "agent.ft_denoising_steps=3"))
