"""Check a FurnitureBench installation on the GPU: what dpft cannot check without Isaac Gym.

Run it once after installing (README, FurnitureBench), in the Python 3.8 environment with Isaac Gym::

    python tools/furniture_check.py --task one_leg --envs 1000 --chunks 20 --json furniture_check.json

and without Isaac Gym, against dpft's CPU fake (what the test suite runs)::

    python tools/furniture_check.py --fake --envs 8 --chunks 3

Checks, each reported as ok / FAILED / skipped with its figures:

* ``imports``: Python, torch, numpy and CUDA versions; ``isaacgym.gymapi``; ``isaacgym.gymtorch`` (a JIT-built
  extension: does it build and load with this torch?) and the seconds it took; ``isaacgym.torch_utils`` (uses
  ``np.float``, removed in numpy 1.24: reported, not required, since the fork does not import it); ``ipdb`` (the fork
  imports it at module level); ankile's ``FurnitureRLSimEnv``.
* ``obstacle_pose``: the env is built with ``randomize_obstacle=False``, so the obstacle's pose in ``parts_poses`` after
  a reset must be ``dpft.envs.furniture.OBSTACLE_FRONT_NOMINAL_POSE``, the pose that
  ``tools/convert_furniture_demos.py --append-obstacle`` appends (position within 5 mm, quaternion up to sign).
* ``throughput``: env steps per second over ``--chunks`` chunks of ``--act-steps`` steps on ``--envs`` envs holding
  the end effector still, and the GPU memory in use (``torch.cuda.mem_get_info``; Isaac Gym allocates outside
  torch's allocator).
* ``partial_reset_drift``: how far the running envs' end effectors move (mm) when one env is reset: the fork's
  ``reset(env_idxs)`` runs one ``simulate()`` call on every env.
* ``nan_env``: env 0 is blown up (NaN written into a part's root state and pushed to PhysX; the fake's
  ``inject_nan``), then one chunk is stepped: does the simulator raise, do the other envs stay finite (one NaN env
  corrupting others), does dpft cut env 0's episode, and does ``reset(env_idxs)`` clear it (its observations finite
  for ``--chunks`` more chunks)?

Exit status 0 when every check that ran passed, 1 otherwise, 2 on a usage or install error (the message says what to
install). ``tools/gpu_check.sh`` calls this script.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

try:  # running as `python tools/furniture_check.py` puts tools/ (not the repo) on sys.path
    import dpft.envs  # noqa: F401
except ImportError:  # pragma: no cover - depends on how the script is launched
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Isaac Gym must be imported before torch: dpft.envs.furniture tries it as its first statement.
import dpft.envs.furniture as furniture  # noqa: E402

__all__ = ["run_checks", "main"]

POSE_TOLERANCE_M = 0.005


def _check(name: str, fn: Callable[[], Dict[str, Any]]) -> Dict[str, Any]:
    """Run one check; an exception is a failed check carrying its message."""
    t0 = time.perf_counter()
    try:
        out = fn()
    except Exception as exc:  # noqa: BLE001 - every failure is reported, not raised
        out = {"ok": False, "error": "%s: %s" % (type(exc).__name__, exc)}
    out.setdefault("ok", True)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return dict({"check": name}, **out)


def _imports(fake: bool) -> Dict[str, Any]:
    import numpy as np
    import torch

    out: Dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                           "cuda_available": bool(torch.cuda.is_available()),
                           "cuda": getattr(torch.version, "cuda", None)}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    if fake:
        out["simulator"] = "fake (dpft.envs.furniture_fake, CPU): Isaac Gym checks skipped"
        return out
    ok = True
    for key, stmt in (("isaacgym.gymapi", "from isaacgym import gymapi"),
                      ("isaacgym.gymtorch", "from isaacgym import gymtorch"),
                      ("isaacgym.torch_utils", "from isaacgym import torch_utils"),
                      ("ipdb", "import ipdb"),
                      ("furniture_rl_sim_env", "from furniture_bench.envs.furniture_rl_sim_env import FurnitureRLSimEnv")):
        t0 = time.perf_counter()
        try:
            exec(stmt, {})
            out[key] = "ok (%.1f s)" % (time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001
            out[key] = "FAILED: %s: %s" % (type(exc).__name__, exc)
            if key != "isaacgym.torch_utils":  # np.float with numpy >= 1.24: only user code importing it needs it
                ok = False
    out["ok"] = ok
    return out


def _hold_chunk(env: Any, obs: Dict[str, Any]) -> Any:
    """``(N, act_steps, 10)``: command every env's current end-effector pose with the gripper open."""
    import torch

    state = torch.as_tensor(obs["robot_state"])[:, -1].float()  # (N, 16): pos 3, rot6d 6, ...
    action = torch.cat([state[:, :9], -torch.ones(state.shape[0], 1)], dim=-1)
    return action[:, None].repeat(1, env.act_steps, 1)


def _obstacle_pose(env: Any, obs: Dict[str, Any]) -> Dict[str, Any]:
    import numpy as np

    got = np.asarray(obs["parts_poses"])[:, -1, -7:].astype(np.float64)  # (N, 7)
    want = np.asarray(furniture.OBSTACLE_FRONT_NOMINAL_POSE)
    pos_err = float(np.abs(got[:, :3] - want[:3]).max())
    quat_err = float(np.minimum(np.abs(got[:, 3:] - want[3:]).max(axis=1),
                                np.abs(got[:, 3:] + want[3:]).max(axis=1)).max())
    return {"ok": pos_err <= POSE_TOLERANCE_M and quat_err <= 0.01, "observed_env0": [round(float(v), 5) for v in got[0]],
            "nominal": list(want), "max_position_error_m": pos_err, "max_quat_error": quat_err}


def _gpu_memory() -> Optional[float]:
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return round((total - free) / 2 ** 30, 2)


def _throughput(env: Any, obs: Dict[str, Any], chunks: int) -> Dict[str, Any]:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    steps = 0
    for _ in range(chunks):
        res = env.step(_hold_chunk(env, obs))
        obs = res.obs
        steps += int(res.info["steps"].sum())
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"envs": env.num_envs, "env_steps": steps, "env_steps_per_s": round(steps / max(dt, 1e-9), 1),
            "gpu_memory_used_gib": _gpu_memory(), "nan_resets": int(env.nan_resets_total), "_obs": obs}


def _partial_reset_drift(env: Any) -> Dict[str, Any]:
    import torch

    if env.num_envs < 2:
        return {"ok": None, "skipped": "needs >= 2 envs"}
    sim = env.sim_env
    before = env._process(sim.get_observation())["robot_state"][:, :3].clone()
    after = env._process(sim.reset(torch.tensor([0], dtype=torch.int32, device=env.device)))["robot_state"][:, :3]
    drift = (after[1:] - before[1:]).norm(dim=-1)
    return {"running_envs_mean_drift_mm": round(float(drift.mean()) * 1000, 4),
            "running_envs_max_drift_mm": round(float(drift.max()) * 1000, 4)}


def _corrupt_env0(env: Any, fake: bool) -> str:
    """Blow env 0 up: NaN in its first part's root state, pushed to PhysX (the fake: ``inject_nan``)."""
    sim = env.sim_env
    if fake:
        sim.inject_nan([0], at_step=sim.total_steps + 1)
        return "fake inject_nan"
    from isaacgym import gymtorch

    root = sim.root_tensor.view(sim.num_envs, -1, 13)
    part = sim.parts_idx_list[0] if hasattr(sim, "parts_idx_list") else 0
    root[0, part, :] = float("nan")
    actors = sim.actor_idx_by_env[0:1].reshape(-1).to(dtype=__import__("torch").int32)
    sim.isaac_gym.set_actor_root_state_tensor_indexed(sim.sim, gymtorch.unwrap_tensor(sim.root_tensor),
                                                      gymtorch.unwrap_tensor(actors), len(actors))
    return "NaN root state of part %s in env 0 (set_actor_root_state_tensor_indexed)" % (part,)


def _nan_env(env: Any, obs: Dict[str, Any], fake: bool, chunks: int) -> Dict[str, Any]:
    import numpy as np
    import torch

    how = _corrupt_env0(env, fake)
    out: Dict[str, Any] = {"injected": how}
    try:
        res = env.step(_hold_chunk(env, obs))
    except Exception as exc:  # noqa: BLE001 - e.g. torch.inverse on NaN inside the fork's reward
        out.update(ok=False, simulator_raised="%s: %s" % (type(exc).__name__, exc))
        return out
    raw = env._process(env.sim_env.get_observation())  # after dpft's reset of env 0
    others = torch.cat([v[1:] for v in raw.values()], dim=-1)
    out["cut_env0"] = bool(res.info["nan_resets"][0])
    out["other_envs_cut"] = int(np.asarray(res.info["nan_resets"])[1:].sum())
    out["other_envs_finite"] = bool(torch.isfinite(others).all())
    out["env0_finite_after_reset"] = bool(all(torch.isfinite(v[0]).all() for v in raw.values()))
    out["nan_reset_retries"] = int(res.info["nan_reset_retries"])
    out["nan_unrecovered"] = int(res.info["nan_unrecovered"])
    obs = res.obs
    later_nan = 0
    for _ in range(chunks):
        res = env.step(_hold_chunk(env, obs))
        obs = res.obs
        later_nan += int(np.asarray(res.info["nan_resets"]).sum())
    out["nan_episodes_in_later_chunks"] = later_nan
    out["ok"] = (out["cut_env0"] and out["other_envs_cut"] == 0 and out["other_envs_finite"]
                 and out["env0_finite_after_reset"] and out["nan_unrecovered"] == 0 and later_nan == 0)
    return out


def run_checks(task: str = "one_leg", envs: int = 1000, chunks: int = 20, act_steps: int = 8, fake: bool = False,
               device: str = "cuda:0", randomness: str = "low") -> List[Dict[str, Any]]:
    """Run every check; returns one dict per check (``check``, ``ok``: True / False / None = skipped, figures)."""
    report = [_check("imports", lambda: _imports(fake))]
    if not report[0]["ok"]:
        return report
    if fake:
        from dpft.envs.furniture_fake import FakeFurnitureRLSimEnv

        base_cls, device = FakeFurnitureRLSimEnv, "cpu"
    else:
        base_cls = furniture._load_fork_env_class()

    def env_cls(*args: Any, **kwargs: Any) -> Any:  # the nominal obstacle pose: no random offset
        kwargs["randomize_obstacle"] = False
        return base_cls(*args, **kwargs)

    state: Dict[str, Any] = {}

    def build() -> Dict[str, Any]:
        t0 = time.perf_counter()
        env = furniture.make_furniture_env(task, randomness=randomness, num_envs=envs, act_steps=act_steps,
                                           device=device, env_cls=env_cls)
        state["env"] = env
        state["obs"] = env.reset(seeds=[0] * envs)
        return {"task": task, "randomness": randomness, "envs": envs, "build_and_reset_s": round(time.perf_counter() - t0, 2),
                "gpu_memory_used_gib": _gpu_memory()}

    report.append(_check("build", build))
    if not report[-1]["ok"]:
        return report
    env = state["env"]
    try:
        report.append(_check("obstacle_pose", lambda: _obstacle_pose(env, state["obs"])))
        thr = _check("throughput", lambda: _throughput(env, state["obs"], chunks))
        state["obs"] = thr.pop("_obs", state["obs"])
        report.append(thr)
        report.append(_check("partial_reset_drift", lambda: _partial_reset_drift(env)))
        state["obs"] = env.reset(seeds=[1] * envs)
        report.append(_check("nan_env", lambda: _nan_env(env, state["obs"], fake, chunks)))
    finally:
        env.close()
    return report


def _format(report: Sequence[Dict[str, Any]]) -> str:
    lines = []
    for r in report:
        status = {True: "ok", False: "FAILED", None: "skipped"}[r["ok"]]
        figures = ", ".join("%s=%s" % (k, v) for k, v in r.items() if k not in ("check", "ok"))
        lines.append("%-20s %-7s %s" % (r["check"], status, figures))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Check a FurnitureBench (Isaac Gym + ankile's fork) installation: "
                                                 "imports, obstacle pose, throughput, partial-reset drift, NaN envs.")
    parser.add_argument("--task", default="one_leg", choices=sorted(furniture.TASKS))
    parser.add_argument("--randomness", default="low", choices=("low", "med", "high"))
    parser.add_argument("--envs", type=int, default=1000, help="parallel envs (default 1000, DPPO's)")
    parser.add_argument("--chunks", type=int, default=20, help="chunks timed for the throughput (default 20)")
    parser.add_argument("--act-steps", type=int, default=8)
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--fake", action="store_true", help="run against dpft's CPU fake (no Isaac Gym)")
    parser.add_argument("--json", default=None, help="also write the report to this JSON file")
    args = parser.parse_args(argv)
    if args.envs < 1 or args.chunks < 1 or args.act_steps < 1:
        print("error: --envs, --chunks and --act-steps must be >= 1", file=sys.stderr)
        return 2
    try:
        report = run_checks(args.task, args.envs, args.chunks, args.act_steps, args.fake, args.device, args.randomness)
    except furniture.DpftError as exc:
        print("error: %s" % exc, file=sys.stderr)
        return 2
    print(_format(report))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o))
    return 0 if all(r["ok"] is not False for r in report) else 1


if __name__ == "__main__":
    sys.exit(main())
