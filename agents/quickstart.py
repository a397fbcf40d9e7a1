"""``dpft quickstart``: scripted Lift demonstrations -> diffusion-policy pretraining -> rollout with video.

The whole pipeline on the built-in default data, sized to finish in a few minutes on 2 CPU cores. Each
stage is the library call a user would make from Python, and each is skipped when its output is already
complete, so re-running resumes instead of starting over:

1. :func:`dpft.envs.demos.make_demos` writes ``OUT/lift_demos.hdf5`` (scripted robosuite expert);
2. :func:`dpft.agents.pretrain.pretrain` trains a DDPM MLP diffusion policy into ``OUT/run`` (resumes a killed run);
3. :func:`dpft.envs.rollout.rollout_checkpoint` rolls the EMA weights out in Lift and writes ``OUT/rollout``
   (``result.json`` and MP4 videos).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List

from dpft.errors import DpftError

DEFAULTS: Dict[str, Any] = {
    "out": "runs/quickstart",
    "demos": 100,
    "noise": 0.0,
    "steps": 10000,
    "episodes": 20,
    "envs": 0,
    "videos": 2,
    "seed": 0,
    "device": "auto",
}

QUICKSTART_HELP = """Run demos -> pretrain -> rollout on robosuite Lift in one command.

Usage: dpft quickstart [key=value ...]

Options (default):
  out=runs/quickstart   output directory (demos, run, rollout)
  demos=100             scripted-expert demonstrations to generate
  noise=0.0             demo imperfection level (see dpft demos --help)
  steps=10000           pretraining optimizer steps
  episodes=20           evaluation episodes
  envs=0                parallel environments (0 = min(episodes, CPU cores))
  videos=2              episodes to record as MP4
  seed=0                seed for demos, training and evaluation
  device=auto           cpu | cuda | auto

Stages whose output is already complete are skipped, so re-running continues a killed quickstart."""

# The pretraining recipe of the quickstart (a small DPPO-style MLP diffusion policy on Lift low-dim obs).
PRETRAIN_OVERRIDES: List[str] = [
    "policy=diffusion_mlp",
    "policy.mlp_dims=[256,256,256]",
    "policy.denoising_steps=20",
    "horizon_steps=8",
    "act_steps=8",
    "cond_steps=1",
    "batch_size=256",
    "lr=3e-4",
    "warmup_steps=200",
    "val_every=500",
    "log_every=50",
]


def parse_quickstart_args(args: List[str]) -> Dict[str, Any]:
    """``key=value`` strings -> keyword arguments of :func:`quickstart` (typed like the defaults)."""
    kwargs: Dict[str, Any] = {}
    for arg in args:
        if "=" not in arg:
            raise DpftError(f"quickstart option {arg!r} is not key=value (see dpft quickstart --help).")
        key, value = arg.split("=", 1)
        if key not in DEFAULTS:
            raise DpftError(f"quickstart option {key!r} is unknown; options: {', '.join(DEFAULTS)}.")
        default = DEFAULTS[key]
        try:
            kwargs[key] = type(default)(value) if not isinstance(default, str) else value
        except ValueError:
            raise DpftError(f"quickstart option {key}={value!r}: expected a {type(default).__name__}.") from None
    return kwargs


def _complete_checkpoint_step(run_dir: str) -> int:
    from dpft.checkpoint import find_latest, read_json

    latest = find_latest(run_dir)
    if latest is None:
        return -1
    return int(read_json(os.path.join(latest, "meta.json")).get("step", -1))


def quickstart(out: str = DEFAULTS["out"], demos: int = DEFAULTS["demos"], noise: float = DEFAULTS["noise"],
               steps: int = DEFAULTS["steps"], episodes: int = DEFAULTS["episodes"], envs: int = DEFAULTS["envs"],
               videos: int = DEFAULTS["videos"], seed: int = DEFAULTS["seed"],
               device: str = DEFAULTS["device"]) -> Dict[str, Any]:
    """Run the three stages and return the rollout result (a dict, also in ``OUT/rollout/result.json``)."""
    import time

    from dpft.agents.pretrain import pretrain
    from dpft.config import compose
    from dpft.envs.demos import make_demos
    from dpft.envs.rollout import rollout_checkpoint

    t0 = time.time()
    os.makedirs(out, exist_ok=True)
    data = os.path.join(out, "lift_demos.hdf5")
    run = os.path.join(out, "run")
    if os.path.exists(data):
        print(f"[1/3] demonstrations: reusing {data}")
    else:
        print(f"[1/3] demonstrations: {demos} scripted Lift demos -> {data}")
        make_demos(task="lift", num=demos, out=data, seed=seed, noise=noise)
    done_step = _complete_checkpoint_step(run) if os.path.isdir(run) else -1
    if done_step >= steps:
        print(f"[2/3] pretraining: reusing {run} (step {done_step})")
    else:
        overrides = PRETRAIN_OVERRIDES + [f"dataset={data}", f"out={run}", f"steps={steps}", f"seed={seed}",
                                          f"device={device}", f"save_every={max(steps // 3, 1)}"]
        if done_step >= 0:
            overrides.append("resume=true")
        print(f"[2/3] pretraining: {steps} steps -> {run}")
        pretrain(compose("pretrain", overrides))
    print(f"[3/3] rollout: {episodes} Lift episodes with the EMA weights")
    rollout_dir = os.path.join(out, "rollout")
    result = rollout_checkpoint(run, episodes=episodes, num_envs=envs or None, seed=100000 + seed, video=videos,
                                out_dir=rollout_dir, weights="ema", device="cpu",
                                env_options={"terminate_on_success": True})
    video_paths = [os.path.abspath(os.path.join(rollout_dir, ep["video"]))
                   for ep in result.get("episodes", []) if ep.get("video")]
    print(f"quickstart done in {time.time() - t0:.0f} s: Lift success rate {result['success_rate']:.0%} "
          f"over {episodes} episodes")
    for path in video_paths:
        print(f"video: {path}")
    return result
