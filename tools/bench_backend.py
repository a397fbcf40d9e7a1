"""Parity and speed of the mujoco backend against robosuite (figures for BENCHMARKS.md).

Usage::

    .venv/bin/python tools/bench_backend.py parity --tasks lift can square --seeds 3 --steps 80
    .venv/bin/python tools/bench_backend.py speed --tasks lift can square --n 1 8 32 128 --seconds 4 --rounds 2
    .venv/bin/python tools/bench_backend.py scaling --tasks lift can --n 32 --seconds 4 --rounds 3

``parity``: one-step parity along scripted-expert trajectories at noise 0, 0.3, 0.6 (max |fast - robosuite| per key,
ill-conditioned steps counted apart, reward/success mismatches), resets for seeds 0-99 (max difference), and the
scripted expert's success over seeds on each backend.
``speed``: env steps/s on one core, in alternating windows in one process: robosuite (RobosuiteEnv.step), the mujoco
backend at each N (MujocoSim.step on N envs with random actions), and raw physics (mj_step, ``nsub`` substeps per env
step, no controller) of the same model.
``scaling``: what a second core adds: two persistent worker processes each hold N envs of the mujoco backend; in
alternating windows one worker steps alone, then both step at once; scaling = (sum of both rates) / (2 x the lone
rate). It measures the ceiling of a two-process design (memory bandwidth, shared caches), not a built feature.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from dpft.envs.render import setup_rendering  # noqa: E402

setup_rendering(require=False)


def parity(args) -> None:
    from dpft.envs.experts import EXPERTS
    from dpft.envs.mujoco_backend import one_step_parity, reset_parity
    from dpft.envs.registry import make_env
    from dpft.envs.robosuite_env import default_env_args

    for task in args.tasks:
        for noise in (0.0, 0.3, 0.6):
            r = one_step_parity(task, range(args.seeds), noise, args.steps)
            keys = sorted(r["max_err"])
            print("one-step %-6s noise %.1f: %d steps, %d ill-conditioned, %d reward/success mismatches; max err: %s"
                  % (task, noise, r["steps"], r["ill"], len(r["mismatch"]),
                     ", ".join("%s %.1e" % (k.replace("robot0_", ""), r["max_err"][k]) for k in keys)), flush=True)
            if r["max_err_ill"]:
                print("   ill-conditioned steps: qpos %.1e qvel %.1e" % (r["max_err_ill"].get("qpos", 0),
                                                                        r["max_err_ill"].get("qvel", 0)))
        t0 = time.time()
        print("resets %-6s seeds 0-%d: max |fast - robosuite| = %.1e (%.0f s)"
              % (task, args.reset_seeds - 1, reset_parity(task, range(args.reset_seeds)), time.time() - t0), flush=True)
        for backend in ("robosuite", "mujoco"):
            a = default_env_args(task)
            a["env_kwargs"]["backend"] = backend
            env = make_env(a)
            wins = []
            for seed in range(args.expert_seeds):
                env.reset(seed=seed)
                ex = EXPERTS[task](noise=0.3)
                ex.reset(env, rng=np.random.default_rng(seed))
                ok = False
                for _ in range(env.max_episode_steps):
                    _, _, _, _, info = env.step(ex.act(env))
                    ok = ok or info["success"]
                    if ex.done:
                        break
                wins.append(int(ok))
            env.close()
            print("expert  %-6s noise 0.3 seeds 0-%d on %-9s: success %d/%d %s"
                  % (task, args.expert_seeds - 1, backend, sum(wins), len(wins), "".join(map(str, wins))), flush=True)


def speed(args) -> None:
    import mujoco
    from dpft.envs.mujoco_backend import MujocoSim
    from dpft.envs.robosuite_env import RobosuiteEnv, convert_legacy_env_args, default_env_args

    for task in args.tasks:
        env_args = convert_legacy_env_args(default_env_args(task))
        rs = RobosuiteEnv(env_args)
        rs.reset(seed=0)
        sim = MujocoSim(env_args)
        for _ in range(max(args.n)):
            sim.reset(sim.add_env(), 0)
        m = sim.model
        raw = mujoco.MjData(m)
        start = [sim.get_state(i) for i in range(max(args.n))]
        q0, grip = sim.q0.copy(), sim.grip.copy()

        def restart():  # every window starts from the reset states (random actions drift into odd contacts)
            for i, s in enumerate(start):
                sim.set_state(i, s)
            sim.q0[:], sim.grip[:] = q0, grip
            mujoco.mj_resetData(m, raw)
            mujoco.mj_setState(m, raw, start[0], sim._state_spec)
            rs.reset(seed=0)
        rng = np.random.default_rng(0)
        rates = {}

        def window(name, fn, per_call):
            restart()
            n = 0
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < args.seconds:
                fn()
                n += per_call
            rates.setdefault(name, []).append(n / (time.perf_counter() - t0))

        def rs_step():
            rs.step(rng.uniform(-0.3, 0.3, 7))

        def raw_step():
            for _ in range(sim.nsub):
                mujoco.mj_step(m, raw)

        def fast(n):
            idx = list(range(n))

            def go():
                sim.step(idx, rng.uniform(-0.3, 0.3, (n, 7)))
            return go

        for _ in range(args.rounds):
            window("robosuite", rs_step, 1)
            for n in args.n:
                window("mujoco N=%d" % n, fast(n), n)
            window("raw mj_step", raw_step, 1)
        base = np.mean(rates["robosuite"])
        phys = np.mean(rates["raw mj_step"])
        for name, r in rates.items():
            print("%-6s %-14s %8.0f env steps/s (windows: %s)  x%.2f robosuite  %.2f of raw physics"
                  % (task, name, np.mean(r), " ".join("%.0f" % x for x in r), np.mean(r) / base, np.mean(r) / phys),
                  flush=True)
        rs.close()


def _scaling_worker(conn, task: str, n: int) -> None:
    """Hold n envs of ``task`` on the mujoco backend; on ("run", seconds, t_start) step them from t_start for
    ``seconds`` with random actions and send back env steps/s."""
    os.environ["OMP_NUM_THREADS"] = "1"
    from dpft.envs.mujoco_backend import MujocoSim
    from dpft.envs.robosuite_env import convert_legacy_env_args, default_env_args

    sim = MujocoSim(convert_legacy_env_args(default_env_args(task)))
    idx = [sim.add_env() for _ in range(n)]
    for i in idx:
        sim.reset(i, 0)
    start = [sim.get_state(i) for i in idx]
    q0, grip = sim.q0.copy(), sim.grip.copy()
    rng = np.random.default_rng(0)
    sim.step(idx, rng.uniform(-0.3, 0.3, (n, 7)))  # compile and warm up before the first window
    conn.send("ready")
    while True:
        msg = conn.recv()
        if msg is None:
            return
        _, seconds, t_start = msg
        for i, st in zip(idx, start):
            sim.set_state(i, st)
        sim.q0[:], sim.grip[:] = q0, grip
        while time.time() < t_start:
            time.sleep(0.001)
        steps = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            sim.step(idx, rng.uniform(-0.3, 0.3, (n, 7)))
            steps += n
        conn.send(steps / (time.perf_counter() - t0))


def scaling(args) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    for task in args.tasks:
        for n in args.n:
            pipes, procs = [], []
            for _ in range(2):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_scaling_worker, args=(child, task, n), daemon=True)
                proc.start()
                pipes.append(parent)
                procs.append(proc)
            for p in pipes:
                assert p.recv() == "ready"
            lone, both = [], []
            for _ in range(args.rounds):
                t_start = time.time() + 0.2
                pipes[0].send(("run", args.seconds, t_start))
                lone.append(pipes[0].recv())
                t_start = time.time() + 0.2
                for p in pipes:
                    p.send(("run", args.seconds, t_start))
                both.append(sum(p.recv() for p in pipes))
            for p, proc in zip(pipes, procs):
                p.send(None)
                proc.join(10)
            ratio = np.mean(both) / (2 * np.mean(lone))
            print("%-6s N=%-4d one process %6.0f env steps/s (windows: %s); two processes %6.0f (windows: %s); "
                  "scaling %.2f" % (task, n, np.mean(lone), " ".join("%.0f" % x for x in lone), np.mean(both),
                                    " ".join("%.0f" % x for x in both), ratio), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["parity", "speed", "scaling"])
    ap.add_argument("--tasks", nargs="+", default=["lift", "can", "square"])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--reset-seeds", type=int, default=100)
    ap.add_argument("--expert-seeds", type=int, default=20)
    ap.add_argument("--n", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    {"parity": parity, "speed": speed, "scaling": scaling}[args.what](args)


if __name__ == "__main__":
    main()
