"""Exact resume: a run SIGKILLed between checkpoints and restarted with resume=true ends bit-identical to an
uninterrupted run (weights, EMA, optimizer, RNG and the metrics it logged).

The crash is simulated with the test hook ``DPFT_TEST_KILL_AT_STEP=k`` of agents/pretrain.py, which makes
the training process ``os.kill(os.getpid(), SIGKILL)`` right after step k: no cleanup, no final save.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import torch
from safetensors.torch import load_file

from dpft.metrics import read_metrics
from tests.synth import write_learnable_hdf5

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = (
    "import json, sys\n"
    "from dpft.config import compose\n"
    "from dpft.agents.pretrain import pretrain\n"
    "print('FINAL', pretrain(compose('pretrain', json.loads(sys.argv[1]))))\n"
)


def overrides(dataset, out, *extra):
    # save_every (7) is not a multiple of log_every (5): the checkpoint at 14 holds a half-filled logging
    # window whose partial loss sum must be restored for the step-15 metrics line to match
    return ["dataset=%s" % dataset, "out=%s" % out, "obs_keys=[robot0_eef_pos,object]", "++policy.mlp_dims=[64,64,64]",
            "++policy.denoising_steps=5", "++steps=30", "++batch_size=32", "++save_every=7", "++log_every=5",
            "++val_every=10", "++warmup_steps=5", "++lr=1e-3", "++num_threads=1", "++progress=false",
            "++keep_checkpoints=0"] + list(extra)


def launch(args, kill_at=None):
    env = dict(os.environ)
    env.pop("DPFT_TEST_KILL_AT_STEP", None)
    if kill_at is not None:
        env["DPFT_TEST_KILL_AT_STEP"] = str(kill_at)
    return subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def test_killed_run_resumes_bit_identical(tmp_path):
    data = str(tmp_path / "learnable.hdf5")
    write_learnable_hdf5(data, filter_keys=True)
    ref, crash = tmp_path / "uninterrupted", tmp_path / "crashed"
    # the two first runs are independent: run them side by side
    p_ref = launch(overrides(data, ref))
    p_crash = launch(overrides(data, crash), kill_at=17)
    rc, out, err = finish(p_ref)
    assert rc == 0, err
    rc, out, err = finish(p_crash)
    assert rc == -signal.SIGKILL, (rc, err)
    assert "FINAL" not in out
    ckpts = sorted(p for p in os.listdir(crash / "checkpoints") if p.startswith("step_"))
    assert ckpts == ["step_00000007", "step_00000014"]
    assert [r["step"] for r in read_metrics(str(crash))] == [5, 10, 15]  # step 15 is redone after resume

    rc, out, err = finish(launch(overrides(data, crash, "resume=true")))
    assert rc == 0, err
    assert "resuming at step 14" in out and "FINAL %s" % (crash / "checkpoints" / "step_00000030") in out

    a_dir, b_dir = ref / "checkpoints" / "step_00000030", crash / "checkpoints" / "step_00000030"
    for name in ("model.safetensors", "ema.safetensors", "normalizer.safetensors",
                 "training_state/optimizer.safetensors", "training_state/rng.safetensors"):
        a, b = load_file(str(a_dir / name)), load_file(str(b_dir / name))
        assert a.keys() == b.keys(), name
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    for name in ("training_state/optimizer.json", "training_state/scheduler.json", "training_state/step.json"):
        assert json.loads((a_dir / name).read_text()) == json.loads((b_dir / name).read_text()), name
    # the metrics file is consistent: one line per logged step, values identical to the uninterrupted run
    ma, mb = read_metrics(str(ref)), read_metrics(str(crash))
    assert [r["step"] for r in mb] == [5, 10, 15, 20, 25, 30]
    for ra, rb in zip(ma, mb):
        for key in ("loss", "lr", "grad_norm", "valid_loss", "epoch"):
            assert ra.get(key) == rb.get(key), (ra["step"], key)
    assert not [p for p in os.listdir(crash / "checkpoints") if p.startswith(".tmp")]
