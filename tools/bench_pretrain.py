"""Benchmark: the pretrainer's full training step vs a bare forward/backward/AdamW loop.

The model is DPPO's robomimic-Can diffusion policy: DiffusionMLP with obs_dim 23, action_dim 7,
horizon_steps 4, mlp_dims [512, 512, 512] (residual), denoising_steps 20, batch 256. Data is a synthetic
robomimic-layout HDF5 file (50 demos x 150 steps) written to a temporary directory.

- full step: :meth:`dpft.agents.pretrain.Pretrainer.train_step`, exactly what ``dpft pretrain`` runs (batch
  sampling from the in-memory dataset, loss, backward, grad clip, AdamW, LR schedule, EMA, on-device loss
  accumulation, timing);
- bare loop: the same model, pre-sampled batch tensors, ``model.loss`` + backward + AdamW + zero_grad.

Measurement windows of the two alternate (``--window`` seconds each) so machine-load drift hits both;
samples/s are totals over all windows after a warm-up. The goal is ratio >= 0.9.

Usage::

    python tools/bench_pretrain.py --seconds 30 --threads 2 --device cpu
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from typing import Callable, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CAN_OBS = [("robot0_eef_pos", 3), ("robot0_eef_quat", 4), ("robot0_gripper_qpos", 2), ("object", 14)]  # 23


def write_can_like_hdf5(path: str, num_demos: int = 50, length: int = 150, action_dim: int = 7, seed: int = 0) -> None:
    """A robomimic-layout file with Can's low-dim shapes (random smooth data; only shapes matter here)."""
    import h5py
    import numpy as np

    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        for i in range(num_demos):
            g = data.create_group("demo_%d" % i)
            for key, d in CAN_OBS:
                g.create_dataset("obs/" + key, data=np.cumsum(rng.normal(0, 0.05, (length, d)), axis=0))
            g.create_dataset("actions", data=np.clip(rng.normal(0, 0.5, (length, action_dim)), -1, 1))
            g.attrs["num_samples"] = length
        data.attrs["total"] = num_demos * length
        data.attrs["env_args"] = '{"env_name": "PickPlaceCan", "type": 1, "env_kwargs": {}}'


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure(fns: List[Tuple[str, Callable[[], Optional[int]]]], seconds: float, window: float,
            sync: Callable[[], None], batch: int, check_every: int = 1) -> dict:
    """Alternate windows of each fn (the clock is read every ``check_every`` calls, after ``sync``).

    A call counts ``batch`` samples, or the int it returns (e.g. env steps actually taken). Returns
    ``{"totals": {name: [samples, seconds]}, "ratios": [first/second samples/s per round],
    "rates": [{name: samples/s} per round]}``."""
    totals = {name: [0, 0.0] for name, _ in fns}
    ratios, per_round = [], []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        rates = {}
        for name, fn in fns:
            sync()
            t0 = time.perf_counter()
            calls = samples = 0
            while True:
                k = fn()
                samples += batch if k is None else int(k)
                calls += 1
                if calls % check_every == 0:
                    sync()
                    if time.perf_counter() - t0 >= window:
                        break
            dt = time.perf_counter() - t0
            totals[name][0] += samples
            totals[name][1] += dt
            rates[name] = samples / dt
        if len(fns) > 1:
            ratios.append(rates[fns[0][0]] / rates[fns[1][0]])
        per_round.append(rates)
    return {"totals": totals, "ratios": ratios, "rates": per_round}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=30.0, help="measurement time after warm-up (both loops)")
    ap.add_argument("--window", type=float, default=1.0, help="seconds per alternating measurement window")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args(argv)

    import torch

    from dpft.agents.pretrain import Pretrainer
    from dpft.config import compose

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "can_like.hdf5")
        write_can_like_hdf5(path)
        overrides = [
            "dataset=" + path, "out=" + os.path.join(tmp, "run"), "policy=diffusion_mlp",
            "policy.mlp_dims=[512,512,512]", "policy.residual_style=true", "policy.denoising_steps=20",
            "obs_keys=[%s]" % ",".join(k for k, _ in CAN_OBS), "horizon_steps=4", "act_steps=4", "cond_steps=1",
            "batch_size=%d" % args.batch_size, "device=" + args.device, "steps=1000000", "log_every=1000000",
            "++progress=false",
        ]
        trainer = Pretrainer(compose("pretrain", overrides))
        device = trainer.device
        model = trainer.model
        # the same optimizer configuration as the trainer's
        bare_opt = torch.optim.AdamW(trainer.params, lr=1e-4, weight_decay=1e-6, foreach=True)
        gen = torch.Generator(device=device).manual_seed(1)
        batches = [trainer.train_ds.sample(args.batch_size, gen) for _ in range(8)]
        counter = [0]

        def bare_step() -> None:
            b = batches[counter[0] % len(batches)]
            counter[0] += 1
            loss, _ = model.loss(b, gen)
            loss.backward()
            bare_opt.step()
            bare_opt.zero_grad(set_to_none=True)

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        fns = [("full", trainer.train_step), ("bare", bare_step)]
        every = 8 if device.type == "cuda" else 1  # on CUDA the clock needs a sync; do it rarely
        measure(fns, min(5.0, args.seconds / 4), min(args.window, 0.5), sync, args.batch_size, every)  # warm-up
        res = measure(fns, args.seconds, args.window, sync, args.batch_size, every)

    tot = res["totals"]
    sps = {k: v[0] / v[1] for k, v in tot.items()}
    ratio = sps["full"] / sps["bare"]
    rs = sorted(res["ratios"])
    median = rs[len(rs) // 2]
    nparams = sum(p.numel() for p in model.parameters())
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    print("### Pretraining step throughput (tools/bench_pretrain.py)\n")
    print("- machine: %s, %d logical cores, torch %s (%d threads), Python %s, device %s"
          % (dev_name, os.cpu_count() or 0, torch.__version__, torch.get_num_threads(), platform.python_version(),
             device))
    print("- model: DiffusionMLP [512]*3 residual, obs_dim 23, action_dim 7, horizon_steps 4, denoising_steps 20, "
          "%.2fM parameters, batch %d" % (nparams / 1e6, args.batch_size))
    print("- %d rounds, each one %.1f s window of the full step then one of the bare loop\n"
          % (len(res["ratios"]), args.window))
    print("| loop | steps | samples/s |")
    print("|---|---|---|")
    print("| full train_step (sampling + fwd/bwd + clip + AdamW + LR + EMA) | %d | %.0f |"
          % (tot["full"][0] // args.batch_size, sps["full"]))
    print("| bare (pre-built batch, fwd/bwd + AdamW) | %d | %.0f |" % (tot["bare"][0] // args.batch_size, sps["bare"]))
    print("\nratio full / bare = **%.3f** (median of the per-round ratios %.3f; goal >= 0.9)" % (ratio, median))
    return 0


if __name__ == "__main__":
    sys.exit(main())
