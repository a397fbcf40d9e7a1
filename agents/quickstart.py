"""``dpft quickstart``: scripted Lift demonstrations -> diffusion-policy pretraining -> rollout -> DPPO
fine-tuning -> rollout again, with videos.

The whole pipeline on the built-in default data, sized to finish within 15 minutes on 2 CPU cores. The
demonstrations are few and noisy and the pretraining short, so the pretrained policy is deliberately weak and
the gain from RL fine-tuning is visible. Each stage is the library call a user would make from Python, and each
is skipped when its output is already complete for the same inputs, so re-running resumes instead of starting
over:

1. :func:`dpft.envs.demos.make_demos` writes ``OUT/lift_demos.hdf5`` (scripted robosuite expert);
2. :func:`dpft.agents.pretrain.pretrain` trains a DDPM MLP diffusion policy into ``OUT/run`` (resumes a killed run);
3. :func:`dpft.envs.rollout.rollout_checkpoint` rolls the EMA weights out in Lift and writes ``OUT/rollout``
   (``result.json`` and MP4 videos);
4. :func:`dpft.agents.finetune.finetune` fine-tunes the checkpoint with DPPO into ``OUT/finetune``
   (``finetune=0`` skips stages 4 and 5);
5. the fine-tuned policy is rolled out on the same episodes into ``OUT/rollout_finetuned``; the success rates
   before and after are printed side by side.

``OUT`` is a run directory (:mod:`dpft.rundir`, kind ``quickstart``: locked while it runs, a foreign directory is
refused) and ``OUT/stages.json`` records each stage's inputs. A stage is skipped only when it completed with the
same inputs (its options and the checksum of the previous stage's output): a changed ``demos=`` regenerates the
demonstrations, retrains and re-evaluates; a changed ``episodes=`` only re-evaluates (the old rollout folder,
videos included, is removed first); a killed pretraining with unchanged inputs resumes.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List

from dpft.errors import DpftError

DEFAULTS: Dict[str, Any] = {
    "out": "runs/quickstart",
    "demos": 20,
    "noise": 0.5,
    "steps": 800,
    "finetune": 15,
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
  demos=20              scripted-expert demonstrations to generate (few and noisy: a weak policy)
  noise=0.5             demo imperfection level (see dpft demos --help)
  steps=800             pretraining optimizer steps (short on purpose)
  finetune=15           DPPO fine-tuning iterations (0 = stop after the first rollout)
  episodes=20           evaluation episodes
  envs=0                parallel environments of the rollouts (0 = 4, as fine-tuning; the count changes the
                        sampling noise, so the numbers are comparable only with the same count)
  videos=2              episodes to record as MP4
  seed=0                seed for demos, training and evaluation
  device=auto           cpu | cuda | auto

A stage is skipped when it completed with the same inputs (OUT/stages.json records them); a changed
option re-runs that stage and every stage after it, and re-running continues a killed quickstart."""

#: torch CPU threads of every quickstart stage: pinned, so that OMP_NUM_THREADS or the machine's core count does not
#: change the result (float reductions split over another number of threads differ in the last bits, and RL
#: amplifies that: two runs with 1 and 2 threads ended at 7/20 and 11/20)
QUICKSTART_THREADS = 1

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
    f"num_threads={QUICKSTART_THREADS}",
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


def show_quickstart_config(kwargs: Dict[str, Any]) -> str:
    """``dpft quickstart --show-config``: the options the quickstart would run with (defaults updated by
    ``kwargs``) and the fixed settings of its pretraining and fine-tuning stages, as YAML."""
    import yaml

    options = dict(DEFAULTS)
    options.update(kwargs)
    options["pretrain_overrides"] = list(PRETRAIN_OVERRIDES)
    options["finetune_overrides"] = list(FINETUNE_OVERRIDES)
    return yaml.safe_dump(options, sort_keys=False, default_flow_style=False).rstrip()


STAGES_FILE = "stages.json"
#: what OUT holds (a quickstart directory written before run.json existed is recognized by these names)
QUICKSTART_ENTRIES = frozenset(["lift_demos.hdf5", "run", "rollout", "finetune", "rollout_finetuned", STAGES_FILE,
                                "run.json", ".dpft.lock"])

#: environments of the fine-tuning run AND of the quickstart's rollouts (``envs=0``): the envs of one rollout share
#: one sampling-noise stream, so the same count makes the fine-tuning run's iteration-0 evaluation equal the
#: pretrained rollout (and keeps the result independent of the machine's core count)
QUICKSTART_ENVS = 4

# The fine-tuning recipe of the quickstart: DPPO on the last 10 of 20 DDPM steps, CPU-sized rollouts. Episodes keep
# Lift's 300-step limit (as the rollouts do); the iteration's 25 chunks of 8 steps cut them at 200 in training
# (a bootstrapped truncation). The evaluation runs the rollouts' `episodes` episodes (added by quickstart()).
FINETUNE_OVERRIDES: List[str] = [
    "agent=dppo",
    "preset=dppo_robomimic",
    f"envs={QUICKSTART_ENVS}",
    "n_steps=25",
    "eval_every=0",
    "agent.batch_size=250",
    "agent.n_critic_warmup_itr=1",
    f"num_threads={QUICKSTART_THREADS}",
]


def _complete_checkpoint_step(run_dir: str) -> int:
    from dpft.checkpoint import find_latest, read_json

    latest = find_latest(run_dir) if os.path.isdir(run_dir) else None
    if latest is None:
        return -1
    return int(read_json(os.path.join(latest, "meta.json")).get("step", -1))


class _Stages:
    """``OUT/stages.json``: per stage, the inputs it ran with and whether it completed. A stage is finished
    when its record has the same inputs, is complete and its output exists; inputs include the upstream
    outputs' checksums, so a changed stage re-runs everything after it."""

    def __init__(self, out: str):
        from dpft.checkpoint import read_json

        self.path = os.path.join(out, STAGES_FILE)
        self.records = {}  # type: Dict[str, Any]
        if os.path.isfile(self.path):
            try:
                loaded = read_json(self.path)
            except DpftError:
                loaded = {}  # a damaged record only means: re-run
            self.records = loaded if isinstance(loaded, dict) else {}

    def finished(self, name: str, inputs: Dict[str, Any]) -> bool:
        rec = self.records.get(name) or {}
        return rec.get("inputs") == inputs and bool(rec.get("complete"))

    def same_inputs(self, name: str, inputs: Dict[str, Any]) -> bool:
        return (self.records.get(name) or {}).get("inputs") == inputs

    def why(self, name: str, inputs: Dict[str, Any]) -> str:
        rec = self.records.get(name)
        if not rec:
            return "no record of its inputs"
        old = rec.get("inputs") or {}
        changed = sorted(k for k in set(old) | set(inputs) if old.get(k) != inputs.get(k))
        if changed:
            return "changed: " + ", ".join(changed)
        return "it did not complete"

    def mark(self, name: str, inputs: Dict[str, Any], complete: bool) -> None:
        from dpft.checkpoint import write_text_atomic

        self.records[name] = {"inputs": inputs, "complete": bool(complete)}
        write_text_atomic(self.path, json.dumps(self.records, indent=1, sort_keys=True) + "\n")


def _file_sha256(path: str) -> str:
    from dpft.checkpoint import sha256_file

    return sha256_file(path)


def _checkpoint_id(run: str) -> Dict[str, Any]:
    """The newest checkpoint of the run and the checksum of the weights a rollout uses (EMA)."""
    from dpft.checkpoint import find_latest, read_json

    latest = find_latest(run)
    if latest is None:
        return {}
    meta = read_json(os.path.join(latest, "meta.json"))
    sums = meta.get("checksums") or {}
    return {"checkpoint": os.path.basename(latest), "weights_sha256": sums.get("ema.safetensors")
            or sums.get("model.safetensors") or _file_sha256(os.path.join(latest, "model.safetensors"))}


def _rollout_stage(stages: "_Stages", name: str, label: str, run: str, rollout_dir: str, inputs: Dict[str, Any],
                   episodes: int, envs: int, videos: int, seed: int) -> Dict[str, Any]:
    import shutil

    from dpft.checkpoint import read_json
    from dpft.envs.rollout import RESULT_NAME, rollout_checkpoint

    result_path = os.path.join(rollout_dir, RESULT_NAME)
    if stages.finished(name, inputs) and os.path.isfile(result_path):
        print(f"{label} rollout: reusing {result_path}")
        return read_json(result_path)
    reason = stages.why(name, inputs) if os.path.exists(rollout_dir) else ""
    print(f"{label} rollout: {episodes} Lift episodes of {run}" + (f" (re-run: {reason})" if reason else ""))
    stages.mark(name, inputs, complete=False)
    if os.path.isdir(rollout_dir):
        shutil.rmtree(rollout_dir)  # no result or video of an earlier rollout stays beside the new one
    result = rollout_checkpoint(run, episodes=episodes, num_envs=envs or QUICKSTART_ENVS, seed=seed, video=videos,
                                out_dir=rollout_dir, weights="ema", device="cpu",
                                env_options={"terminate_on_success": True})
    stages.mark(name, inputs, complete=True)
    return result


def quickstart(out: str = DEFAULTS["out"], demos: int = DEFAULTS["demos"], noise: float = DEFAULTS["noise"],
               steps: int = DEFAULTS["steps"], finetune: int = DEFAULTS["finetune"], episodes: int = DEFAULTS["episodes"],
               envs: int = DEFAULTS["envs"], videos: int = DEFAULTS["videos"], seed: int = DEFAULTS["seed"],
               device: str = DEFAULTS["device"]) -> Dict[str, Any]:
    """Run the stages and return the last rollout result (a dict, also in ``OUT/rollout*/result.json``), with
    ``result["pretrained"]`` holding the pretrained policy's result when fine-tuning ran.

    A stage whose inputs (options, and the checksum of the previous stage's output) match the record in
    ``OUT/stages.json`` and that completed is skipped; a killed pretraining with the same inputs resumes; any
    other stage is re-run from scratch, and so is every stage after it. ``device`` changes speed, not results, so it
    is not an input; ``envs`` is an input of the rollouts (the envs share one sampling-noise stream).
    """
    import time

    from dpft.agents.pretrain import pretrain
    from dpft.config import compose
    from dpft.envs.demos import make_demos
    from dpft.envs.rollout import DEFAULT_ROLLOUT_SEED
    from dpft.rundir import open_run_dir

    import torch

    t0 = time.time()
    threads = torch.get_num_threads()
    run_dir = open_run_dir(out, "quickstart", resume=False, known_entries=QUICKSTART_ENTRIES)
    torch.set_num_threads(QUICKSTART_THREADS)  # the rollouts' policy too (pretrain / finetune: num_threads=)
    try:
        out = run_dir.path
        stages = _Stages(out)
        n_stages = 5 if finetune > 0 else 3
        data = os.path.join(out, "lift_demos.hdf5")
        run = os.path.join(out, "run")
        rollout_dir = os.path.join(out, "rollout")

        demo_inputs = {"task": "lift", "num": demos, "noise": noise, "seed": seed}  # type: Dict[str, Any]
        if stages.finished("demos", demo_inputs) and os.path.isfile(data):
            print(f"[1/{n_stages}] demonstrations: reusing {data}")
        else:
            reason = stages.why("demos", demo_inputs) if os.path.exists(data) else ""
            print(f"[1/{n_stages}] demonstrations: {demos} scripted Lift demos -> {data}" + (f" (re-run: {reason})" if reason else ""))
            stages.mark("demos", demo_inputs, complete=False)
            make_demos(task="lift", num=demos, out=data, seed=seed, noise=noise,
                       overwrite=True)  # quickstart's own file, re-made from other inputs
            stages.mark("demos", demo_inputs, complete=True)

        train_inputs = {"recipe": list(PRETRAIN_OVERRIDES), "steps": steps, "seed": seed,
                        "demos_sha256": _file_sha256(data)}  # type: Dict[str, Any]
        done_step = _complete_checkpoint_step(run)
        if stages.finished("pretrain", train_inputs) and done_step >= steps:
            print(f"[2/{n_stages}] pretraining: reusing {run} (step {done_step})")
        else:
            overrides = PRETRAIN_OVERRIDES + [f"dataset={data}", f"out={run}", f"steps={steps}", f"seed={seed}",
                                              f"device={device}", f"save_every={max(steps // 3, 1)}"]
            if os.path.isdir(run) and stages.same_inputs("pretrain", train_inputs):
                overrides.append("resume=true")  # a killed run with the same inputs continues
                print(f"[2/{n_stages}] pretraining: resuming {run} at step {max(done_step, 0)} of {steps}")
            else:
                if os.path.isdir(run):
                    overrides.append("overwrite=true")  # quickstart's own run, made from other inputs
                    print(f"[2/{n_stages}] pretraining: {steps} steps -> {run} (re-run: {stages.why('pretrain', train_inputs)})")
                else:
                    print(f"[2/{n_stages}] pretraining: {steps} steps -> {run}")
            stages.mark("pretrain", train_inputs, complete=False)
            pretrain(compose("pretrain", overrides))
            stages.mark("pretrain", train_inputs, complete=True)

        n_stages = 5 if finetune > 0 else 3
        eval_seed = DEFAULT_ROLLOUT_SEED + seed
        eval_inputs = dict(_checkpoint_id(run), pretrain=train_inputs, episodes=episodes, videos=videos,
                           seed=eval_seed, weights="ema", terminate_on_success=True,
                           envs=envs or QUICKSTART_ENVS)  # type: Dict[str, Any]
        result = _rollout_stage(stages, "rollout", f"[3/{n_stages}]", run, rollout_dir, eval_inputs, episodes, envs,
                                videos, eval_seed)
        before = result
        if finetune > 0:
            from dpft.agents.finetune import finetune as run_finetune

            ft_dir = os.path.join(out, "finetune")
            ft_inputs = {"recipe": list(FINETUNE_OVERRIDES), "iterations": finetune, "seed": seed,
                         "eval_episodes": episodes, "pretrained": _checkpoint_id(run)}  # type: Dict[str, Any]
            if stages.finished("finetune", ft_inputs) and _complete_checkpoint_step(ft_dir) >= finetune:
                print(f"[4/{n_stages}] fine-tuning: reusing {ft_dir}")
            else:
                overrides = FINETUNE_OVERRIDES + [f"checkpoint={run}", f"out={ft_dir}", f"iterations={finetune}",
                                                  f"eval_episodes={episodes}", f"eval_seed={eval_seed}",
                                                  f"seed={seed}", f"device={device}", f"save_every={max(finetune // 3, 1)}"]
                if os.path.isdir(ft_dir) and stages.same_inputs("finetune", ft_inputs):
                    overrides.append("resume=true")
                    print(f"[4/{n_stages}] fine-tuning: resuming {ft_dir}")
                else:
                    if os.path.isdir(ft_dir):
                        overrides.append("overwrite=true")
                    print(f"[4/{n_stages}] fine-tuning: DPPO, {finetune} iterations -> {ft_dir}")
                stages.mark("finetune", ft_inputs, complete=False)
                run_finetune(compose("finetune", overrides))
                stages.mark("finetune", ft_inputs, complete=True)
            ft_eval = dict(_checkpoint_id(ft_dir), finetune=ft_inputs, episodes=episodes, videos=videos,
                           seed=eval_seed, weights="model", terminate_on_success=True, envs=envs or QUICKSTART_ENVS)
            result = _rollout_stage(stages, "rollout_finetuned", f"[5/{n_stages}]", ft_dir,
                                    os.path.join(out, "rollout_finetuned"), ft_eval, episodes, envs, videos, eval_seed)
            result = dict(result, pretrained=before)
            rollout_dir = os.path.join(out, "rollout_finetuned")
    finally:
        run_dir.close()
        torch.set_num_threads(threads)
    video_paths = [os.path.abspath(os.path.join(rollout_dir, ep["video"]))
                   for ep in result.get("episodes", []) if ep.get("video")]
    n = result.get("num_episodes", episodes)
    if "pretrained" in result:
        print(f"quickstart done in {time.time() - t0:.0f} s: Lift success rate {before['success_rate']:.0%} "
              f"pretrained -> {result['success_rate']:.0%} after DPPO fine-tuning (same {n} episodes)")
    else:
        print(f"quickstart done in {time.time() - t0:.0f} s: Lift success rate {result['success_rate']:.0%} "
              f"over {n} episodes")
    for path in video_paths:
        print(f"video: {path}")
    return result
