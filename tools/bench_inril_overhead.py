"""Wall time per iteration of IN-RIL / CAIR vs RL only (DPPO on Hopper, synthetic demos, CPU).

    OMP_NUM_THREADS=1 python tools/bench_inril_overhead.py --reps 5 --batch-size 500 --envs 4

Every configuration gets its own Finetuner on the same checkpoint; the repetitions alternate configurations
(collect ``n_steps`` chunks, then ``agent.update``), so background load hits them alike. Reported: medians of the
iteration (collect + update) and of the update alone, and their ratios to RL only (``inril.monitor_every=0``:
no plug-in). The checkpoint is a tiny diffusion MLP pretrained for a few steps on random 11-D / 3-D demos
(the numbers measure cost, not learning).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests.synth

CONFIGS = {"rl_only": ["inril.monitor_every=0"], "rl_monitor10": ["inril.monitor_every=10"],
           "inril_m5_pcgrad": ["inril.m=5", "inril.separation=pcgrad"], "inril_m1": ["inril.m=1"],
           "adaptive_upgrad": ["inril.m=adaptive", "inril.separation=upgrad"], "cair": ["cair=true"]}


def _checkpoint(work: str) -> str:
    from dpft.agents.pretrain import pretrain
    from dpft.config import compose
    from dpft.envs.gym_env import default_gym_env_args
    from tests.synth import write_demos_hdf5

    rng = np.random.default_rng(0)
    demos = {"demo_%d" % i: {"obs": {"obs": rng.normal(size=(100, 11))}, "actions": rng.uniform(-0.8, 0.8, (100, 3))}
             for i in range(20)}
    path = os.path.join(work, "synth.hdf5")
    write_demos_hdf5(path, demos, env_args=default_gym_env_args("hopper"))
    out = os.path.join(work, "pre")
    pretrain(compose("pretrain", ["dataset=" + path, "out=" + out, "steps=20", "batch_size=64", "save_every=20",
                                  "val_every=0", "progress=false", "num_threads=1", "warmup_steps=1", "obs_keys=[obs]",
                                  "policy.mlp_dims=[128,128,128]", "policy.denoising_steps=10", "horizon_steps=4",
                                  "act_steps=4"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=500, help="PPO minibatch ((env step, denoising step) pairs)")
    ap.add_argument("--envs", type=int, default=4)
    ap.add_argument("--n-steps", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from dpft.agents.finetune import Finetuner
    from dpft.cli import _with_preset
    from dpft.config import compose

    work = tempfile.mkdtemp(prefix="bench_inril_")
    try:
        ckpt = _checkpoint(work)
        ft = ["agent=dppo", "checkpoint=" + ckpt, "envs=%d" % args.envs, "n_steps=%d" % args.n_steps, "eval_every=0",
              "progress=false", "max_episode_steps=200", "agent.ft_denoising_steps=10", "agent.update_epochs=5",
              "agent.batch_size=%d" % args.batch_size, "agent.target_kl=null", "agent.critic_dims=[64,64,64]",
              "num_threads=1"]
        trainers = {k: Finetuner(compose("finetune", _with_preset(["out=" + os.path.join(work, k)] + ft + v)))
                    for k, v in CONFIGS.items()}
        it_t = {k: [] for k in CONFIGS}
        up_t = {k: [] for k in CONFIGS}
        steps = {}
        for _ in range(args.reps):
            for k, t in trainers.items():
                t.collector.reset([10 ** 9 + i for i in range(t.env.num_envs)])
                t0 = time.perf_counter()
                ro = t.collector.collect(args.n_steps)
                t1 = time.perf_counter()
                steps[k] = t.agent.update(ro)["grad_steps"]
                t2 = time.perf_counter()
                it_t[k].append(t2 - t0)
                up_t[k].append(t2 - t1)
        bi, bu = np.median(it_t["rl_only"]), np.median(up_t["rl_only"])
        print("envs %d x n_steps %d, K'=10, minibatch %d, %d RL steps/iteration, IL batch 256, %d reps"
              % (args.envs, args.n_steps, args.batch_size, steps["rl_only"], args.reps))
        print("%-16s %12s %7s %12s %7s" % ("config", "iteration s", "ratio", "update s", "ratio"))
        for k in CONFIGS:
            print("%-16s %12.3f %7.3f %12.3f %7.3f" % (k, np.median(it_t[k]), np.median(it_t[k]) / bi,
                                                      np.median(up_t[k]), np.median(up_t[k]) / bu))
        for t in trainers.values():
            t.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
