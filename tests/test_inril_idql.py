"""IN-RIL / CAIR with agent=idql (agents/idql.py, dpft/rl/idql.py, agents/inril.py) on a tiny Hopper run: the
schedule counts IDQL's actor gradient steps across iteration boundaries (warm-up steps do not count), the IL
step trains the actor and nothing else, the alignment monitor and held-out loss reach metrics.jsonl, m=inf with
the monitor leaves IDQL bit-identical, CAIR's lambda follows the logged cosines, exact resume with m=2 and
CAIR, and the refused settings (separation=network, train_actor=false)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from dpft.errors import DpftError
from tests.test_finetune import _ft, _finetuner, diffusion_run, hopper_data  # noqa: F401 (fixtures)

# 2 envs x 8 chunks = 16 new transitions per iteration x replay_ratio 4 / batch 16 = 4 gradient steps per
# iteration (V -> Q -> target -> actor); n_critic_warmup_itr=1: iteration 1 steps the critics only
IDQL = ["agent=idql", "agent.batch_size=16", "agent.replay_ratio=4", "agent.replay_size=100",
        "agent.num_candidates=4", "agent.critic_dims=[16,16,16]", "agent.n_critic_warmup_itr=1",
        "agent.actor_lr=1e-3", "inril.batch_size=8", "eval_every=0"]


def _records(out):
    return [json.loads(line) for line in open(os.path.join(str(out), "metrics.jsonl"))]


def _run(trainer):
    try:
        return trainer.run()
    finally:
        trainer.close()


def _log_steps(trainer, log):
    """Append V / Q / A / I at each value, Q, actor and IL optimizer step."""
    for name, tag in (("value", "V"), ("q", "Q"), ("actor", "A")):
        trainer.agent.opts[name].register_step_pre_hook(lambda *_, t=tag: log.append(t))
    if trainer.inril is not None and trainer.inril.il_opt is not None:
        trainer.inril.il_opt.register_step_pre_hook(lambda *_: log.append("I"))


def test_schedule_counts_idql_actor_steps_across_iterations(tmp_path, diffusion_run):
    # m=3: actor steps 1..4 in iteration 2 and 5..8 in iteration 3 (iteration 1 is the critic warm-up), so the
    # IL steps follow actor steps 3 and 6 -- the second one counts steps 4, 5, 6 across the iteration boundary
    t = _finetuner(tmp_path / "ft", "checkpoint=%s" % diffusion_run, "inril.m=3", "iterations=3", *IDQL)
    assert t.inril is not None and t.agent.inril is t.inril
    log = []
    _log_steps(t, log)
    _run(t)
    warm = "VQ" * 4
    it2 = "VQA" + "VQA" + "VQAI" + "VQA"
    it3 = "VQA" + "VQAI" + "VQA" + "VQA"
    assert "".join(log) == warm + it2 + it3
    recs = _records(tmp_path / "ft")[1:]
    assert [r["grad_steps"] for r in recs] == [4, 4, 4]
    assert [r["inril/rl_steps"] for r in recs] == [0, 4, 8]
    assert [r["inril/il_steps"] for r in recs] == [0, 1, 2]
    assert [r["actor_updated"] for r in recs] == [False, True, True]
    assert "inril/il_loss" not in recs[0] and recs[1]["inril/il_loss"] > 0 and recs[2]["inril/m"] == 3.0


def test_il_step_trains_the_actor_copy_and_nothing_else(tmp_path, diffusion_run):
    t = _finetuner(tmp_path / "ft", "checkpoint=%s" % diffusion_run, "inril.m=1", *IDQL)
    try:
        plug, agent, model = t.inril, t.agent, t.model
        assert model.ft_timestep_range() == (0, model.num_sampling_steps)  # IDQL's whole-chain copy
        assert [id(p) for p in plug.params] == [id(p) for p in agent.opts["actor"].param_groups[0]["params"]]
        # the IL loss is the actor's diffusion loss through the copy on a demo batch (DPPO's actor_il_loss)
        state = plug.gen.get_state()
        g, loss = plug.il_gradient(plug.params)
        plug.gen.set_state(state)
        batch = plug.il_ds.sample(8, plug.gen)
        ref, _ = model.loss(batch, plug.gen, network="ft", t_range=model.ft_timestep_range())
        assert float(loss) == float(ref.detach())
        grads = torch.autograd.grad(ref, plug.params)
        assert torch.equal(g, torch.cat([x.reshape(-1) for x in grads]))
        plug.gen.set_state(state)

        before = {k: v.clone() for k, v in model.state_dict().items()}
        critic = {k: v.clone() for k, v in agent.ac.critic_state_dict().items()}
        opt_state = {k: dict(v) for k, v in agent.opts["actor"].state_dict()["state"].items()}
        assert plug.schedule.record_rl_step()  # as after an RL actor step: with m=1 an IL step is due
        plug.il_step()
        after = model.state_dict()
        ft = {k for k in before if k.startswith("ft_")}
        assert ft and any(not torch.equal(before[k], after[k]) for k in ft)
        for k in set(before) - ft:  # the frozen pretrained base
            assert torch.equal(before[k], after[k]), k
        for k, v in agent.ac.critic_state_dict().items():  # value, q and q_target
            assert torch.equal(critic[k], v), k
        assert agent.opts["actor"].state_dict()["state"] == opt_state == {}  # the RL optimizer never stepped
        assert all(p.grad is None for p in plug.params)
        assert plug.schedule.il_steps == 1 and plug.schedule.rl_steps == 1
    finally:
        t.close()


def test_monitor_metrics_and_heldout_loss_reach_metrics_jsonl(tmp_path, diffusion_run):
    base = ["checkpoint=%s" % diffusion_run, "iterations=3", *IDQL[:-1], "eval_every=1", "eval_episodes=1"]
    off = _finetuner(tmp_path / "off", *base, "inril.monitor_every=0")
    assert off.inril is None
    _run(off)
    on = _finetuner(tmp_path / "on", *base, "inril.m=inf", "inril.monitor_every=2")
    assert on.inril is not None and on.inril.il_opt is None
    seen = []
    real = on.inril.after_rl_backward

    def spy():
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in on.inril.params])
        seen.append(float(torch.linalg.vector_norm(flat)))
        real()

    on.inril.after_rl_backward = spy
    _run(on)
    # the monitor never changes IDQL: the same actor, critics and RL numbers as without the plug-in
    for k, v in off.model.state_dict().items():
        assert torch.equal(v, on.model.state_dict()[k]), k
    for k, v in off.agent.ac.critic_state_dict().items():
        assert torch.equal(v, on.agent.ac.critic_state_dict()[k]), k
    ra, rb = _records(tmp_path / "off"), _records(tmp_path / "on")
    for x, y in zip(ra, rb):
        for k in ("idql/v_loss", "idql/q_loss", "actor_loss", "train/return", "eval/return"):
            assert x.get(k) == y.get(k), k
    # every 2nd actor step (counts 0 and 2 of iteration 2, 4 and 6 of iteration 3); none in the warm-up
    assert "inril/cos" not in rb[1] and rb[1]["inril/rl_steps"] == 0
    assert len(seen) == 8
    for r, norms in zip(rb[2:], (seen[0:4], seen[4:8])):
        assert r["inril/monitor_n"] == 2 and r["inril/il_steps"] == 0 and r["inril/m"] is None
        assert -1.0 <= r["inril/cos_min"] <= r["inril/cos"] <= 1.0
        assert r["inril/g_il_norm"] > 0
        assert r["inril/g_rl_norm"] == pytest.approx((norms[0] + norms[2]) / 2, rel=1e-5)  # steps 0 and 2
    held = [r["eval/il_loss_heldout"] for r in rb]
    assert len(held) == 4 and all(h > 0 for h in held) and held[0] != held[-1]  # the actor moved
    assert "inril/cos" not in ra[2] and "eval/il_loss_heldout" not in ra[0]
    assert os.path.isfile(tmp_path / "on" / "alignment.png")


def test_cair_lambda_follows_the_logged_cosines(tmp_path, diffusion_run):
    t = _finetuner(tmp_path / "ft", "checkpoint=%s" % diffusion_run, "cair=true", "cair.rate=0.05",
                   "cair.start=0.5", "inril.monitor_every=3", "iterations=3", *IDQL)
    assert t.inril.cair is not None and t.inril.il_opt is None
    _run(t)
    lam = 0.5
    recs = _records(tmp_path / "ft")[1:]
    assert recs[0]["cair/lambda"] == 0.5 and "inril/cos" not in recs[0]  # warm-up: no actor step to weight
    for r in recs[1:]:
        assert r["inril/monitor_n"] == r["grad_steps"] == 4  # CAIR's IL gradient at every actor step
        lam += 0.05 * r["inril/cos"] * r["inril/monitor_n"]
        assert r["cair/lambda"] == pytest.approx(lam, abs=1e-9)
    assert lam != 0.5


def test_resume_is_exact_with_m2_and_cair(tmp_path, diffusion_run):
    from dpft.agents.finetune import finetune
    from dpft.checkpoint import find_latest, read_tensors

    base = ["checkpoint=%s" % diffusion_run, "save_every=1", "inril.m=2", "cair=true", "cair.rate=0.05",
            "inril.separation=pcgrad", *IDQL]
    finetune(_ft(tmp_path / "full", *base, "iterations=3"))
    finetune(_ft(tmp_path / "part", *base, "iterations=2"))  # killed after the first interleaved iteration
    finetune(_ft(tmp_path / "part", *base, "iterations=3", "resume=true"))
    da, db = find_latest(str(tmp_path / "full")), find_latest(str(tmp_path / "part"))
    ts = sorted(os.listdir(os.path.join(da, "training_state")))
    files = ["model.safetensors", "critic.safetensors"] + ["training_state/" + f for f in ts
                                                          if f.endswith(".safetensors")]
    names = " ".join(files)
    for want in ("tensors_inril_schedule", "tensors_inril_rl_ema", "tensors_inril_il_ema", "tensors_inril_rng",
                 "tensors_inril_cair", "optimizer_inril_il", "tensors_replay", "optimizer_actor"):
        assert want in names, (want, names)
    for f in files:
        a, b = read_tensors(os.path.join(da, f)), read_tensors(os.path.join(db, f))
        assert a.keys() == b.keys(), f
        for k in a:
            assert torch.equal(a[k], b[k]), (f, k)
    ra, rb = _records(tmp_path / "full"), _records(tmp_path / "part")
    assert ra[-1]["inril/il_steps"] == rb[-1]["inril/il_steps"] == 4  # 8 actor steps / m=2
    assert ra[-1]["inril/rl_steps"] == rb[-1]["inril/rl_steps"] == 8
    assert ra[-1]["cair/lambda"] == rb[-1]["cair/lambda"] != 0.5
    for k in ("inril/cos", "inril/il_loss", "actor_loss", "idql/q_loss"):
        assert ra[-1][k] == rb[-1][k], k


@pytest.mark.parametrize("args,needle", [
    (["agent=idql", "inril.separation=network", "inril.m=2"],
     "inril.separation=network is not available for agent=idql: .*same network, the fine-tuned diffusion actor"
     ".*Use inril.separation=none, pcgrad or upgrad"),
    (["agent=idql", "inril.separation=network"], "not available for agent=idql"),
    (["agent=idql", "agent.train_actor=false", "inril.m=5"],
     "inril.m=5 / cair=false interleave with .*IDQL's actor gradient steps, but agent.train_actor=false"),
    (["agent=idql", "agent.train_actor=false", "cair=true"], "cair=true .*agent.train_actor=false"),
])
def test_refused_settings_name_the_reason(tmp_path, args, needle):
    with pytest.raises(DpftError, match=needle):
        _ft(tmp_path / "o", "checkpoint=x", *args)


def test_train_actor_false_runs_rl_only_with_the_monitor_idle(tmp_path, diffusion_run):
    # critics-only IDQL (the IDQL paper's online variant) has no actor step: the monitor has nothing to compare
    t = _finetuner(tmp_path / "ft", "checkpoint=%s" % diffusion_run, "agent.train_actor=false", "iterations=2",
                   *IDQL)
    assert t.inril is not None and t.inril.il_opt is None
    _run(t)
    for r in _records(tmp_path / "ft")[1:]:
        assert r["inril/rl_steps"] == 0 and "inril/cos" not in r
