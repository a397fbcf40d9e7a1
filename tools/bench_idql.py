"""IDQL candidate sampling time: N chunks per observation in one batched call vs N sequential single samples.

    python tools/bench_idql.py [--envs 50] [--n 1 16 64] [--repeats 3] [--threads 2] [--json out.json]

DPPO's Can size (``rl_recipes.md`` 1.5): obs 23, action 7, horizon 4, DiffusionMLP [512]*3 (time 16, Mish,
residual), DDPM 20 steps, made fine-tunable over the whole chain as IDQL's actor; 50 envs. For each N:

- ``batched``: ``actor.sample(obs, num_samples=N)`` (each obs encoded once, 50*N rows per denoising step);
- ``sequential``: N calls of ``actor.sample(obs)`` (50 rows each), the loop IDQL implementations without
  batched candidates run;
- ``select``: :meth:`dpft.rl.idql.IDQLActorCritic.select_actions` (batched sampling + target twin Q scoring
  [256]*3 + argmax), what one env step of ``dpft finetune agent=idql`` costs in inference.

Medians over ``repeats`` alternated runs (batched, sequential, select, batched, ...) after one warm-up each,
seconds per call of 50 observations. CPU, ``torch.set_num_threads(threads)``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Dict, List

import torch


def build(obs_dim: int = 23, action_dim: int = 7, horizon: int = 4):
    from dpft.models import build_policy_model
    from dpft.rl.idql import IDQLActorCritic, make_idql_actor

    torch.manual_seed(0)
    spec = {"name": "diffusion_mlp", "mlp_dims": [512, 512, 512], "time_dim": 16, "denoising_steps": 20,
            "randn_clip_value": 3.0}
    model = build_policy_model(spec, {"state": (obs_dim,)}, obs_dim, [], action_dim, horizon, 1)
    actor = make_idql_actor(model).eval()
    return IDQLActorCritic(actor, obs_dim, horizon, critic_dims=(256, 256, 256)).eval()


def bench(envs: int, ns: List[int], repeats: int) -> Dict[str, Dict[str, float]]:
    ac = build()
    obs = {"state": torch.rand(envs, 1, 23) * 2 - 1}
    actor = ac.actor
    gen = torch.Generator().manual_seed(1)

    def batched(n):
        actor.sample(obs, generator=gen, num_samples=n)

    def sequential(n):
        for _ in range(n):
            actor.sample(obs, generator=gen)

    def select(n):
        ac.select_actions(obs, n, rule="argmax", generator=gen)

    out = {}
    with torch.no_grad():
        for n in ns:
            fns = {"batched": batched, "sequential": sequential, "select": select}
            times = {k: [] for k in fns}  # type: Dict[str, List[float]]
            for f in fns.values():
                f(n)  # warm-up
            for _ in range(repeats):
                for k, f in fns.items():
                    t0 = time.perf_counter()
                    f(n)
                    times[k].append(time.perf_counter() - t0)
            row = {k: statistics.median(v) for k, v in times.items()}
            row["speedup"] = row["sequential"] / row["batched"]
            out[str(n)] = row
            print("N=%3d  batched %.4f s  sequential %.4f s  (x%.1f)  select_actions %.4f s"
                  % (n, row["batched"], row["sequential"], row["speedup"], row["select"]), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--envs", type=int, default=50)
    p.add_argument("--n", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    res = {"envs": args.envs, "threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
           "results": bench(args.envs, args.n, args.repeats)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
