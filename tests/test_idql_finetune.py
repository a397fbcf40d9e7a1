"""dpft finetune agent=idql on a tiny Hopper run: the collector's transition form (final obs as next_obs, live obs
untouched), replay contents, warm-up, exact resume (weights, critics, replay), and the fine-tuned checkpoint
through load_policy and `dpft rollout`."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from tests.test_finetune import _ft, _finetuner, diffusion_run, hopper_data  # noqa: F401  (fixtures)

IDQL = ["agent=idql", "agent.batch_size=16", "agent.replay_ratio=4", "agent.replay_size=100",
        "agent.num_candidates=4", "agent.critic_dims=[16,16,16]", "agent.n_critic_warmup_itr=1",
        "agent.actor_lr=1e-3"]


def test_transition_form_keeps_final_obs_and_live_obs(tmp_path, diffusion_run):  # noqa: F811
    """Chunks of 2 steps, episodes cut at 6 steps: every env truncates at chunk 2 (unless Hopper fell first). The
    stored next_obs of that step is the episode's final observation, and the next chunk is chosen from (and stored
    with) the reset observation."""
    t = _finetuner(tmp_path / "r", "checkpoint=%s" % diffusion_run, "max_episode_steps=6", *IDQL)
    try:
        assert t.model.ft_denoising_steps == t.model.num_sampling_steps == 5  # the whole chain
        t.collector.reset([1, 2])
        ro = t.collector.collect(5)
        nxt = ro.next_obs()["state"]
        obs = ro.obs["state"]
        ended = (ro.terminated | ro.truncated).numpy()
        assert ended[2].all() or ended[:2].any()
        finals = {(s, int(i)): f["state"][j] for s, rows, f in ro.final_obs for j, i in enumerate(rows)}
        for s in range(5):
            for i in range(2):
                after = ro.last_obs["state"][i] if s == 4 else obs[s + 1, i]
                if ended[s, i]:
                    assert torch.equal(nxt[s, i], finals[(s, i)])
                    assert not torch.allclose(nxt[s, i], after)  # the reset observation lives on in obs
                else:
                    assert torch.equal(nxt[s, i], after)
        n = t.agent.add_rollout(ro)
        assert n == 10 and len(t.agent.replay) == 10
        b = t.agent.replay.gather(torch.arange(10))
        assert torch.equal(b["next_obs"]["state"], nxt.flatten(0, 1))
        assert torch.equal(b["obs"]["state"], obs.flatten(0, 1))
        assert torch.equal(b["truncated"], ro.truncated.reshape(-1)) and torch.equal(b["terminated"], ro.terminated.reshape(-1))
        assert b["chunk"].shape == (10, 4, 3)  # the whole sampled chunk; Q reads the first act_steps = 2
    finally:
        t.close()


def _final(run):
    from dpft.checkpoint import find_latest, read_tensors

    d = find_latest(run)
    return {name: read_tensors(os.path.join(d, f)) for name, f in
            (("model", "model.safetensors"), ("critic", "critic.safetensors"),
             ("replay", os.path.join("training_state", "tensors_replay.safetensors")),
             ("opt", os.path.join("training_state", "optimizer_actor.safetensors")))}


def test_resume_is_exact_and_warmup_skips_the_actor(tmp_path, diffusion_run):  # noqa: F811
    from dpft.agents.finetune import finetune

    base = ["checkpoint=%s" % diffusion_run, "iterations=3", "save_every=1", "eval_every=0"] + IDQL
    finetune(_ft(tmp_path / "full", *base))
    finetune(_ft(tmp_path / "part", *(base[:1] + ["iterations=1"] + base[2:])))
    finetune(_ft(tmp_path / "part", *(base + ["resume=true"])))
    a, b = _final(tmp_path / "full"), _final(tmp_path / "part")
    for group in a:
        assert a[group].keys() == b[group].keys()
        for k in a[group]:
            assert torch.equal(a[group][k], b[group][k]), (group, k)
    assert int(a["replay"]["size"]) == 3 * 2 * 8  # 3 iterations x 2 envs x 8 chunks
    recs = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    train = [r for r in recs if r.get("iteration", 0) > 0]
    assert [r["actor_updated"] for r in train] == [False, True, True]  # n_critic_warmup_itr=1
    assert [r["grad_steps"] for r in train] == [4, 4, 4]  # 16 new transitions x ratio 4 / batch 16
    assert "actor_loss" not in train[0] and train[1]["actor_loss"] > 0


def test_idql_checkpoint_loads_and_rolls_out(tmp_path, diffusion_run):  # noqa: F811
    import dpft
    from dpft.agents.finetune import Finetuner
    from dpft.cli import main
    from dpft.rl.idql import IDQLPolicy

    out = tmp_path / "ft"
    t = Finetuner(_ft(out, "checkpoint=%s" % diffusion_run, "iterations=2", "eval_every=0", *IDQL))
    try:
        t.run()
        live = t.eval_policy()
        obs = np.random.RandomState(0).normal(size=(3, 1, 11)).astype(np.float32)
        want = live.act(obs, generator=torch.Generator().manual_seed(5))
    finally:
        t.close()
    policy = dpft.load_policy(str(out))
    assert isinstance(policy, IDQLPolicy) and policy.meta["policy_kind"] == "idql"
    assert policy.num_candidates == 4 and policy.model.ft_denoising_steps == 5
    got = policy.act(obs, generator=torch.Generator().manual_seed(5))
    assert got.shape == (3, 2, 3)
    np.testing.assert_array_equal(got, want)  # the checkpoint acts as the run evaluated
    one = dpft.load_policy(str(out))
    one.num_candidates = 1
    assert not np.array_equal(one.act(obs, generator=torch.Generator().manual_seed(5)), got)
    assert main(["rollout", "checkpoint=%s" % out, "episodes=2", "envs=1", "max_episode_steps=10",
                 "out=%s" % (tmp_path / "eval"), "progress=false"]) == 0
    res = json.load(open(tmp_path / "eval" / "result.json"))
    assert res["num_episodes"] == 2 and res["num_failed"] == 0


@pytest.mark.parametrize("args,needle", [
    (["agent.expectile=1.5"], "agent.expectile=1.5 must be in (0, 1)"),
    (["agent.selection=best"], "agent.selection='best': expected one of argmax, expectile, softmax"),
    (["agent.num_candidates=0"], "agent.num_candidates=0 must be >= 1"),
    (["agent.ft_denoising_steps=-1"], "agent.ft_denoising_steps=-1 must be >= 0 (0 = every sampling step)"),
])
def test_idql_config_errors_name_the_setting(tmp_path, args, needle):
    from dpft.config import compose
    from dpft.errors import DpftError

    with pytest.raises(DpftError) as e:
        compose("finetune", ["agent=idql", "checkpoint=x", "out=%s" % (tmp_path / "o")] + args)
    assert needle in str(e.value)


def test_idql_refuses_a_gaussian_checkpoint(tmp_path, hopper_data):  # noqa: F811
    from dpft.errors import DpftError
    from tests.test_finetune import _pretrain

    run = _pretrain(hopper_data, tmp_path / "g", "policy=gaussian_mlp", "policy.mlp_dims=[8,8]", "horizon_steps=2",
                    "act_steps=2")
    with pytest.raises(DpftError, match="agent=idql fine-tunes a diffusion policy.*holds a gaussian policy"):
        _finetuner(tmp_path / "o", "checkpoint=%s" % run, *IDQL)
