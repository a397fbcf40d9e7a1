"""Data-parallel pretraining on CPU: two gloo processes launched the way torchrun launches them (env RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), then an exact resume under DDP."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dpft.metrics import read_metrics
from tests.synth import write_learnable_hdf5

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = (
    "import json, os, sys\n"
    "from dpft.config import compose\n"
    "from dpft.checkpoint import save_tensors\n"
    "from dpft.agents.pretrain import Pretrainer\n"
    "t = Pretrainer(compose('pretrain', json.loads(sys.argv[1])))\n"
    "try:\n"
    "    final = t.run()\n"
    "    r = t.dist.rank\n"
    "    save_tensors(os.path.join(sys.argv[2], 'rank%d_model.safetensors' % r), t.model.state_dict())\n"
    "    save_tensors(os.path.join(sys.argv[2], 'rank%d_ema.safetensors' % r), t.ema.state_dict())\n"
    "    print('FINAL', final, 'per_rank_batch', t.per_rank_batch)\n"
    "finally:\n"
    "    t.close()\n"
)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_pair(args, dump_dir, kill_at=None):
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        env.pop("DPFT_TEST_KILL_AT_STEP", None)
        if kill_at is not None:
            env["DPFT_TEST_KILL_AT_STEP"] = str(kill_at)
        procs.append(subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(args), str(dump_dir)], cwd=ROOT,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=150)
        results.append((p.returncode, out, err))
    return results


def overrides(dataset, out, *extra):
    return ["dataset=%s" % dataset, "out=%s" % out, "obs_keys=[robot0_eef_pos,object]", "++policy.mlp_dims=[32,32,32]",
            "++policy.denoising_steps=5", "++steps=12", "++batch_size=32", "++save_every=4", "++log_every=2",
            "++val_every=4", "++warmup_steps=2", "++lr=1e-3", "++num_threads=1", "++progress=false",
            "++keep_checkpoints=0", "++device=cpu"] + list(extra)


@pytest.mark.slow  # six short-lived processes: ~25 s on an idle 2-core machine, mostly `import torch`
def test_two_process_gloo_training_and_exact_resume(tmp_path):
    data = str(tmp_path / "learnable.hdf5")
    write_learnable_hdf5(data, filter_keys=True)
    ref, dump = tmp_path / "run", tmp_path / "dump"
    dump.mkdir()
    results = launch_pair(overrides(data, ref), dump)
    for rc, out, err in results:
        assert rc == 0, err
        assert "FINAL %s per_rank_batch 16" % (ref / "checkpoints" / "step_00000012") in out
    # rank 0 alone wrote: one directory per save, no leftovers, metrics once per logged step
    assert sorted(os.listdir(ref / "checkpoints")) == ["latest", "step_00000004", "step_00000008", "step_00000012"]
    assert [r["step"] for r in read_metrics(str(ref))] == [2, 4, 6, 8, 10, 12]
    ts = ref / "checkpoints" / "step_00000012" / "training_state"
    step = json.loads((ts / "step.json").read_text())
    assert step["world_size"] == 2 and step["per_rank_batch_size"] == 16 and step["num_rng_states"] == 2
    g0 = load_file(str(ts / "rng.safetensors"))["generator.train"]
    g1 = load_file(str(ts / "rng_rank1.safetensors"))["generator.train"]
    assert not torch.equal(g0, g1)  # each rank draws its own batches
    # DDP kept the replicas identical, and the checkpoint holds them
    saved = load_file(str(ref / "checkpoints" / "step_00000012" / "model.safetensors"))
    r0, r1 = load_file(str(dump / "rank0_model.safetensors")), load_file(str(dump / "rank1_model.safetensors"))
    e0, e1 = load_file(str(dump / "rank0_ema.safetensors")), load_file(str(dump / "rank1_ema.safetensors"))
    for k in saved:
        assert torch.equal(r0[k], r1[k]) and torch.equal(r0[k], saved[k]), k
        assert torch.equal(e0[k], e1[k]), k

    # kill both ranks after step 6 (checkpoint at 4), resume under DDP: identical to the uninterrupted run
    crash, dump2 = tmp_path / "crash", tmp_path / "dump2"
    dump2.mkdir()
    for rc, _, err in launch_pair(overrides(data, crash), dump2, kill_at=6):
        assert rc == -signal.SIGKILL, err
    for rc, out, err in launch_pair(overrides(data, crash, "resume=true"), dump2):
        assert rc == 0, err
    resumed = load_file(str(crash / "checkpoints" / "step_00000012" / "model.safetensors"))
    resumed_ema = load_file(str(crash / "checkpoints" / "step_00000012" / "ema.safetensors"))
    saved_ema = load_file(str(ref / "checkpoints" / "step_00000012" / "ema.safetensors"))
    for k in saved:
        assert torch.equal(resumed[k], saved[k]), k
        assert torch.equal(resumed_ema[k], saved_ema[k]), k
    assert [r["loss"] for r in read_metrics(str(crash))] == [r["loss"] for r in read_metrics(str(ref))]
