"""IN-RIL / CAIR in the real fine-tuning loop (agents/inril.py): exact step order across an iteration boundary,
m=inf bit-identical to RL only, pcgrad never applies a conflicting IL gradient, CAIR's lambda follows the logged
cosines, exact resume with adaptive m and with CAIR, monitor keys in metrics.jsonl, IL data as in pretraining,
and the config errors."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from dpft.errors import DpftError
from tests.test_finetune import _finetuner, _ft, diffusion_run, gaussian_run, hopper_data  # noqa: F401 (fixtures)

FAST = ["agent.ft_denoising_steps=3", "agent.target_kl=null", "inril.batch_size=8", "eval_every=0"]


def _records(out):
    return [json.loads(line) for line in open(os.path.join(str(out), "metrics.jsonl"))]


def _run(trainer):
    try:
        return trainer.run()
    finally:
        trainer.close()


def _record_steps(trainer, log):
    """Append 'R' / 'I' to ``log`` at each actor / IL optimizer step (step pre-hooks)."""
    def wrap(opt, tag):
        opt.register_step_pre_hook(lambda *_: log.append(tag))

    wrap(trainer.agent.actor_opt, "R")
    if trainer.inril is not None and trainer.inril.il_opt is not None:
        wrap(trainer.inril.il_opt, "I")


@pytest.mark.parametrize("agent", ["dppo", "ppo"])
def test_schedule_counts_optimizer_steps_across_iterations(tmp_path, agent, diffusion_run, gaussian_run):
    # DPPO: 8 chunks x 2 envs x K'=3 = 48 samples / 16 = 3 minibatches x 2 epochs = 6 RL steps per iteration;
    # PPO: 16 samples / 8 = 2 x 2 epochs = 4. With m=4 the IL steps follow global RL steps 4, 8, 12, ...
    ckpt, bs, per_it = (diffusion_run, 16, 6) if agent == "dppo" else (gaussian_run, 8, 4)
    t = _finetuner(tmp_path / "ft", "agent=%s" % agent, "checkpoint=%s" % ckpt, "agent.batch_size=%d" % bs,
                   "inril.m=4", "iterations=2", *FAST)
    log = []
    _record_steps(t, log)
    _run(t)
    seq = "".join(log)
    expected = "".join("R" + ("I" if i % 4 == 0 else "") for i in range(1, 2 * per_it + 1))
    assert seq == expected, seq
    recs = _records(tmp_path / "ft")
    assert [r.get("inril/il_steps") for r in recs[1:]] == [per_it // 4, 2 * per_it // 4]
    assert [r.get("inril/rl_steps") for r in recs[1:]] == [per_it, 2 * per_it]
    assert recs[-1]["inril/m"] == 4.0


def test_il_lr_warmup_ramps_the_il_steps_learning_rate(tmp_path, diffusion_run):
    # m=1: 6 RL steps per iteration -> 12 IL steps in 2 iterations; warm-up over 4 IL steps: k/4 x il_lr, then il_lr
    t = _finetuner(tmp_path / "ft", "agent=dppo", "checkpoint=%s" % diffusion_run, "inril.m=1", "inril.il_lr=2e-4",
                   "inril.il_lr_warmup=4", "iterations=2", *FAST)
    lrs = []
    t.inril.il_opt.register_step_pre_hook(lambda opt, *_: lrs.append(opt.param_groups[0]["lr"]))
    rl_lrs = []
    t.agent.actor_opt.register_step_pre_hook(lambda opt, *_: rl_lrs.append(opt.param_groups[0]["lr"]))
    _run(t)
    assert lrs == pytest.approx([0.5e-4, 1e-4, 1.5e-4] + [2e-4] * 9, rel=1e-12)
    assert len(set(rl_lrs)) >= 1 and 2e-4 not in rl_lrs and 0.5e-4 not in rl_lrs  # the RL optimizer is untouched


def test_m_inf_is_bit_identical_to_rl_only_and_monitor_logs(tmp_path, diffusion_run):
    base = ["agent=dppo", "checkpoint=%s" % diffusion_run, "iterations=2", *FAST[:3], "eval_every=1"]
    off = _finetuner(tmp_path / "off", *base, "inril.monitor_every=0")
    assert off.inril is None  # no plug-in at all: the RL-only run
    _run(off)
    on = _finetuner(tmp_path / "on", *base, "inril.m=inf", "inril.monitor_every=1")
    assert on.inril is not None and on.inril.il_opt is None
    log = []
    _record_steps(on, log)
    _run(on)
    assert set(log) == {"R"}
    a = off.model.state_dict()
    b = on.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for k, v in off.agent.critic.state_dict().items():
        assert torch.equal(v, on.agent.critic.state_dict()[k]), k
    ra, rb = _records(tmp_path / "off"), _records(tmp_path / "on")
    for x, y in zip(ra, rb):  # the RL numbers are the same; only the monitor's keys are added
        for k in ("train/return", "pg_loss", "v_loss", "eval/return"):
            assert x.get(k) == y.get(k), k
    # monitor every update: one cosine per RL step, both norms, held-out IL loss at every evaluation
    for r in rb[1:]:
        assert r["inril/monitor_n"] == r["grad_steps"] == 6
        assert -1.0 <= r["inril/cos_min"] <= r["inril/cos"] <= 1.0
        assert r["inril/g_il_norm"] > 0 and r["inril/g_rl_norm"] > 0
        assert r["inril/m"] is None and r["inril/il_steps"] == 0
    held = [r["eval/il_loss_heldout"] for r in rb]
    assert len(held) == 3 and all(h > 0 for h in held)
    assert "inril/cos" not in ra[1] and "eval/il_loss_heldout" not in ra[0]
    assert os.path.isfile(tmp_path / "on" / "alignment.png") and not os.path.exists(tmp_path / "off" / "alignment.png")


def test_pcgrad_il_step_never_conflicts_with_the_reference(tmp_path, diffusion_run, monkeypatch):
    import dpft.agents.inril as mod

    seen = []
    real = mod.separate_il_gradient

    def spy(g, ref, mode, backend="exact"):
        out = real(g, ref, mode, backend)
        seen.append((g.clone(), None if ref is None else ref.clone(), out.clone(), mode))
        return out

    monkeypatch.setattr(mod, "separate_il_gradient", spy)
    t = _finetuner(tmp_path / "ft", "agent=dppo", "checkpoint=%s" % diffusion_run, "inril.m=1",
                   "inril.separation=pcgrad", "iterations=2", *FAST)
    _run(t)
    assert len(seen) == 12 and all(s[3] == "pcgrad" and s[1] is not None for s in seen)
    conflicts = 0
    for g, r, out, _ in seen:
        g, r, out = g.double(), r.double(), out.double()
        scale = float(out.norm() * r.norm()) + 1e-30
        assert float(out @ r) >= -1e-6 * scale
        if float(g @ r) < 0:
            conflicts += 1
            assert abs(float(out @ r)) <= 1e-6 * scale  # projected onto the reference's orthogonal complement
            resid = out - g  # the removed part lies along r
            assert torch.allclose(resid, (float(resid @ r) / float(r @ r)) * r, atol=1e-7)
        else:
            assert torch.equal(out, g)
    assert conflicts >= 1  # the run did meet conflicting IL gradients
    recs = _records(tmp_path / "ft")
    assert all(r["inril/il_ref_cos_applied_min"] >= -1e-6 for r in recs[1:])


def test_cair_lambda_follows_the_logged_cosines(tmp_path, diffusion_run):
    # linear rule without clipping: lambda_end = lambda_start + rate * (sum of the iteration's cosines)
    t = _finetuner(tmp_path / "ft", "agent=dppo", "checkpoint=%s" % diffusion_run, "cair=true", "cair.rate=0.05",
                   "cair.start=0.5", "inril.monitor_every=3", "iterations=2", *FAST)
    assert t.inril.cair is not None and t.inril.il_opt is None
    _run(t)
    lam = 0.5
    for r in _records(tmp_path / "ft")[1:]:
        assert r["inril/monitor_n"] == r["grad_steps"] == 6  # CAIR computes the IL gradient at every update
        lam += 0.05 * r["inril/cos"] * r["inril/monitor_n"]
        assert r["cair/lambda"] == pytest.approx(lam, abs=1e-9)
    assert lam != 0.5


@pytest.mark.parametrize("mode", ["adaptive_upgrad", "cair"])
def test_resume_is_exact_with_inril_and_cair(tmp_path, mode, diffusion_run):
    from dpft.agents.finetune import finetune
    from dpft.checkpoint import find_latest, read_tensors

    extra = (["inril.m=adaptive", "inril.m_init=2", "inril.m_max=5", "inril.separation=upgrad", "inril.monitor_every=2",
              "inril.il_lr_warmup=3"]
             if mode != "cair" else ["cair=true", "cair.rate=0.05", "inril.m=3"])
    base = ["agent=dppo", "checkpoint=%s" % diffusion_run, "save_every=1", *FAST, *extra]
    finetune(_ft(tmp_path / "full", *base, "iterations=3"))
    finetune(_ft(tmp_path / "part", *base, "iterations=1"))
    finetune(_ft(tmp_path / "part", *base, "iterations=3", "resume=true"))
    da, db = find_latest(str(tmp_path / "full")), find_latest(str(tmp_path / "part"))
    files = ["model.safetensors"] + ["training_state/" + f for f in sorted(os.listdir(os.path.join(da, "training_state")))
                                     if f.startswith("tensors_inril") and f.endswith(".safetensors")]
    groups = {f.split("tensors_")[-1].split(".")[0] for f in files[1:]}
    assert {"inril_schedule", "inril_rl_ema", "inril_il_ema", "inril_rng"} <= groups
    assert ("inril_cair" in groups) == (mode == "cair") and ("inril_adaptive" in groups) == (mode != "cair")
    for f in files:
        a, b = read_tensors(os.path.join(da, f)), read_tensors(os.path.join(db, f))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (f, k)
    ra, rb = _records(tmp_path / "full"), _records(tmp_path / "part")
    assert ra[-1]["inril/il_steps"] == rb[-1]["inril/il_steps"] >= 1
    if mode == "cair":
        assert ra[-1]["cair/lambda"] == rb[-1]["cair/lambda"] != 0.5
    else:
        assert ra[-1]["inril/m"] == rb[-1]["inril/m"] and 1 <= ra[-1]["inril/m"] <= 5


def test_il_losses_are_the_policies_own(tmp_path, diffusion_run, gaussian_run):
    # DPPO: the epsilon loss through the fine-tuned copy on [0, K') (DDPM: the timesteps the copy serves)
    t = _finetuner(tmp_path / "d", "agent=dppo", "checkpoint=%s" % diffusion_run, "inril.m=2", *FAST)
    try:
        plug, model = t.inril, t.model
        assert model.ft_timestep_range() == (0, 3)
        state = plug.gen.get_state()
        g_plug, loss = plug.il_gradient(plug.params)
        plug.gen.set_state(state)
        batch = plug.il_ds.sample(8, plug.gen)
        ref, _ = model.loss(batch, plug.gen, network="ft", t_range=(0, 3))
        grads = torch.autograd.grad(ref, model.finetune_parameters())
        assert float(loss) == float(ref.detach())
        assert torch.equal(g_plug, torch.cat([g.reshape(-1) for g in grads]))
        assert all(p.grad is None for p in plug.params)  # the monitor/IL gradient leaves .grad alone
    finally:
        t.close()
    t = _finetuner(tmp_path / "g", "agent=ppo", "checkpoint=%s" % gaussian_run, "inril.m=2", *FAST)
    try:
        plug = t.inril
        state = plug.gen.get_state()
        batch = plug.il_ds.sample(8, plug.gen)
        nll, _ = t.model.loss(batch)
        plug.gen.set_state(state)
        assert float(t.agent.il_loss(plug.il_ds.sample(8, plug.gen), plug.gen).detach()) == float(nll.detach())
    finally:
        t.close()


def test_il_data_is_windowed_and_normalized_as_in_pretraining(tmp_path, hopper_data, diffusion_run):
    from dpft.agents.inril import load_il_data
    from dpft.checkpoint import load_checkpoint
    from dpft.data.hdf5 import load_demos

    ckpt = load_checkpoint(diffusion_run)
    meta = ckpt.meta
    assert meta["dataset"] == os.path.abspath(hopper_data)
    assert meta["data_split"] == {"train_filter_key": "train", "valid_filter_key": "valid", "valid_ratio": 0.0,
                                  "seed": 0, "source": "ratio"}
    il, held, info = load_il_data(meta, ckpt.normalizer, None, 0, torch.device("cpu"))
    # pretraining held nothing out (valid_ratio=0): a seeded 10% of the 3 demos (1) is held out of the IL stream
    assert info["il_demos"] == 2 and info["heldout_demos"] == 1 and info["split"] == "ratio"
    assert set(il.demo_names) | set(held.demo_names) == {"demo_0", "demo_1", "demo_2"}
    raw = load_demos(hopper_data, ["obs"], demo_names=il.demo_names)
    want = ckpt.normalizer.normalize("action", torch.from_numpy(raw.actions.astype(np.float32)))
    assert torch.equal(il.actions, want)
    assert len(il) == 2 * (20 - 4 + 1)  # windows of horizon 4 inside each 20-step demo
    # a pretraining valid_ratio split is reproduced exactly: the held-out demos are the pretraining valid demos
    from dpft.data.dataset import split_demos

    meta2 = dict(meta, data_split={"train_filter_key": "train", "valid_filter_key": "valid", "valid_ratio": 0.34,
                                   "seed": 3})
    il2, held2, info2 = load_il_data(meta2, ckpt.normalizer, None, 0, torch.device("cpu"))
    s = split_demos(["demo_0", "demo_1", "demo_2"], {}, "train", "valid", 0.34, 3)
    assert held2.demo_names == s.valid and il2.demo_names == s.train and info2["split"] == "ratio"
    with pytest.raises(DpftError, match="inril.dataset.*do not exist"):
        load_il_data(meta, ckpt.normalizer, str(tmp_path / "nope.hdf5"), 0, torch.device("cpu"))


@pytest.mark.parametrize("args,needle", [
    (["agent=dppo", "inril.separation=network"], "inril.separation=network separates the networks.*agent=dppo"),
    (["agent=ppo", "inril.separation=network"], "needs agent=residual_ppo"),
    (["inril.separation=orthogonal"], "inril.separation='orthogonal': expected one of none, pcgrad, upgrad, network"),
    (["inril.m=0"], "inril.m=0: expected an integer >= 1"),
    (["inril.m=often"], "inril.m='often'"),
    (["inril.m_min=5", "inril.m_max=3"], "m_min <= m_init <= m_max"),
    (["inril.monitor_every=-1"], "inril.monitor_every=-1 must be >= 0"),
    (["inril.il_lr_warmup=-2"], "inril.il_lr_warmup=-2 must be >= 0"),
    (["cair=true", "cair.rate=-1"], "cair.rate=-1"),
    (["cair.start=2"], "cair.start=2"),
    (["agent=residual_ppo", "inril.separation=network", "inril.m=adaptive"], "share no space: inril.m=adaptive"),
    (["agent=residual_ppo", "inril.separation=network", "cair=true"], "share no space: cair=true"),
])
def test_config_errors_name_the_key(tmp_path, args, needle):
    with pytest.raises(DpftError, match=needle):
        _ft(tmp_path / "o", "checkpoint=x", *args)


def test_rl_only_runs_without_the_demo_file_but_inril_needs_it(tmp_path, diffusion_run, capsys):
    bad = "inril.dataset=%s" % (tmp_path / "gone.hdf5")
    t = _finetuner(tmp_path / "a", "agent=dppo", "checkpoint=%s" % diffusion_run, bad, *FAST)
    try:
        assert t.inril is None and "alignment monitor off" in capsys.readouterr().out
    finally:
        t.close()
    with pytest.raises(DpftError, match="gone.hdf5' \\(inril.dataset\\) do not exist"):
        _finetuner(tmp_path / "b", "agent=dppo", "checkpoint=%s" % diffusion_run, bad, "inril.m=3", *FAST)


def test_from_scratch_runs_without_the_monitor_and_refuse_inril(tmp_path):
    t = _finetuner(tmp_path / "s", "agent=ppo", "env=hopper", "iterations=1")
    try:
        assert t.inril is None  # no demos to monitor against
    finally:
        t.close()
    with pytest.raises(DpftError, match="from-scratch run.*Pass checkpoint=RUN_DIR"):
        _finetuner(tmp_path / "s2", "agent=ppo", "env=hopper", "inril.m=5")


def test_cair_true_is_a_command_line_switch():
    from dpft.rl.config import FinetuneConfig

    assert FinetuneConfig.rewrite_overrides(["cair=true", "+cair=False", "cair.rate=0.1", "x=true"]) == \
        ["cair='true'", "+cair='false'", "cair.rate=0.1", "x=true"]


def test_a_checkpoint_from_before_inril_resumes_with_a_fresh_monitor(tmp_path, diffusion_run, monkeypatch, capsys):
    import dpft.agents.inril as mod
    from dpft.agents.finetune import finetune

    base = ["agent=dppo", "checkpoint=%s" % diffusion_run, "save_every=1", *FAST]
    real = mod.build_inril
    monkeypatch.setattr(mod, "build_inril", lambda *a, **k: None)  # an older dpft: no plug-in, no IN-RIL state
    finetune(_ft(tmp_path / "ft", *base, "iterations=1"))
    monkeypatch.setattr(mod, "build_inril", real)
    finetune(_ft(tmp_path / "ft", *base, "iterations=2", "resume=true"))
    assert "no alignment-monitor state" in capsys.readouterr().out
    assert _records(tmp_path / "ft")[-1]["inril/rl_steps"] == 6  # counted from the resume on
    with pytest.raises(DpftError, match="inril.m"):  # switching IN-RIL on is a change of the run
        finetune(_ft(tmp_path / "ft", *base, "iterations=3", "resume=true", "inril.m=3"))
