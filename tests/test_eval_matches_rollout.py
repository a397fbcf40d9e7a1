"""Item 5 of issue 19: the iteration-0 evaluation of a fine-tuning run equals ``dpft rollout`` of its start checkpoint
under the same settings (episodes and seeds, number of envs, episode length limit, terminate_on_success).

Before the fix DPPO's evaluation sampled with the fine-tuning noise clip (``agent.randn_clip_value=3``) while the
start checkpoint rolls out with its own (10), so the deterministic DDPM's std-1e-3 noise differed and the returns
did too."""
from __future__ import annotations

import json
import os

import pytest

from tests.test_finetune import _finetuner, diffusion_run, hopper_data  # noqa: F401

pytestmark = pytest.mark.gym


def test_iteration0_eval_equals_rollout_of_the_start_checkpoint(tmp_path, diffusion_run):
    from dpft.envs.rollout import rollout_checkpoint

    out = tmp_path / "ft"
    ft = _finetuner(out, "agent=dppo", "checkpoint=%s" % diffusion_run, "iterations=1", "eval_episodes=3",
                    "max_episode_steps=30", "agent.ft_denoising_steps=3", "eval_every=1")
    try:
        ft.run()
    finally:
        ft.close()
    rows = [json.loads(line) for line in open(os.path.join(str(out), "metrics.jsonl"))]
    first = [r for r in rows if r.get("iteration") == 0 and "eval/return" in r][0]
    res = rollout_checkpoint(diffusion_run, episodes=3, num_envs=2, seed=100000,
                             env_options={"max_episode_steps": 30}, out_dir=str(tmp_path / "rollout"))
    assert first["eval/episodes"] == res["num_episodes"] == 3
    assert first["eval/return"] == res["mean_return"]  # bit-identical, not approximately
    assert first["eval/length"] == res["mean_length"]
    assert first.get("eval/success_rate") == res["success_rate"]  # None for a task without a success signal
    assert first["eval/num_envs"] == 2


def test_finetuned_checkpoint_keeps_the_start_checkpoints_evaluation_clip(tmp_path, diffusion_run):
    import dpft

    out = tmp_path / "ft"
    ft = _finetuner(out, "agent=dppo", "checkpoint=%s" % diffusion_run, "iterations=1", "agent.ft_denoising_steps=3")
    try:
        model = ft.model
        assert model.randn_clip_value == 3.0 and model.eval_randn_clip_value == 10.0
    finally:
        ft.close()
    assert dpft.load_policy(diffusion_run).model.eval_randn_clip_value is None  # pretrained: its randn_clip_value


def test_rollout_cli_num_threads(tmp_path, diffusion_run, monkeypatch):
    """`dpft rollout num_threads=N` sets the policy's torch threads (its float results depend on them)."""
    import torch

    import dpft.envs.rollout as R
    from dpft.cli import main

    seen = {}
    monkeypatch.setattr(R, "rollout_checkpoint", lambda *a, **k: seen.setdefault("threads", torch.get_num_threads()))
    torch.set_num_threads(2)
    assert main(["rollout", "checkpoint=%s" % diffusion_run, "num_threads=1", "out=%s" % (tmp_path / "r")]) == 0
    assert seen["threads"] == 1
