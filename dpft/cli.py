"""``dpft <command>``: the thin command-line layer over dpft's library functions.

Commands (options are Hydra-style ``key=value`` overrides of ``cfg/<command>.yaml``):

  dpft data info FILE.hdf5                       inspect and validate a robomimic-format HDF5 file
  dpft demos task=lift num=50 out=FILE.hdf5      scripted-expert demonstrations in robosuite
  dpft demos policy=RUN_DIR num=50 out=FILE.hdf5 record a checkpoint's rollouts (gym or robosuite)
  dpft pretrain dataset=FILE.hdf5 out=RUN_DIR    behaviour cloning of a diffusion or Gaussian policy
  dpft finetune agent=dppo checkpoint=RUN_DIR out=FT_DIR   RL fine-tuning (dppo | ppo | residual_ppo | idql)
  dpft rollout checkpoint=RUN_DIR episodes=20    run a checkpoint, score it, write videos
  dpft quickstart                                demos -> pretrain -> rollout -> DPPO -> rollout on Lift
  dpft import-dppo checkpoint=STATE.pt normalization=NORM.npz out=RUN_DIR   a DPPO checkpoint as a dpft run
  dpft info                                      versions and rendering backend (paste into bug reports)

Every command has ``--help``; ``--show-config`` prints the composed config and exits. Errors in user
input print one paragraph (no stack trace) and exit with status 2.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Dict, List, Optional

from dpft.errors import DpftError

USAGE = __doc__.split("\n\n", 1)[1]


def _schema_help(command: str, summary: str, examples: List[str]) -> str:
    from dpft.config import SCHEMAS, describe_schema

    lines = [summary, "", "Usage: dpft %s [key=value ...] [--show-config]" % command, "", "Examples:"]
    lines += ["  " + e for e in examples]
    lines += ["", "Options (key, default, meaning):"]
    lines += describe_schema(SCHEMAS[command])
    if command == "finetune":
        lines += ["", "Config groups: agent=dppo | ppo | residual_ppo | idql | cmil (cfg/agent/*.yaml); preset=<agent>_<family> (cfg/preset/*.yaml) is",
                  "chosen from the checkpoint's env family (robomimic, gym, furniture; scratch with env=) unless given;",
                  "agent=cmil (dataset=DEMOS.hdf5) uses preset=cmil_cpu (cmil_paper with device=cuda)."]
    if command == "pretrain":
        lines += ["", "Config groups: policy=diffusion_mlp | diffusion_unet | gaussian_mlp (cfg/policy/*.yaml).",
                  "Data-parallel: torchrun --nproc_per_node N $(which dpft) pretrain ... (batch_size is global)."]
    return "\n".join(lines)


HELP = {
    "pretrain": (
        "Pretrain a policy by behaviour cloning on a robomimic-format HDF5 file.",
        [
            "dpft pretrain dataset=data/lift.hdf5 out=runs/lift",
            "dpft pretrain dataset=data/lift.hdf5 out=runs/lift_unet policy=diffusion_unet horizon_steps=8 act_steps=8",
            "dpft pretrain dataset=data/lift.hdf5 out=runs/lift_gauss policy=gaussian_mlp horizon_steps=1 act_steps=1",
            "dpft pretrain dataset=data/lift.hdf5 out=runs/lift resume=true    # continue a killed run",
        ],
    ),
    "demos": (
        "Write scripted-expert demonstrations (robosuite), or with policy=RUN_DIR rollouts of a checkpoint (gym or "
        "robosuite), as a robomimic-format HDF5 file.",
        ["dpft demos task=lift num=50 out=data/lift.hdf5",
         "dpft demos task=can num=100 out=data/can_noisy.hdf5 noise=0.5 seed=1",
         "dpft demos policy=runs/hopper_ppo num=50 out=data/hopper_medium.hdf5 noise=0.2 envs=4"],
    ),
    "finetune": (
        "Fine-tune a pretrained checkpoint with RL in the env rebuilt from its metadata (DPPO for diffusion, PPO for "
        "Gaussian policies), or train a Gaussian policy from scratch with env=TASK.",
        ["dpft finetune agent=dppo checkpoint=runs/lift out=runs/lift_dppo iterations=50 envs=10",
         "dpft finetune agent=ppo checkpoint=runs/lift_gauss out=runs/lift_ppo",
         "dpft finetune agent=ppo env=hopper out=runs/hopper_ppo iterations=488   # CleanRL-style, ~1M steps",
         "dpft finetune agent=dppo checkpoint=runs/lift out=runs/lift_dppo resume=true   # continue exactly",
         "dpft finetune agent=dppo checkpoint=runs/lift out=runs/x agent.ft_denoising_steps=5 agent.clip_coef=0.02",
         "dpft finetune agent=cmil dataset=data/lift_pix.hdf5 out=runs/lift_cmil   # CMIL from pixel demos, no rewards"],
    ),
    "rollout": (
        "Roll out a checkpoint in the environment rebuilt from its metadata; print and write result.json.",
        ["dpft rollout checkpoint=runs/lift episodes=20",
         "dpft rollout checkpoint=runs/lift episodes=10 envs=2 video=true out=runs/lift/eval",
         "dpft rollout checkpoint=runs/lift --no-verify    # skip checksum verification (same as verify=false)"],
    ),
}


#: flags that are shorthands for an option, per command
FLAG_OPTIONS = {"rollout": {"--no-verify": "verify=false"}}


def _split_help(args: List[str], command: str = ""):
    want_help = any(a in ("-h", "--help") for a in args)
    show = "--show-config" in args
    flags = FLAG_OPTIONS.get(command, {})
    rest = [flags.get(a, a) for a in args if a not in ("-h", "--help", "--show-config")]
    for a in rest:
        if a.startswith("-"):
            known = ", ".join(["--help", "--show-config"] + sorted(flags))
            raise DpftError(f"Unknown flag {a!r}: options are written key=value; the flags are {known} "
                            f"(see --help).")
    return want_help, show, rest


def _compose_or_help(command: str, args: List[str]):
    from dpft.config import compose, to_yaml

    want_help, show, overrides = _split_help(args, command)
    if want_help:
        summary, examples = HELP[command]
        print(_schema_help(command, summary, examples))
        return None
    if show:  # print without validating required fields, so users can inspect the defaults
        print(to_yaml(compose(command, overrides, validate=False)))
        return None
    return compose(command, overrides)


DATA_HELP = """Usage: dpft data info FILE.hdf5

Print demos, samples, obs keys (shape, dtype), action dimension and per-dimension range, filter keys and env
metadata of a robomimic-format HDF5 file, and validate it the way pretraining reads it (a file that passes
trains, short of horizon_steps and obs_keys choices). Exits with status 2 and a precise message when the file
is broken.

Example:
  dpft data info data/lift.hdf5"""


def cmd_data(args: List[str]) -> int:
    if not args or any(a in ("-h", "--help") for a in args):
        print(DATA_HELP)
        return 0
    if "--show-config" in args:  # the same flag as every command's; this one has no options to show
        print("dpft data info has no options (it takes one FILE.hdf5), so there is no config to show; "
              "dpft data --help describes it.")
        return 0
    flags = [a for a in args if a.startswith("-")]
    if flags:
        raise DpftError("Unknown flag %r for `dpft data`: the flags are --help and --show-config "
                        "(dpft data info FILE.hdf5; a file name starting with '-' can be given as ./%s)."
                        % (flags[0], flags[0]))
    if args[0] != "info":
        raise DpftError(f"Unknown `dpft data` subcommand {args[0]!r}; the subcommand is info: "
                        f"dpft data info FILE.hdf5 (dpft data --help).")
    if len(args) != 2:
        raise DpftError("Usage: dpft data info FILE.hdf5 (exactly one file; dpft data --help).")
    from dpft.data.hdf5 import describe, format_description

    print(format_description(describe(args[1])))
    return 0


def cmd_pretrain(args: List[str]) -> int:
    cfg = _compose_or_help("pretrain", args)
    if cfg is None:
        return 0
    from dpft.agents.pretrain import pretrain

    pretrain(cfg)  # prints where the final checkpoint and loss curve are
    return 0


def cmd_finetune(args: List[str]) -> int:
    opts = dict(a.split("=", 1) for a in args if "=" in a and not a.startswith("-"))
    ckpt = opts.get("checkpoint")
    if ckpt and os.path.exists(ckpt) and opts.get("simulator") != "fake":
        from dpft.envs.registry import import_isaacgym_if_needed

        import_isaacgym_if_needed(ckpt)  # FurnitureBench on Isaac Gym: before anything imports torch
    cfg = _compose_or_help("finetune", _with_preset(args))
    if cfg is None:
        return 0
    from dpft.agents.finetune import finetune

    finetune(cfg)  # prints the final evaluation, checkpoint and curves
    return 0


def _with_preset(args: List[str]) -> List[str]:
    """Add ``preset=<agent>_<family>`` (cfg/preset/) from the checkpoint's env family (``scratch`` with ``env=``)
    unless ``preset=`` is given or no such preset exists; help/show-config requests pass through."""
    if any(a.startswith("preset=") or a in ("-h", "--help") for a in args):
        return args
    opts = dict(a.split("=", 1) for a in args if "=" in a and not a.startswith("-"))
    agent = opts.get("agent", "dppo")
    if agent == "cmil":  # (H-cmil) reduced sizes on CPU, the reference sizes with device=cuda
        return ["preset=" + ("cmil_paper" if opts.get("device", "cpu").startswith("cuda") else "cmil_cpu")] + list(args)
    family = None
    if opts.get("env") not in (None, "", "null"):
        family = "scratch"
    elif opts.get("checkpoint"):
        try:
            from dpft.checkpoint import read_json, resolve_checkpoint
            from dpft.envs.registry import env_kind

            meta = read_json(os.path.join(resolve_checkpoint(opts["checkpoint"]), "meta.json"))
            family = {"robosuite": "robomimic"}.get(env_kind(meta.get("env_args") or {}), None) or env_kind(
                meta.get("env_args") or {})
        except DpftError:
            family = None  # the trainer reports the bad checkpoint with its own message
    if family is None:
        return args
    from dpft.config import config_dir

    name = "%s_%s" % (agent, family)
    if os.path.isfile(os.path.join(config_dir(), "preset", name + ".yaml")):
        return ["preset=" + name] + list(args)
    return args


def _pop_option(args: List[str], key: str):
    """``(value, other args)`` for ``key=value`` among ``args`` (None when absent; the last one wins). Used for an
    option whose name is also a config group of another command (Hydra would read ``policy=`` as cfg/policy/)."""
    value, rest = None, []
    for a in args:
        name, sep, val = a.partition("=")
        if sep and name.lstrip("+") == key:
            value = val
        else:
            rest.append(a)
    return value, rest


def cmd_demos(args: List[str]) -> int:
    policy, args = _pop_option(args, "policy")  # `policy` is cfg/policy/ (pretraining) to Hydra
    cfg = _compose_or_help("demos", args)
    if cfg is None:
        return 0
    if policy not in (None, "", "null"):
        cfg.policy = policy
        return _record_policy_demos(cfg)
    from dpft.envs.demos import make_demos

    summary = make_demos(
        task=cfg.task or "lift", num=cfg.num, out=cfg.out, seed=cfg.seed, noise=cfg.noise, image_obs=cfg.image_obs,
        camera_size=cfg.camera_size, keep_failures=cfg.keep_failures, valid_ratio=cfg.valid_ratio,
        max_steps=cfg.max_episode_steps, progress=cfg.progress, overwrite=cfg.overwrite,
    )
    print(f"wrote {_demos(summary.get('kept'))} ({summary.get('samples')} samples) to {cfg.out}; "
          f"expert success {summary.get('success_rate', float('nan')):.0%} over {summary.get('attempted')} attempts")
    return 0


def _demos(n) -> str:
    return "1 demo" if n == 1 else "%s demos" % n


def _record_policy_demos(cfg) -> int:
    """``dpft demos policy=RUN_DIR ...``: record rollouts of a checkpoint (dpft.envs.record.record_demos)."""
    from dpft.envs.record import record_demos

    s = record_demos(
        cfg.policy, num=cfg.num, out=cfg.out, task=cfg.task, seed=cfg.seed, envs=cfg.envs,
        deterministic=cfg.deterministic, noise=cfg.noise, keep_failures=cfg.keep_failures, min_return=cfg.min_return,
        max_episode_steps=cfg.max_episode_steps, image_obs=cfg.image_obs, camera_size=cfg.camera_size,
        valid_ratio=cfg.valid_ratio, weights=cfg.weights, device=cfg.device, progress=cfg.progress,
        overwrite=cfg.overwrite,
    )
    success = "" if s.get("success_rate") is None else f" (success {s['success_rate']:.0%})"  # None: no signal
    print(f"wrote {_demos(s['kept'])} ({s['samples']} samples) of {s['env_name']} to {s['path']}; mean return "
          f"{s['mean_return']:.3f}, {s['kept']} kept of {s['attempted']} episodes{success}")
    return 0


def cmd_rollout(args: List[str]) -> int:
    cfg = _compose_or_help("rollout", args)
    if cfg is None:
        return 0
    from dpft.envs.registry import import_isaacgym_if_needed

    import_isaacgym_if_needed(cfg.checkpoint)  # before anything imports torch
    from dpft.envs.rollout import rollout_checkpoint

    if cfg.num_threads:  # the float results of the policy depend on it (README: Reproducibility)
        import torch

        torch.set_num_threads(int(cfg.num_threads))
    out = cfg.out
    if out is None:  # default: RUN_DIR/rollout/step_XXXXXXXX, next to the checkpoint it evaluates
        from dpft.checkpoint import resolve_checkpoint

        step_dir = resolve_checkpoint(cfg.checkpoint)
        out = os.path.join(os.path.dirname(os.path.dirname(step_dir)), "rollout", os.path.basename(step_dir))
    env_options = {"terminate_on_success": cfg.terminate_on_success}
    if cfg.max_episode_steps is not None:
        env_options["max_episode_steps"] = cfg.max_episode_steps
    rollout_checkpoint(
        cfg.checkpoint, episodes=cfg.episodes, num_envs=cfg.envs or None, seed=cfg.seed,
        video=(cfg.videos or True) if cfg.video else 0, out_dir=out, weights=cfg.weights,
        device=cfg.device, deterministic=cfg.deterministic, progress=cfg.progress, env_options=env_options,
        video_size=(cfg.video_size, cfg.video_size), camera=cfg.camera, verify=cfg.verify, overwrite=cfg.overwrite,
    )
    return 0


def cmd_quickstart(args: List[str]) -> int:
    want_help, show, rest = _split_help(args)
    from dpft.agents.quickstart import QUICKSTART_HELP, quickstart, parse_quickstart_args, show_quickstart_config

    if want_help:
        print(QUICKSTART_HELP)
        return 0
    kwargs = parse_quickstart_args(rest)
    if show:  # the options it would run with, and the fixed recipes of its stages; nothing is run
        print(show_quickstart_config(kwargs))
        return 0
    quickstart(**kwargs)
    return 0


INFO_HELP = """Usage: dpft info

Print dpft's version, Python, torch, CUDA, simulator and rendering-backend versions (paste into bug reports).
It takes no options."""


IMPORT_DPPO_HELP = """Turn a DPPO-pretrained DiffusionMLP checkpoint and its normalization file into a dpft run.

Usage: dpft import-dppo checkpoint=STATE.pt normalization=NORM.npz out=RUN_DIR [key=value ...]

Options (default):
  checkpoint=           DPPO's state_<epoch>.pt (read with torch.load(weights_only=True) only)
  normalization=        DPPO's normalization.npz (obs_min, obs_max, action_min, action_max)
  out=                  new dpft run directory
  env=null              task to roll out in (hopper, walker2d, halfcheetah, lift, can, square, ...)
  denoising_steps=20    DPPO's denoising_steps of the run (not stored in its checkpoint)
  activation=relu       DPPO's activation_type (relu: its gym configs; mish: its class default, robomimic)
  act_steps=0           executed actions per chunk (0 = the whole horizon)
  weights=ema           ema | model
  obs_key=obs           name of the flat low-dim observation
  overwrite=false       replace an existing dpft run in out="""


def cmd_import_dppo(args: List[str]) -> int:
    want_help, show, rest = _split_help(args)
    if want_help:
        print(IMPORT_DPPO_HELP)
        return 0
    from dpft.dppo_import import import_dppo_checkpoint

    known = {"checkpoint": str, "normalization": str, "out": str, "env": str, "denoising_steps": int,
             "activation": str, "act_steps": int, "weights": str, "obs_key": str, "overwrite": str}
    kw = {}  # type: Dict[str, object]
    for arg in rest:
        key, sep, value = arg.partition("=")
        if not sep or key not in known:
            raise DpftError("%r is not one of the key=value options of import-dppo (%s); see dpft import-dppo --help."
                            % (arg, ", ".join(known)))
        try:
            kw[key] = known[key](value)
        except ValueError:
            raise DpftError("%s=%r must be an integer." % (key, value)) from None
    if show:  # the options it would run with; nothing is read or written
        print("\n".join("%s: %s" % (k, kw[k]) for k in known if k in kw) or "(defaults; see dpft import-dppo --help)")
        return 0
    for key in ("checkpoint", "normalization", "out"):
        if not kw.get(key):
            raise DpftError("import-dppo needs %s=...; see dpft import-dppo --help." % key)
    env = kw.pop("env", None)
    overwrite = str(kw.pop("overwrite", "false")).lower() in ("1", "true", "yes")
    path = import_dppo_checkpoint(env_args=None if env in (None, "", "null") else env, overwrite=overwrite, **kw)
    print("dpft import-dppo: wrote %s (policy.mlp_arch=dppo); try: dpft rollout checkpoint=%s" % (path, kw["out"]))
    return 0


def cmd_info(args: List[str]) -> int:
    want_help, show, rest = _split_help(args)
    if want_help:
        print(INFO_HELP)
        return 0
    if show:
        print("dpft info has no options, so there is no config to show; dpft info --help describes it.")
        return 0
    if rest:
        raise DpftError("dpft info takes no options; got %s. Run `dpft info` alone (dpft info --help)."
                        % " ".join(repr(a) for a in rest))
    from dpft.sysinfo import system_report

    print(system_report())
    return 0


COMMANDS: Dict[str, Callable[[List[str]], int]] = {
    "data": cmd_data,
    "demos": cmd_demos,
    "pretrain": cmd_pretrain,
    "finetune": cmd_finetune,
    "rollout": cmd_rollout,
    "quickstart": cmd_quickstart,
    "import-dppo": cmd_import_dppo,
    "info": cmd_info,
}


def _local_rank0_error_file(error_file: str) -> Optional[str]:
    """torchrun gives worker ``i`` the error file ``<log dir>/attempt_<n>/<i>/error.json``: local rank 0's path."""
    parent = os.path.dirname(error_file)
    if os.path.basename(parent) != os.environ.get("LOCAL_RANK", ""):
        return None
    return os.path.join(os.path.dirname(parent), "0", os.path.basename(error_file))


def report_error(text: str, wait_s: float = 5.0) -> None:
    """Print a user error (one paragraph, no traceback) once, also under torchrun, where every rank meets the same
    error: local rank 0 prints it and writes it to torchrun's error file (``TORCHELASTIC_ERROR_FILE``, so torchrun's
    failure summary shows dpft's message instead of a link); another rank waits up to ``wait_s`` for local rank 0's
    error file and stays silent when it holds the same message (torchrun stops the other workers once one has
    failed), else it reports its own message the same way, so an error of one rank alone is never lost."""
    import json
    import time

    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    try:
        world = int(os.environ.get("WORLD_SIZE") or 1)
    except ValueError:
        world = 1
    if not error_file or world <= 1:
        print(text, file=sys.stderr)
        return
    first = _local_rank0_error_file(error_file)
    if first is not None and os.path.abspath(first) != os.path.abspath(error_file):
        deadline = time.time() + wait_s
        while time.time() < deadline:
            try:
                with open(first) as f:
                    if json.load(f)["message"]["message"] == text:
                        return  # local rank 0 reported this very error
                break
            except (OSError, ValueError, KeyError, TypeError):
                time.sleep(0.1)
    print(text, file=sys.stderr)
    try:
        with open(error_file, "w") as f:
            json.dump({"message": {"message": text, "extraInfo": {"timestamp": str(int(time.time()))}}}, f)
    except OSError:
        pass


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print("dpft: pretrain diffusion/Gaussian policies and fine-tune them with RL.\n\n" + USAGE)
        return 0
    if argv[0] in ("-V", "--version"):
        from dpft import __version__

        print(__version__)
        return 0
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"dpft: unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)} (dpft --help).", file=sys.stderr)
        return 2
    try:
        return command(argv[1:]) or 0
    except DpftError as e:
        report_error(f"dpft {argv[0]}: error: {e}")
        return e.exit_code
    except KeyboardInterrupt:
        print(f"dpft {argv[0]}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed early
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
