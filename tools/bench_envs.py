"""Benchmark env throughput: one robosuite env in-process vs N worker processes, and rollout overhead.

Measures, for a robosuite task (Lift by default) with low-dim observations (DPPO's obs keys, random actions in
[-1, 1]):

1. env-steps/s of ONE env stepped in this process (resets included when an episode hits its time limit);
2. aggregate env-steps/s of :class:`dpft.envs.vector.VectorEnv` with N worker processes, stepped one action chunk
   (``--act-steps``) per round trip, and the scaling ratio ``aggregate / (min(N, cores) * single)``
   (goal >= 0.8: the workers use the cores, IPC costs little);
3. the share of a policy rollout's wall time spent outside the simulator (policy inference, IPC bookkeeping)
   with a diffusion MLP policy sampling with ``--ddim-steps`` DDIM steps (goal <= 20%). Without
   ``--checkpoint`` an untrained :class:`dpft.diffusion.model.DiffusionModel` of the default size (residual
   MLP 3 x 512, 100 training steps, DDIM) is used: its timing is that of a trained one. With
   ``--checkpoint`` the checkpoint is loaded with ``dpft.load_policy`` and evaluated on its own env.

1 and 2 are measured in alternating windows (``--window`` seconds each: single env, raw step, each pool, then
again) over ``--seconds``, all envs and workers alive for the whole measurement, so machine-load drift hits
every setting alike; the scaling ratio is reported from the totals and per round (median, min, max). Measured
one after the other, the single env and the pool used to see different machine states and the ratio swung
(0.58-0.90 on the same idle machine). Prints a table and a markdown block to paste into BENCHMARKS.md.

Example usage::

    python tools/bench_envs.py                      # N = cores and 2 x cores, 30 s of 2 s windows
    python tools/bench_envs.py --workers 2 4 --seconds 60 --rollout-episodes 4
    python tools/bench_envs.py --seconds 4 --window 0.5 --rollout-episodes 0   # quick smoke run
    python tools/bench_envs.py --checkpoint runs/lift/checkpoints/step_00010000 --rollout-episodes 8
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from typing import Any, Dict, List, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_pretrain.measure

#: DPPO's low-dim observation keys (robomimic names) per robosuite task
DPPO_OBS_KEYS = {
    "transport": ["robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos",
                  "robot1_eef_pos", "robot1_eef_quat", "robot1_gripper_qpos", "object"],
}
DEFAULT_OBS_KEYS = ["robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object"]


def obs_keys_for(task: str) -> List[str]:
    return DPPO_OBS_KEYS.get(task.lower(), DEFAULT_OBS_KEYS)


def env_factory(task: str, max_episode_steps: int):
    """Picklable zero-argument factory of a low-dim robosuite env (built inside each worker)."""
    from dpft.envs.registry import EnvFactory, env_args_for_task

    return EnvFactory(env_args_for_task(task), obs_keys=obs_keys_for(task),
                      kwargs={"max_episode_steps": max_episode_steps})


class SingleEnv:
    """One env in this process, stepped one random action per call (reset when its episode ends).

    ``raw=True`` steps robosuite's own ``env.step`` on the adapter's underlying env instead (the adapter's
    overhead is the difference)."""

    def __init__(self, factory, seed: int, raw: bool = False):
        self.env = factory()
        self.rng = np.random.default_rng(seed)
        self.raw = raw
        self.env.reset(seed=seed)
        self.steps_in_episode = 0

    def __call__(self) -> int:
        a = self.rng.uniform(-1, 1, self.env.action_dim)
        if self.raw:
            self.env.env.step(a)
            self.steps_in_episode += 1
            if self.steps_in_episode >= self.env.max_episode_steps:  # the adapter's time limit, reset alike
                self.env.env.reset()
                self.steps_in_episode = 0
            return 1
        _, _, term, trunc, _ = self.env.step(a)
        if term or trunc:
            self.env.reset()
        return 1

    def close(self) -> None:
        self.env.close()


class PoolEnv:
    """A process :class:`dpft.envs.vector.VectorEnv` of ``num_envs`` workers, stepped one random action chunk
    (``act_steps`` actions per env, one IPC round trip) per call; a call returns the env steps taken."""

    def __init__(self, factory, num_envs: int, act_steps: int, seed: int):
        from dpft.envs.vector import VectorEnv

        t0 = time.perf_counter()
        self.venv = VectorEnv([factory] * num_envs, act_steps=act_steps, mode="process")
        self.startup_s = time.perf_counter() - t0
        self.num_envs, self.act_steps = num_envs, act_steps
        self.rng = np.random.default_rng(seed)
        self.venv.reset(seeds=[seed + i for i in range(num_envs)])

    def __call__(self) -> int:
        res = self.venv.step(self.rng.uniform(-1, 1, (self.num_envs, self.act_steps, self.venv.action_dim)))
        return int(res.info["steps"].sum())

    def close(self) -> None:
        self.venv.close()


def bench_alternating(factory, workers: List[int], act_steps: int, seconds: float, window: float,
                      seed: int) -> Dict[str, Any]:
    """env-steps/s of one in-process env, robosuite's raw step and each worker pool, measured in alternating
    windows (single, raw, pool N1, pool N2, single, ...) so that machine-load drift hits all of them alike.

    Returns ``{"rates": {name: env-steps/s over all windows}, "rounds": [{name: env-steps/s}],
    "scaling": {n: total pool rate / (min(n, cores) x total single rate)}, "round_scaling": {n: [per round]},
    "startup_s": {n: s}}``."""
    from bench_pretrain import measure

    cores = os.cpu_count() or 1
    runners: Dict[str, Any] = {"single": SingleEnv(factory, seed), "raw": SingleEnv(factory, seed, raw=True)}
    for n in workers:
        runners["pool%d" % n] = PoolEnv(factory, n, act_steps, seed)
    try:
        fns = list(runners.items())
        measure(fns, min(2.0, seconds / 5), min(window, 0.5), lambda: None, 1)  # warm-up (JIT, caches)
        res = measure(fns, seconds, window, lambda: None, 1)
    finally:
        for r in runners.values():
            r.close()
    rates = {k: v[0] / v[1] for k, v in res["totals"].items()}
    scaling = {n: rates["pool%d" % n] / (min(n, cores) * rates["single"]) for n in workers}
    round_scaling = {n: [r["pool%d" % n] / (min(n, cores) * r["single"]) for r in res["rates"]] for n in workers}
    return {"rates": rates, "rounds": res["rates"], "scaling": scaling, "round_scaling": round_scaling,
            "startup_s": {n: runners["pool%d" % n].startup_s for n in workers}}


def untrained_policy(obs_shapes: Dict[str, Any], obs_keys: List[str], ddim_steps: int, horizon_steps: int,
                     act_steps: int, action_dim: int):
    """A :class:`dpft.policy.Policy` (normalizer + model) around an untrained diffusion MLP of the default size
    (cfg/policy/diffusion_mlp.yaml: residual MLP 3 x 512), 100 training steps, DDIM sampling: the same
    inference cost as a trained checkpoint."""
    import torch

    from dpft.models import build_policy_model
    from dpft.normalization import MinMaxNormalizer
    from dpft.policy import Policy

    torch.manual_seed(0)
    obs_dim = int(sum(int(np.prod(obs_shapes[k])) for k in obs_keys))
    model = build_policy_model(
        {"name": "diffusion_mlp", "denoising_steps": 100, "use_ddim": True, "ddim_steps": ddim_steps,
         "mlp_dims": [512, 512, 512], "residual_style": True, "time_dim": 16},
        obs_shapes=obs_shapes, low_dim_dim=obs_dim, image_keys=[], action_dim=action_dim,
        horizon_steps=horizon_steps, cond_steps=1)
    normalizer = MinMaxNormalizer({"state": (-np.ones(obs_dim), np.ones(obs_dim)),
                                   "action": (-np.ones(action_dim), np.ones(action_dim))})
    meta = {"obs_keys": list(obs_keys), "low_dim_keys": list(obs_keys), "image_keys": [],
            "obs_shapes": {k: list(obs_shapes[k]) for k in obs_keys}, "obs_dim": obs_dim,
            "action_dim": action_dim, "horizon_steps": horizon_steps, "cond_steps": 1, "act_steps": act_steps,
            "policy": "diffusion_mlp (untrained)"}
    return Policy(model, normalizer, meta, weights="model")


def bench_rollout(args, factory, num_envs: int, obs_shapes: Dict[str, Any], action_dim: int) -> Dict[str, Any]:
    from dpft.envs.rollout import rollout, rollout_checkpoint

    if args.checkpoint:
        return rollout_checkpoint(args.checkpoint, episodes=args.rollout_episodes, num_envs=num_envs,
                                  seed=args.seed, progress=False)
    policy = untrained_policy(obs_shapes, obs_keys_for(args.task), args.ddim_steps, args.horizon_steps,
                              args.act_steps, action_dim)
    return rollout(policy, [factory] * num_envs, episodes=args.rollout_episodes, seed=args.seed,
                   progress=False, mode="process")


def main(argv: Optional[List[str]] = None) -> int:
    cores = os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="lift", help="robosuite task (lift, can, square, transport)")
    parser.add_argument("--seconds", type=float, default=30.0,
                        help="measurement time after a warm-up, shared by all settings (alternating windows)")
    parser.add_argument("--window", type=float, default=2.0, help="seconds per measurement window")
    parser.add_argument("--workers", type=int, nargs="+", default=sorted({cores, 2 * cores}),
                        help="worker counts to measure (default: cores and 2 x cores = %(default)s)")
    parser.add_argument("--act-steps", type=int, default=4, help="actions per chunk (one IPC round trip)")
    parser.add_argument("--horizon-steps", type=int, default=4, help="Ta of the untrained policy")
    parser.add_argument("--ddim-steps", type=int, default=5, help="DDIM sampling steps of the untrained policy")
    parser.add_argument("--rollout-episodes", type=int, default=cores,
                        help="episodes of the rollout measurement (0 skips it)")
    parser.add_argument("--rollout-envs", type=int, default=cores, help="worker processes of the rollout")
    parser.add_argument("--max-episode-steps", type=int, default=None,
                        help="episode length (default 200, so the rollout measurement stays short)")
    parser.add_argument("--checkpoint", default=None,
                        help="measure the rollout with this checkpoint (its own env) instead of an untrained model")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch threads of this (policy) process")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.window <= 0 or args.act_steps < 1 or any(w < 1 for w in args.workers):
        parser.error("--seconds and --window must be > 0, --act-steps and --workers >= 1")

    import torch

    torch.set_num_threads(args.torch_threads)
    max_steps = args.max_episode_steps or 200
    factory = env_factory(args.task, max_steps)
    probe = factory()
    obs_shapes = dict(probe.obs_shapes)
    action_dim = int(probe.action_dim)
    probe.close()

    alt = bench_alternating(factory, args.workers, args.act_steps, args.seconds, args.window, args.seed)
    single, raw_single = alt["rates"]["single"], alt["rates"]["raw"]
    rows = []
    for n in args.workers:
        rs = sorted(alt["round_scaling"][n])
        rows.append((n, alt["rates"]["pool%d" % n], alt["scaling"][n], alt["startup_s"][n], rs[len(rs) // 2],
                     rs[0], rs[-1]))
    roll = None
    if args.rollout_episodes > 0:
        roll = bench_rollout(args, factory, args.rollout_envs, obs_shapes, action_dim)

    import robosuite

    header = "robosuite %s, task %s low-dim (%s), %d cores, %s, python %s, torch %s" % (
        robosuite.__version__, args.task, ", ".join(obs_keys_for(args.task)), cores, platform.processor() or platform.machine(),
        platform.python_version(), torch.__version__)
    print(header)
    print("%d rounds of alternating %.1f s windows" % (len(alt["rounds"]), args.window))
    print("%-28s %14s %10s %22s %10s" % ("setup", "env-steps/s", "scaling", "per round med [min,max]",
                                         "start (s)"))
    print("%-28s %14.1f %10s %22s %10s" % ("1 env, in-process", single, "-", "-", "-"))
    print("%-28s %14.1f %10s %22s %10s" % ("  raw robosuite env.step", raw_single, "-", "-", "-"))
    for n, sps, ratio, start, med, lo, hi in rows:
        print("%-28s %14.1f %10.2f %10.2f [%.2f, %.2f] %10.1f" % (
            "%d workers (act_steps %d)" % (n, args.act_steps), sps, ratio, med, lo, hi, start))
    if roll is not None:
        print("rollout: %d episodes on %d workers, %.0f env-steps/s, %.1f%% of wall time outside the simulator "
              "(policy %.2f s, sim %.2f s, wall %.2f s after %.1f s of worker startup)" % (
                  roll["num_episodes"], roll["num_envs"], roll["env_steps_per_s"],
                  100 * roll["outside_sim_fraction"], roll["policy_time_s"], roll["sim_time_s"],
                  roll["wall_time_s"] - roll["startup_time_s"], roll["startup_time_s"]))

    print("\n```markdown")
    print("### Env throughput (`python tools/bench_envs.py %s`)\n" % " ".join(argv if argv is not None else sys.argv[1:]))
    print(header + "; %d rounds of alternating %.1f s windows (single, raw, pools), episodes of %d steps.\n"
          % (len(alt["rounds"]), args.window, max_steps))
    print("| setup | env-steps/s | scaling vs cores x single (goal >= 0.8) | per-round scaling, median [min, max] |")
    print("|---|---|---|---|")
    print("| 1 env, in-process | %.1f | - | - |" % single)
    print("| (raw robosuite `env.step` of the same env, no adapter) | %.1f | - | - |" % raw_single)
    for n, sps, ratio, _, med, lo, hi in rows:
        print("| %d worker processes, act_steps %d | %.1f | %.2f | %.2f [%.2f, %.2f] |" % (
            n, args.act_steps, sps, ratio, med, lo, hi))
    if roll is not None:
        what = ("checkpoint %s" % args.checkpoint) if args.checkpoint else (
            "an untrained diffusion MLP 3x512 (dpft Policy), %d DDIM steps, Ta %d, act_steps %d" % (
                args.ddim_steps, args.horizon_steps, args.act_steps))
        print("\nRollout with %s on %d workers: %.1f%% of wall time outside the simulator (goal <= 20%%), "
              "%.0f env-steps/s." % (what, roll["num_envs"], 100 * roll["outside_sim_fraction"],
                                     roll["env_steps_per_s"]))
    print("```")
    return 0


if __name__ == "__main__":
    sys.exit(main())
