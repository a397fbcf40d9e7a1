"""DPPO learns: a small fast task (reach a fixed target action; 4-step episodes in Hopper's obs/action shapes so a
tiny Hopper diffusion checkpoint serves) fine-tuned from a seeded start raises the deterministic evaluation
return well above the pretrained policy's (a few seconds on one core)."""
from __future__ import annotations

import json

import numpy as np

from dpft.envs.base import Env
from tests.test_finetune import _ft, diffusion_run, hopper_data  # noqa: F401

TARGET = np.array([0.5, -0.5, 0.5])


class _Reach(Env):
    """Reward ``-||a - TARGET||^2`` per env step; a fixed random observation per episode; truncated after 4 steps."""

    obs_shapes = {"obs": (11,)}
    obs_dtypes = {"obs": np.float32}
    action_dim = 3
    max_episode_steps = 4

    def reset(self, seed=None):
        self.obs = np.random.default_rng(seed).normal(size=11).astype(np.float32)
        self.t = 0
        return {"obs": self.obs}

    def step(self, action):
        self.t += 1
        reward = -float(np.sum((np.asarray(action) - TARGET) ** 2))
        return {"obs": self.obs}, reward, False, self.t >= 4, {"success": False}


def test_dppo_improves_on_a_reaching_task(tmp_path, monkeypatch, diffusion_run):
    from dpft.agents.finetune import finetune
    from dpft.envs.registry import EnvFactory

    monkeypatch.setattr(EnvFactory, "__call__", lambda self: _Reach())
    out = tmp_path / "ft"
    finetune(_ft(out, "agent=dppo", "checkpoint=%s" % diffusion_run, "iterations=15", "eval_every=15", "envs=4",
                 "n_steps=8", "eval_episodes=4", "num_threads=1", "agent.ft_denoising_steps=3", "agent.actor_lr=1e-2",
                 "agent.clip_coef=0.1", "agent.clip_coef_base=0.05", "agent.update_epochs=5", "agent.batch_size=32",
                 "agent.target_kl=null"))
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    first, last = recs[0]["eval/return"], recs[-1]["eval/return"]
    assert recs[-1]["env_steps"] == 15 * 4 * 8 * 2
    assert last > first + 4.0 and last > 0.5 * first, (first, last)  # returns are negative: -8.36 -> -1.96
