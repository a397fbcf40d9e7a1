"""Pretraining loop (agents/pretrain.py): learning, run-dir files, metrics, LR schedule, resume errors."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from dpft.agents.pretrain import (
    Pretrainer,
    clip_grad_norm,
    config_differences,
    cosine_warmup_lambda,
    pretrain,
    resolve_device,
)
from dpft.config import compose, to_yaml
from dpft.errors import DpftError
from dpft.metrics import MetricsLogger, plot_loss_curve, read_metrics
from tests.synth import write_learnable_hdf5


def small(dataset, out, *extra, **kw):
    """Overrides for a tiny, fast run (``++`` so keys absent from cfg/pretrain.yaml work too)."""
    values = {
        "obs_keys": "[robot0_eef_pos,object]", "policy.mlp_dims": "[64,64,64]", "policy.denoising_steps": 5,
        "steps": 30, "batch_size": 32, "save_every": 10, "log_every": 5, "val_every": 10, "warmup_steps": 5,
        "lr": 1e-3, "num_threads": 1, "progress": "false",
    }
    values.update(kw)
    return ["dataset=%s" % dataset, "out=%s" % out] + ["++%s=%s" % kv for kv in values.items()] + list(extra)


@pytest.fixture(scope="module")
def learnable(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "learnable.hdf5"
    write_learnable_hdf5(path, filter_keys=True)
    return str(path)


@pytest.mark.parametrize("policy,extra", [
    ("diffusion_mlp", {}),
    ("diffusion_unet", {"policy.down_dims": "[16,32]"}),
    ("gaussian_mlp", {"policy.mlp_dims": "[64,64]"}),
])
def test_loss_falls_on_learnable_data(learnable, tmp_path, policy, extra):
    out = tmp_path / "run"
    kw = dict(steps=60, batch_size=64, save_every=60, log_every=10, val_every=30, lr=3e-3)
    kw.update(extra)
    final = pretrain(compose("pretrain", small(learnable, out, "policy=" + policy, **kw)))
    assert final == str(out / "checkpoints" / "step_00000060")
    recs = [r for r in read_metrics(str(out)) if "loss" in r]
    assert [r["step"] for r in recs] == [10, 20, 30, 40, 50, 60]
    first, last = recs[0]["loss"], recs[-1]["loss"]
    assert last < 0.5 * first, (policy, first, last)
    if policy == "gaussian_mlp":  # NLL can go negative: also check the mean's squared error
        assert recs[-1]["action_mse"] < 0.5 * recs[0]["action_mse"]
    valid = [r["valid_loss"] for r in read_metrics(str(out)) if "valid_loss" in r]
    assert len(valid) == 2 and valid[1] < valid[0]


def test_run_dir_metrics_and_loss_curve(learnable, tmp_path):
    out = tmp_path / "run"
    pretrain(compose("pretrain", small(learnable, out, keep_checkpoints=2)))
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step_00000020", "step_00000030"]
    recs = read_metrics(str(out))
    assert [r["step"] for r in recs] == [5, 10, 15, 20, 25, 30]
    for r in recs:
        for key in ("loss", "lr", "grad_norm", "samples_per_s", "data_time", "update_time", "epoch", "time"):
            assert isinstance(r[key], float), key
    assert [("valid_loss" in r) for r in recs] == [False, True, False, True, False, True]
    # lr logged is the one used at that step: cosine after 5 warm-up steps over 30 steps
    fn = cosine_warmup_lambda(5, 30, 0.0)
    assert recs[1]["lr"] == pytest.approx(1e-3 * fn(9))
    # the run's config.yaml equals the checkpoint's
    saved = (out / "checkpoints" / "step_00000030" / "config.yaml").read_text()
    assert (out / "config.yaml").read_text() == saved
    meta = json.loads((out / "checkpoints" / "step_00000030" / "meta.json").read_text())
    assert meta["obs_keys"] == ["robot0_eef_pos", "object"] and meta["action_dim"] == 4
    assert meta["obs_shapes"] == {"robot0_eef_pos": [3], "object": [3]} and meta["env_args"]["env_name"] == \
        "SyntheticLearnable"
    assert meta["policy"] == "diffusion_mlp" and meta["horizon_steps"] == 4 and meta["step"] == 30
    png = out / "loss_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image as mpimg

    img = mpimg.imread(str(png))
    assert img.shape[0] == 400 and img.shape[1] == 600


def test_cosine_warmup_schedule_values():
    fn = cosine_warmup_lambda(warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    assert [fn(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert fn(4) == pytest.approx(1.0)
    assert fn(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # half way: 0.55
    assert fn(14) == pytest.approx(0.1) and fn(100) == pytest.approx(0.1)
    assert cosine_warmup_lambda(0, 10, 0.0)(0) == pytest.approx(1.0)


def test_clip_grad_norm_matches_torch():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for p, q in zip(a, b):
        g = torch.randn_like(p) * 3
        p.grad, q.grad = g.clone(), g.clone()
    n1 = clip_grad_norm(a, 1.0)
    n2 = torch.nn.utils.clip_grad_norm_(b, 1.0)
    assert torch.equal(n1, n2)
    for p, q in zip(a, b):
        assert torch.equal(p.grad, q.grad)
    before = [p.grad.clone() for p in a]
    clip_grad_norm(a, 1e6)  # nothing to clip: gradients unchanged
    assert all(torch.equal(x, p.grad) for x, p in zip(before, a))


def test_existing_run_needs_resume_and_resume_needs_checkpoint(learnable, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(DpftError, match="resume=true but out='.*run' holds no run to resume .it does not exist."):
        Pretrainer(compose("pretrain", small(learnable, out, "resume=true")))
    assert not out.exists()
    pretrain(compose("pretrain", small(learnable, out, steps=10, min_lr_ratio=0.1)))
    with pytest.raises(DpftError, match="already holds a pretrain run with checkpoints .newest: step_00000010.. Pass "
                                        "resume=true to continue it, overwrite=true to delete it"):
        Pretrainer(compose("pretrain", small(learnable, out, steps=10, min_lr_ratio=0.1)))
    # resuming a finished run is a no-op returning the last checkpoint; more steps continue it at the final LR
    kw = dict(min_lr_ratio=0.1)
    assert pretrain(compose("pretrain", small(learnable, out, "resume=true", steps=10, **kw))).endswith("step_00000010")
    assert pretrain(compose("pretrain", small(learnable, out, "resume=true", steps=15, **kw))).endswith("step_00000015")
    recs = read_metrics(str(out))
    assert [r["step"] for r in recs] == [5, 10, 15]
    # the schedule is not restarted: step 15 logs lr of step 14 = min_lr_ratio * lr (end of the 10-step schedule)
    assert recs[2]["lr"] == pytest.approx(0.1 * 1e-3)
    step_json = json.loads((out / "checkpoints" / "step_00000015" / "training_state" / "step.json").read_text())
    assert step_json["schedule_steps"] == 10


def test_longer_budget_on_resume_refused_when_schedule_ends_at_zero(learnable, tmp_path):
    out = tmp_path / "run"
    pretrain(compose("pretrain", small(learnable, out, steps=10)))
    with pytest.raises(DpftError) as e:
        Pretrainer(compose("pretrain", small(learnable, out, "resume=true", steps=20)))
    msg = str(e.value)
    assert "steps=20, but the run's learning-rate schedule ends at step 10 with min_lr_ratio=0.0" in msg
    assert "does not restart the cosine schedule" in msg
    # overwrite=true starts over with the new budget (and a fresh schedule)
    assert pretrain(compose("pretrain", small(learnable, out, "++overwrite=true", steps=20))).endswith("step_00000020")
    assert [r["step"] for r in read_metrics(str(out))] == [5, 10, 15, 20]
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step_00000010", "step_00000020"]


def test_restart_after_crash_before_first_checkpoint(learnable, tmp_path):
    """A run killed before its first save leaves config.yaml and metrics lines but no checkpoint: a plain
    restart (no resume) is allowed and starts the metrics over."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("old: 1\n")
    (out / "metrics.jsonl").write_text('{"step": 5, "loss": 9.0}\n{"step": 10, "loss": 8.0}\n')
    (out / "checkpoints").mkdir()
    pretrain(compose("pretrain", small(learnable, out, steps=5)))
    recs = read_metrics(str(out))
    assert [r["step"] for r in recs] == [5] and recs[0]["loss"] != 9.0
    assert "old: 1" not in (out / "config.yaml").read_text()


def test_resume_with_changed_architecture_lists_keys(learnable, tmp_path):
    out = tmp_path / "run"
    pretrain(compose("pretrain", small(learnable, out, steps=10)))
    with pytest.raises(DpftError) as e:
        Pretrainer(compose("pretrain", small(learnable, out, "resume=true", "policy=gaussian_mlp", horizon_steps=2,
                                             act_steps=2)))
    msg = str(e.value)
    assert "policy.name: checkpoint 'diffusion_mlp', requested 'gaussian_mlp'" in msg
    assert "horizon_steps: checkpoint 4, requested 2" in msg
    # allowed changes are not reported
    cfg = compose("pretrain", small(learnable, out, "resume=true", steps=99, save_every=3, log_every=2))
    saved = (out / "checkpoints" / "step_00000010" / "config.yaml").read_text()
    assert config_differences(saved, cfg) == []
    cfg2 = compose("pretrain", small(learnable, out, "resume=true", lr=0.5))
    assert config_differences(saved, cfg2) == [("lr", 0.001, 0.5)]
    assert "steps: 10" in to_yaml(compose("pretrain", small(learnable, out, steps=10)))


def test_ddp_batch_must_divide(learnable, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(DpftError, match="batch_size=33 is the global batch and must be divisible by the number of"):
        Pretrainer(compose("pretrain", small(learnable, tmp_path / "run", batch_size=33)))


def test_device_errors():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(DpftError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(DpftError, match="not a torch device"):
        resolve_device("gpu0")


def test_metrics_logger_truncates_on_resume(tmp_path):
    with MetricsLogger(str(tmp_path)) as log:
        for s in (5, 10, 15):
            log.log({"loss": torch.tensor(1.0 / s), "bad": float("nan")}, s)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 20, "lo')  # a torn line from a crash
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [5, 10, 15]
    with MetricsLogger(str(tmp_path), start_step=10) as log:
        log.log({"loss": 0.5}, 15)
    recs = read_metrics(str(tmp_path))
    assert [r["step"] for r in recs] == [5, 10, 15]
    assert [r["loss"] for r in recs] == pytest.approx([0.2, 0.1, 0.5])  # float32 tensors logged as numbers
    assert recs[0]["bad"] == "nan"
    assert plot_loss_curve(str(tmp_path)).endswith("loss_curve.png")
    with MetricsLogger(str(tmp_path / "rank1"), rank0=False) as log:
        log.log({"loss": 1.0}, 1)
    assert not (tmp_path / "rank1").exists()


def test_wandb_offline_run(learnable, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    out = tmp_path / "run"
    pretrain(compose("pretrain", small(learnable, out, logger="wandb", wandb_mode="offline", steps=10)))
    run_id = (out / "wandb_run_id.txt").read_text().strip()
    runs = [d for d in os.listdir(out / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 1 and runs[0].endswith(run_id)
    assert [r["step"] for r in read_metrics(str(out))] == [5, 10]


def test_wandb_missing_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *a, **kw):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(DpftError, match=r"pip install dpft\[wandb\]"):
        MetricsLogger(str(tmp_path), use_wandb=True)


def test_resume_from_damaged_checkpoint_names_file_and_the_way_out(learnable, tmp_path):
    out = tmp_path / "run"
    pretrain(compose("pretrain", small(learnable, out, steps=20, save_every=10)))
    damaged = out / "checkpoints" / "step_00000020" / "training_state" / "optimizer.safetensors"
    raw = bytearray(damaged.read_bytes())
    raw[-1] ^= 1
    damaged.write_bytes(bytes(raw))
    with pytest.raises(DpftError) as e:
        Pretrainer(compose("pretrain", small(learnable, out, "resume=true", steps=20, save_every=10)))
    msg = str(e.value)
    assert "resume=true: Checkpoint file '%s' is damaged: its sha256 is" % damaged in msg
    assert "To resume from the previous checkpoint (step_00000010), delete '%s'." % damaged.parent.parent in msg
