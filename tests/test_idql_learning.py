"""IDQL learns through ``dpft finetune agent=idql``: the reaching task of tests/test_finetune_learning.py (reward
-||a - target||^2, 4-step episodes in Hopper's shapes, truncated so every chunk bootstraps) from the tiny Hopper
diffusion checkpoint; the deterministic evaluation (argmax of min target Q over the candidates, as the
checkpoint acts) rises well above the pretrained policy's."""
from __future__ import annotations

import json

from tests.test_finetune import _ft, diffusion_run, hopper_data  # noqa: F401
from tests.test_finetune_learning import _Reach


def test_idql_improves_on_a_reaching_task(tmp_path, monkeypatch, diffusion_run):  # noqa: F811
    from dpft.agents.finetune import finetune
    from dpft.envs.registry import EnvFactory

    monkeypatch.setattr(EnvFactory, "__call__", lambda self: _Reach())
    out = tmp_path / "ft"
    finetune(_ft(out, "agent=idql", "checkpoint=%s" % diffusion_run, "iterations=10", "eval_every=10", "envs=4",
                 "n_steps=8", "eval_episodes=4", "num_threads=1", "agent.num_candidates=16", "agent.batch_size=64",
                 "agent.replay_ratio=64", "agent.replay_size=2000", "agent.critic_dims=[32,32,32]",
                 "agent.critic_lr=3e-3", "agent.critic_tau=0.05", "agent.actor_lr=3e-3", "agent.n_critic_warmup_itr=2",
                 "agent.reward_scale_const=1.0"))
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    first, last = recs[0]["eval/return"], recs[-1]["eval/return"]
    assert recs[-1]["env_steps"] == 10 * 4 * 8 * 2
    assert last > first + 4.0 and last > 0.5 * first, (first, last)  # -10.06 -> -1.89 (train -8.6 -> -3.5), ~8 s
