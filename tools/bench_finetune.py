"""Fine-tuning benchmarks.

Section ``sampling`` (issue 7, figure 1): action sampling with chain recording, as DPPO's collector does it,
at DPPO's robomimic Can size (obs 23, action 7, horizon 4, cond_steps 1, residual Mish MLP [512, 512, 512],
time embedding 16), for 50 envs and 1 env, DDPM 20 steps with the last 10 fine-tuned and DDIM 5 of 100
steps with all 5 fine-tuned. Each case is timed side by side with a bare loop of the same network calls
(one observation encoding, then ``network(x, t, cond)`` for the frozen base steps and ``ft_network`` for the
fine-tuned ones, on a fixed input): the bare loop is the floor, anything above it is the
sampler's own overhead. Windows alternate between the variants (A/B/A/B...) and the medians are reported
(with the fastest window, the least disturbed by other processes), because a shared machine drifts.

    .venv/bin/python tools/bench_finetune.py sampling            # 2 threads, 7 windows, JSON to stdout
    .venv/bin/python tools/bench_finetune.py sampling --windows 5 --threads 2 --out result.json
    .venv/bin/python tools/bench_finetune.py floor --threads 1    # what the 1-env floor is made of

Variants per case: ``bare`` (the network calls only), ``sample`` (``sample(return_chain=True)``), and
``sample_logp`` (``sample(return_chain=True, return_log_prob=True)``: chain plus the old log-probs PPO needs,
when the model supports it). ``ratio`` is ``sample / bare``. Goals (issue 7): ratio <= 1.1 at 50 envs and
<= 2 ms per chunk at 1 env.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os

# numpy's OpenBLAS spins up one thread per core for a 512x512 GEMV; the floor section compares single-threaded
# BLAS calls (set before numpy is first imported, below by torch)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

CAN = {"obs_dim": 23, "action_dim": 7, "horizon_steps": 4, "cond_steps": 1, "mlp_dims": [512, 512, 512]}
CASES = [
    {"name": "ddpm20_ft10", "denoising_steps": 20, "use_ddim": False, "ddim_steps": None, "ft": 10},
    {"name": "ddim5_ft5", "denoising_steps": 100, "use_ddim": True, "ddim_steps": 5, "ft": 5},
]


def build_can_model(case: Dict) -> torch.nn.Module:
    from dpft.models import build_policy_model

    torch.manual_seed(0)
    cfg = {"name": "diffusion_mlp", "mlp_dims": CAN["mlp_dims"], "residual_style": True, "activation": "mish",
           "time_dim": 16, "denoising_steps": case["denoising_steps"], "use_ddim": case["use_ddim"],
           "ddim_steps": case["ddim_steps"], "ft_denoising_steps": case["ft"], "randn_clip_value": 3.0}
    model = build_policy_model(cfg, {}, CAN["obs_dim"], [], CAN["action_dim"], CAN["horizon_steps"],
                               CAN["cond_steps"])
    return model.eval()


def bare_loop(model, obs: Dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    """The network calls of one sampled chunk and nothing else."""
    n = model.num_sampling_steps
    first_ft = n - model.ft_denoising_steps
    b = obs["state"].shape[0]
    ts = [model.schedule.timesteps[i].expand(b) for i in range(n)]
    nets = [model.ft_network if i >= first_ft else model.network for i in range(n)]
    shape = (b, model.horizon_steps, model.action_dim)

    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))

    def run() -> torch.Tensor:
        # the same input every step: feeding the output back would let values drift to sizes (and
        # denormals) a real chain never sees
        with torch.no_grad():
            cond = model.obs_encoder(obs)
            for i in range(n):
                out = nets[i](x, ts[i], cond)
        return out

    return run


def sampler(model, obs: Dict[str, torch.Tensor], log_prob: bool) -> Callable[[], object]:
    gen = torch.Generator().manual_seed(0)
    kw = {"return_chain": True}
    if log_prob:
        kw["return_log_prob"] = True

    def run():
        return model.sample(obs, deterministic=False, generator=gen, **kw)

    return run


def count_ops(fn: Callable[[], object]) -> int:
    """ATen operator calls of one call of ``fn`` (after a warm-up call): a load-independent cost figure."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counter.n += 1
            return func(*args, **(kwargs or {}))

    fn()
    with Counter():
        fn()
    return Counter.n


def time_window(fn: Callable[[], object], min_time: float) -> float:
    """Seconds per call over at least ``min_time`` seconds (after one warm-up call)."""
    fn()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time and calls >= 3:
            return elapsed / calls


def bench_sampling(windows: int, min_time: float, envs: List[int]) -> Dict:
    supports_logp = "return_log_prob" in inspect.signature(build_can_model(CASES[1]).sample).parameters
    results = []
    for case in CASES:
        model = build_can_model(case)
        for b in envs:
            obs = {"state": torch.rand(b, CAN["cond_steps"], CAN["obs_dim"],
                                       generator=torch.Generator().manual_seed(1)) * 2 - 1}
            variants = {"bare": bare_loop(model, obs), "sample": sampler(model, obs, False)}
            if supports_logp:
                variants["sample_logp"] = sampler(model, obs, True)
            times = {k: [] for k in variants}  # type: Dict[str, List[float]]
            for _ in range(windows):  # A/B/A/B: every window times each variant once
                for k, fn in variants.items():
                    times[k].append(time_window(fn, min_time))
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            row = {"case": case["name"], "envs": b, "ms_per_chunk": {k: round(v, 3) for k, v in med.items()},
                   "min_ms_per_chunk": {k: round(min(v) * 1e3, 3) for k, v in times.items()},
                   "ratio_sample_over_bare": round(med["sample"] / med["bare"], 3),
                   "windows_ms": {k: [round(t * 1e3, 3) for t in v] for k, v in times.items()}}
            row["aten_ops_per_chunk"] = {k: count_ops(fn) for k, fn in variants.items()}
            if "sample_logp" in med:
                row["ratio_sample_logp_over_bare"] = round(med["sample_logp"] / med["bare"], 3)
            results.append(row)
            print("%-12s envs=%-3d bare %7.3f ms  sample %7.3f ms (x%.3f)%s" % (
                case["name"], b, med["bare"], med["sample"], med["sample"] / med["bare"],
                ("  sample+logp %7.3f ms (x%.3f)" % (med["sample_logp"], med["sample_logp"] / med["bare"]))
                if "sample_logp" in med else ""), file=sys.stderr)
    return {"section": "sampling", "threads": torch.get_num_threads(), "windows": windows,
            "min_window_s": min_time, "torch": torch.__version__, "model": CAN, "results": results}


def bench_floor(windows: int, min_time: float) -> Dict:
    """Where the 1-env floor comes from: one network call of the Can-size model at batch 1 (DDPM case), and one
    512x512 linear layer at batch 1 (the five hidden ones dominate the call), through torch (its BLAS, MKL in the
    CPU wheels) beside numpy's BLAS (OpenBLAS in the numpy wheels, one thread) on the same weights. Alternated
    windows, medians in microseconds."""
    import numpy as np

    model = build_can_model(CASES[0])
    obs = {"state": torch.zeros(1, CAN["cond_steps"], CAN["obs_dim"])}
    x = torch.randn(1, model.horizon_steps, model.action_dim, generator=torch.Generator().manual_seed(2))
    t = model.schedule.timesteps[0].expand(1)
    lin = torch.nn.Linear(512, 512)
    v = torch.randn(1, 512, generator=torch.Generator().manual_seed(3))
    w_np, b_np, v_np = lin.weight.detach().numpy(), lin.bias.detach().numpy(), v[0].numpy()
    with torch.no_grad():
        cond = model.obs_encoder(obs)
        variants = {"network_call": lambda: model.network(x, t, cond), "torch_linear_512": lambda: lin(v),
                    "numpy_gemv_512": lambda: w_np @ v_np + b_np}
        times = {k: [] for k in variants}  # type: Dict[str, List[float]]
        for _ in range(windows):
            for k, fn in variants.items():
                times[k].append(time_window(fn, min_time))
    med = {k: round(statistics.median(v) * 1e6, 1) for k, v in times.items()}
    hidden = sum(1 for m in model.network.modules() if isinstance(m, torch.nn.Linear) and m.in_features == 512
                 and m.out_features == 512)
    return {"section": "floor", "threads": torch.get_num_threads(), "windows": windows, "torch": torch.__version__,
            "numpy": np.__version__, "us_median": med, "hidden_512x512_linears_per_call": hidden,
            "torch_blas": "mkl" if torch.backends.mkl.is_available() else "other"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="section", required=True)
    p = sub.add_parser("sampling", help="chain sampling vs the bare network calls (DPPO Can size)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--windows", type=int, default=7)
    p.add_argument("--min-time", type=float, default=0.3, help="seconds per timing window")
    p.add_argument("--envs", type=int, nargs="+", default=[50, 1])
    p.add_argument("--out", default=None, help="also write the JSON here")
    f = sub.add_parser("floor", help="batch-1 network call and 512x512 linear: torch's BLAS vs numpy's")
    f.add_argument("--threads", type=int, default=1)
    f.add_argument("--windows", type=int, default=7)
    f.add_argument("--min-time", type=float, default=0.3, help="seconds per timing window")
    f.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.section == "floor":
        result = bench_floor(args.windows, args.min_time)
    else:
        result = bench_sampling(args.windows, args.min_time, args.envs)
    text = json.dumps(result, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
