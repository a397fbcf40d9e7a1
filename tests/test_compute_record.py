"""Reproducibility (issue 19, item 2): the resolved torch thread count (and torch build, CPU kernels) is recorded in
run.json and every checkpoint; a resume without num_threads= uses the recorded count; another count warns."""
from __future__ import annotations

import json
import os

import torch

from dpft.checkpoint import find_latest, read_json
from dpft.config import compose
from dpft.sysinfo import RESULT_KEYS, compute_environment, resume_warning
from tests.synth import write_learnable_hdf5


def _pretrain(tmp_path, *extra):
    from dpft.agents.pretrain import pretrain

    data = tmp_path / "d.hdf5"
    if not data.exists():
        write_learnable_hdf5(data)
    out = tmp_path / "run"
    pretrain(compose("pretrain", ["dataset=%s" % data, "out=%s" % out, "obs_keys=[robot0_eef_pos,object]",
                                  "++policy.mlp_dims=[32,32,32]", "++policy.denoising_steps=3", "++batch_size=16",
                                  "++val_every=0", "++warmup_steps=1", "++progress=false", "++save_every=2", "++min_lr_ratio=0.1"]
                     + list(extra)))
    return str(out)


def test_compute_environment_fields():
    env = compute_environment()
    assert env["torch_num_threads"] == torch.get_num_threads()
    assert env["torch_version"] == torch.__version__
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(RESULT_KEYS) <= set(env)
    json.dumps(env)  # recorded as JSON


def test_recorded_thread_count_is_honoured_and_another_count_warns(tmp_path, capsys):
    out = _pretrain(tmp_path, "++steps=2", "++num_threads=1")
    assert read_json(os.path.join(out, "run.json"))["compute"]["torch_num_threads"] == 1
    meta = read_json(os.path.join(find_latest(out), "meta.json"))
    assert meta["compute"]["torch_num_threads"] == 1
    assert meta["compute"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    # resume without num_threads under another default count: the recorded count (1) is used, silently
    torch.set_num_threads(2)
    capsys.readouterr()
    _pretrain(tmp_path, "++steps=4", "resume=true")
    assert torch.get_num_threads() == 1
    assert read_json(os.path.join(find_latest(out), "meta.json"))["compute"]["torch_num_threads"] == 1
    assert "different compute environment" not in capsys.readouterr().err
    # resume with an explicit other count: it is used, with a warning naming both counts
    _pretrain(tmp_path, "++steps=6", "resume=true", "++num_threads=2")
    err = capsys.readouterr().err
    assert "torch_num_threads 1 -> 2" in err and "will differ from an uninterrupted run" in err
    assert read_json(os.path.join(find_latest(out), "meta.json"))["compute"]["torch_num_threads"] == 2


def test_resume_warning_only_for_result_keys():
    now = compute_environment()
    assert resume_warning(dict(now, omp_num_threads_env="7"), now, "ck") is None
    assert resume_warning(None, now, "ck") is None  # checkpoints before the record resume silently
    msg = resume_warning(dict(now, torch_num_threads=now["torch_num_threads"] + 3), now, "ck")
    assert "num_threads=%d" % (now["torch_num_threads"] + 3) in msg
