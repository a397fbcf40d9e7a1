"""Run hostile-user cases through the ``dpft`` CLI in a temporary directory and print totals by verdict.

Each case is a command line (run as ``python -c`` in a fresh process, optionally after a small prelude that
simulates a fault such as a full disk) plus what a correct answer looks like. Verdicts:

- ``ok``: the expected outcome; an error is one paragraph (``dpft <command>: error: ...``) naming what it must;
- ``traceback``: a Python traceback reached the user;
- ``silent-wrong``: the command exited 0 where it must refuse, or its output is wrong (e.g. a success figure for a
  task without one);
- ``destroyed``: a file that existed before the command was changed or removed without ``overwrite=true``;
- ``vague``: the command refused, but the message lacks the key, value or path it must name.

Cases cover bad options, bad files, damaged and non-finite checkpoints, ``--no-verify``, the CLI flags, a full
disk while checkpointing, a kill -9 and resume, concurrent runs into one directory and outputs that exist already.
Everything runs on CPU with a synthetic Gym (Hopper) dataset and a tiny pretrained run; it needs gymnasium with
MuJoCo. Python 3.8 compatible (it sits beside Isaac Gym like the rest of ``tools/``).

Example usage::

    python tools/hostile_suite.py                 # all cases, a table and the totals
    python tools/hostile_suite.py --only nan,verify --keep /tmp/hostile   # a subset, keep the temp dir
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

VERDICTS = ("ok", "traceback", "silent-wrong", "destroyed", "vague")
TINY_PRE = ["steps=4", "batch_size=8", "save_every=2", "val_every=0", "progress=false", "num_threads=1",
            "data.valid_ratio=0", "warmup_steps=1", "obs_keys=[obs]", "policy.mlp_dims=[16,16,16]",
            "policy.denoising_steps=5", "horizon_steps=4", "act_steps=2"]
TINY_FT = ["agent=dppo", "envs=2", "n_steps=4", "iterations=2", "eval_episodes=2", "progress=false",
           "max_episode_steps=10", "agent.batch_size=16", "agent.update_epochs=1", "agent.critic_dims=[8,8,8]",
           "agent.n_critic_warmup_itr=0", "agent.ft_denoising_steps=2", "save_every=1", "eval_every=0"]
ROLL = ["episodes=2", "envs=1", "max_episode_steps=5", "++progress=false"]

FULL_DISK = """
import safetensors, safetensors.torch as _st
_real = _st.save_file
def _full(tensors, path, metadata=None):
    if '.tmp-step_00000004' in path or '.tmp-step_00000002' in path and 'FT' in path:
        raise safetensors.SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                          'message: "No space left on device" })')
    return _real(tensors, path, metadata=metadata)
_st.save_file = _full
"""


class Ctx:
    """The temporary directory, the synthetic dataset and a tiny pretrained run."""

    def __init__(self, root: str):
        self.root = root
        self.data = os.path.join(root, "hopper.hdf5")
        self.run = os.path.join(root, "run")
        self.n = 0

    def fresh(self, name: str) -> str:
        self.n += 1
        return os.path.join(self.root, "c%02d_%s" % (self.n, name))

    def copy_run(self, name: str) -> str:
        dst = self.fresh(name)
        shutil.copytree(self.run, dst)
        return dst


def dpft(argv: List[str], cwd: str, prelude: str = "", timeout: float = 600.0) -> Tuple[int, str, str]:
    """``dpft argv`` in a fresh Python process (after ``prelude``); ``(exit code, stdout, stderr)``."""
    code = prelude + "\nimport sys\nfrom dpft.cli import main\nsys.exit(main(%r))\n" % (list(argv),)
    env = dict(os.environ, MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"), PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, universal_newlines=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def refused(res: Tuple[int, str, str], *needles: str) -> Tuple[str, str]:
    """Verdict for a command that must refuse with a message naming ``needles``."""
    rc, out, err = res
    if "Traceback (most recent call last)" in err:
        return "traceback", err.strip().splitlines()[-1][:160]
    if rc == 0:
        return "silent-wrong", "exit 0; stdout: " + out.strip()[-160:]
    line = next((ln for ln in err.splitlines() if ": error: " in ln), err.strip()[:300])
    missing = [n for n in needles if n not in err]
    if missing:
        return "vague", "lacks %r: %s" % (missing, line[:200])
    return "ok", line[:160]


def succeeded(res: Tuple[int, str, str], check: Optional[Callable[[str], Optional[str]]] = None) -> Tuple[str, str]:
    """Verdict for a command that must succeed (``check(stdout)`` returns a complaint or None)."""
    rc, out, err = res
    if "Traceback (most recent call last)" in err:
        return "traceback", err.strip().splitlines()[-1][:160]
    if rc != 0:
        return "vague", "exit %d: %s" % (rc, err.strip()[-200:])
    problem = check(out) if check else None
    return ("silent-wrong", problem) if problem else ("ok", out.strip().splitlines()[-1][:160] if out.strip() else "")


def digest_tree(path: str) -> Dict[str, str]:
    out = {}  # type: Dict[str, str]
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return {path: hashlib.sha256(f.read()).hexdigest()}
    for r, _, files in os.walk(path):
        for name in files:
            if name == ".dpft.lock":  # the lock file's content (the holder's pid) changes with every run
                continue
            p = os.path.join(r, name)
            with open(p, "rb") as f:
                out[p] = hashlib.sha256(f.read()).hexdigest()
    return out


def guarded(paths: List[str], verdict: Tuple[str, str], before: Dict[str, str]) -> Tuple[str, str]:
    after = {}  # type: Dict[str, str]
    for p in paths:
        after.update(digest_tree(p))
    lost = sorted(set(before) - set(after))
    changed = sorted(k for k in before if k in after and before[k] != after[k])
    if lost or changed:
        return "destroyed", "removed %s changed %s" % ([os.path.basename(x) for x in lost][:3],
                                                       [os.path.basename(x) for x in changed][:3])
    return verdict


def _write_hopper(path: str, n: int = 3, only_valid: bool = False) -> None:
    import h5py
    import numpy as np

    from dpft.envs.gym_env import default_gym_env_args

    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        for i in range(n):
            g = data.create_group("demo_%d" % i)
            g.create_dataset("obs/obs", data=rng.normal(size=(20, 11)))
            g.create_dataset("actions", data=rng.uniform(-0.8, 0.8, (20, 3)))
            g.attrs["num_samples"] = 20
        data.attrs["total"] = 20 * n
        data.attrs["env_args"] = json.dumps(default_gym_env_args("hopper"))
        if only_valid:
            f.create_dataset("mask/valid", data=np.array([b"demo_%d" % i for i in range(n)]))


def _rewrite(step: str, rel: str, change: Callable[[Dict[str, Any]], None]) -> None:
    """Change a checkpoint file's tensors and record its new checksum (valid checksum, wrong values)."""
    from safetensors.torch import load_file, save_file

    from dpft.checkpoint import CHECKSUMS_KEY

    p = os.path.join(step, rel)
    t = {k: v.clone() for k, v in load_file(p).items()}
    change(t)
    save_file(t, p)
    meta = json.load(open(os.path.join(step, "meta.json")))
    meta[CHECKSUMS_KEY][rel] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    json.dump(meta, open(os.path.join(step, "meta.json"), "w"))


def _latest(run: str) -> str:
    from dpft.checkpoint import find_latest

    return find_latest(run) or run


# ---------------------------------------------------------------------------------------------- cases
def case_bad_options(c: Ctx) -> List[Tuple[str, str, Tuple[str, str]]]:
    out = []
    ft = ["finetune", "checkpoint=%s" % c.run, "out=%s" % c.fresh("opt")]
    for name, args, needles in [
        ("max_episode_steps=0", ["max_episode_steps=0"], ["max_episode_steps=0", "unset"]),
        ("max_episode_steps=-5", ["max_episode_steps=-5"], ["max_episode_steps=-5", "unset"]),
        ("agent.init_std=0", ["agent=ppo", "agent.init_std=0"], ["agent.init_std=0"]),
        ("agent.vf_coef=-1", ["agent.vf_coef=-1"], ["agent.vf_coef=-1"]),
        ("agent.reward_scale_const=0", ["agent.reward_scale_const=0"], ["agent.reward_scale_const=0"]),
        ("pcgrad with inril.m=inf", ["inril.separation=pcgrad"], ["inril.separation=pcgrad", "inril.m"]),
        ("agent.weight_decay=-1", ["agent.weight_decay=-1"], ["agent.weight_decay=-1"]),
        ("eval_seed=-1", ["eval_seed=-1"], ["eval_seed=-1"]),
        ("agent.critic_dims=[]", ["agent.critic_dims=[]"], ["agent.critic_dims"]),
        ("preset=bogus", ["preset=bogus"], ["residual_ppo_robomimic", "ppo_scratch"]),
        ("unknown key", ["agent.lrr=1"], ["agent.lrr"]),
        ("agent=bogus", ["agent=bogus"], ["bogus"]),
    ]:
        out.append(("option", name, refused(dpft(ft + args, c.root), *needles)))
    pre = ["pretrain", "dataset=%s" % c.data, "out=%s" % c.fresh("pre")] + TINY_PRE
    for name, args, needles in [
        ("pretrain weight_decay=-1", ["weight_decay=-1"], ["weight_decay=-1"]),
        ("pretrain lr=nan", ["lr=nan"], ["lr=nan"]),
        ("pretrain act_steps>horizon", ["act_steps=9"], ["act_steps=9", "horizon_steps"]),
        ("pretrain mlp_dims=[16,16]", ["policy.mlp_dims=[16,16]"], ["policy.mlp_dims=[16,16]"]),
    ]:
        out.append(("option", name, refused(dpft(pre + args, c.root), *needles)))
    out.append(("option", "rollout max_episode_steps=0",
                refused(dpft(["rollout", "checkpoint=%s" % c.run, "max_episode_steps=0"], c.root),
                        "max_episode_steps=0")))
    out.append(("option", "demos num=0", refused(dpft(["demos", "num=0", "out=%s" % c.fresh("d.hdf5")], c.root),
                                                  "num=0")))
    return out


def case_flags(c: Ctx) -> List[Tuple[str, str, Tuple[str, str]]]:
    out = []
    work = c.fresh("flags")
    os.makedirs(work)
    res = dpft(["quickstart", "--show-config"], work)
    v = succeeded(res, lambda o: None if "demos:" in o else "no settings shown")
    if os.path.exists(os.path.join(work, "runs")):
        v = ("silent-wrong", "quickstart --show-config started work")
    out.append(("flags", "quickstart --show-config", v))
    out.append(("flags", "info with an argument", refused(dpft(["info", "verbose=true"], work), "verbose=true")))
    out.append(("flags", "data info --show-config",
                succeeded(dpft(["data", "info", "--show-config"], work),
                          lambda o: None if "no config" in o else "not explained")))
    for cmd in ("pretrain", "finetune", "rollout", "demos", "data", "info", "quickstart"):
        out.append(("flags", "%s --help" % cmd, succeeded(dpft([cmd, "--help"], work),
                                                           lambda o: None if "Usage: dpft" in o else "no usage")))
    return out


def case_bad_files(c: Ctx) -> List[Tuple[str, str, Tuple[str, str]]]:
    out = []
    missing = os.path.join(c.root, "nope.hdf5")
    out.append(("file", "data info missing file", refused(dpft(["data", "info", missing], c.root), missing)))
    text = c.fresh("text.hdf5")
    with open(text, "w") as f:
        f.write("not hdf5\n")
    out.append(("file", "data info text file", refused(dpft(["data", "info", text], c.root), text)))
    only_valid = c.fresh("only_valid.hdf5")
    _write_hopper(only_valid, n=1, only_valid=True)
    out.append(("file", "data info only mask/valid", refused(dpft(["data", "info", only_valid], c.root),
                                                             "train split is empty")))
    out.append(("file", "pretrain only mask/valid",
                refused(dpft(["pretrain", "dataset=%s" % only_valid, "out=%s" % c.fresh("p")] + TINY_PRE, c.root),
                        "train split is empty")))
    out.append(("file", "finetune checkpoint missing",
                refused(dpft(["finetune", "checkpoint=%s" % missing, "out=%s" % c.fresh("f")], c.root), missing)))
    return out


def case_checkpoints(c: Ctx) -> List[Tuple[str, str, Tuple[str, str]]]:
    out = []
    run = c.copy_run("flip")
    step = _latest(run)
    p = os.path.join(step, "model.safetensors")
    raw = bytearray(open(p, "rb").read())
    raw[-1] ^= 1
    open(p, "wb").write(bytes(raw))
    out.append(("checkpoint", "flipped byte: rollout",
                refused(dpft(["rollout", "checkpoint=%s" % run] + ROLL, c.root), p, "previous checkpoint")))
    out.append(("checkpoint", "flipped byte: finetune",
                refused(dpft(["finetune", "checkpoint=%s" % run, "out=%s" % c.fresh("f")] + TINY_FT, c.root), p,
                        "previous checkpoint")))
    ev = c.fresh("eval")
    res = dpft(["rollout", "checkpoint=%s" % run, "out=%s" % ev, "--no-verify"] + ROLL, c.root)
    # the flipped byte may land in a weight (a changed value) or make it NaN (refused at load): both are fine
    if res[0] == 0:
        rec = json.load(open(os.path.join(ev, "result.json")))["policy"]
        v = succeeded(res, lambda o: None if (rec.get("verified") is False and rec.get("checksum_mismatches")
                                              and "warning" in res[2]) else "verification off not recorded/warned")
    else:
        v = refused(res, "non-finite")
    out.append(("checkpoint", "--no-verify recorded", v))
    run = c.copy_run("nan")
    step = _latest(run)
    _rewrite(step, "ema.safetensors", lambda t: t[sorted(t)[0]].fill_(float("nan")))
    out.append(("checkpoint", "NaN ema, valid checksum: rollout",
                refused(dpft(["rollout", "checkpoint=%s" % run] + ROLL, c.root), "ema.safetensors", "tensor")))
    run = c.copy_run("nan_norm")
    step = _latest(run)
    _rewrite(step, "normalizer.safetensors", lambda t: t[sorted(t)[0]].fill_(float("inf")))
    out.append(("checkpoint", "Inf normalizer: finetune",
                refused(dpft(["finetune", "checkpoint=%s" % run, "out=%s" % c.fresh("f")] + TINY_FT, c.root),
                        "normalizer.safetensors")))
    run = c.copy_run("nan_opt")
    step = _latest(run)
    _rewrite(step, "training_state/optimizer.safetensors", lambda t: t[sorted(t)[-1]].fill_(float("nan")))
    out.append(("checkpoint", "NaN optimizer state: pretrain resume",
                refused(dpft(["pretrain", "dataset=%s" % c.data, "out=%s" % run, "resume=true"] + TINY_PRE, c.root),
                        "optimizer.safetensors")))
    run = c.copy_run("meta")
    step = _latest(run)
    meta = json.load(open(os.path.join(step, "meta.json")))
    from dpft.checkpoint import CHECKSUMS_KEY

    del meta[CHECKSUMS_KEY]["ema.safetensors"]
    json.dump(meta, open(os.path.join(step, "meta.json"), "w"))
    out.append(("checkpoint", "edited meta.json",
                refused(dpft(["rollout", "checkpoint=%s" % run] + ROLL, c.root), "meta.json was edited")))
    empty = c.fresh("killed_early")
    os.makedirs(empty)
    with open(os.path.join(empty, "run.json"), "w") as f:
        json.dump({"kind": "pretrain", "dpft_version": "0", "created": "x"}, f)
    out.append(("checkpoint", "run without checkpoint",
                refused(dpft(["rollout", "checkpoint=%s" % empty] + ROLL, c.root), "without any checkpoint")))
    return out


def case_gym_success(c: Ctx) -> List[Tuple[str, str, Tuple[str, str]]]:
    ev = c.fresh("gym_eval")
    res = dpft(["rollout", "checkpoint=%s" % c.run, "out=%s" % ev] + ROLL, c.root)

    def check(o: str) -> Optional[str]:
        if "success" in o:
            return "success figure printed for a task without one: " + o.strip()[:120]
        if json.load(open(os.path.join(ev, "result.json"))).get("success_rate") is not None:
            return "result.json has a success rate"
        return None

    return [("gym", "rollout shows returns only", succeeded(res, check))]


def case_faults(c: Ctx) -> List[Tuple[str, str, Tuple[str, str]]]:
    out = []
    pre = c.fresh("full_pre")
    res = dpft(["pretrain", "dataset=%s" % c.data, "out=%s" % pre] + TINY_PRE, c.root, prelude=FULL_DISK)
    out.append(("fault", "full disk: pretrain", refused(res, "disk is full", "resume=true")))
    ft = c.fresh("full_FT")
    res = dpft(["finetune", "checkpoint=%s" % c.run, "out=%s" % ft] + TINY_FT, c.root, prelude=FULL_DISK)
    out.append(("fault", "full disk: finetune", refused(res, "disk is full")))
    res = dpft(["finetune", "checkpoint=%s" % c.run, "out=%s" % ft, "resume=true"] + TINY_FT, c.root,
               prelude=FULL_DISK)
    out.append(("fault", "full disk: finetune resume", refused(res, "disk is full")))
    # kill -9 while pretraining, then resume
    out_dir = c.fresh("kill")
    args = ["pretrain", "dataset=%s" % c.data, "out=%s" % out_dir] + TINY_PRE + ["steps=400", "save_every=100"]
    code = "import sys\nfrom dpft.cli import main\nsys.exit(main(%r))\n" % (args,)
    p = subprocess.Popen([sys.executable, "-c", code], cwd=c.root, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    t0 = time.time()
    while time.time() - t0 < 300 and p.poll() is None:
        if os.path.isdir(os.path.join(out_dir, "checkpoints", "step_00000100")):
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    p.wait()
    res = dpft(args + ["resume=true"], c.root)
    out.append(("fault", "kill -9 then resume", succeeded(
        res, lambda o: None if os.path.isdir(os.path.join(out_dir, "checkpoints", "step_00000400"))
        else "no final checkpoint")))
    return out


def case_concurrent_and_outputs(c: Ctx) -> List[Tuple[str, str, Tuple[str, str]]]:
    out = []
    same = c.fresh("concurrent")
    args = ["pretrain", "dataset=%s" % c.data, "out=%s" % same] + TINY_PRE + ["steps=200", "save_every=100"]
    code = "import sys\nfrom dpft.cli import main\nsys.exit(main(%r))\n" % (args,)
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=c.root, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True) for _ in range(2)]
    results = [(p.wait(), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = sorted(r[0] for r in results)
    if any("Traceback (most recent call last)" in r[2] for r in results):
        v = ("traceback", "")
    elif codes == [0, 2]:
        v = refused([r for r in results if r[0] == 2][0], same)
    else:
        v = ("silent-wrong", "exit codes %s" % codes)
    out.append(("concurrent", "two pretrains into one out=", v))
    # outputs that exist: never replaced without overwrite=true
    foreign = c.fresh("foreign")
    os.makedirs(foreign)
    with open(os.path.join(foreign, "notes.txt"), "w") as f:
        f.write("mine\n")
    before = digest_tree(foreign)
    res = dpft(["pretrain", "dataset=%s" % c.data, "out=%s" % foreign, "overwrite=true"] + TINY_PRE, c.root)
    out.append(("outputs", "pretrain overwrite=true into a foreign dir",
                guarded([foreign], refused(res, foreign), before)))
    demos = c.fresh("demos.hdf5")
    shutil.copy(c.data, demos)
    before = digest_tree(demos)
    res = dpft(["demos", "policy=%s" % c.run, "num=1", "out=%s" % demos, "max_episode_steps=5",
                "progress=false"], c.root)
    out.append(("outputs", "demos onto an existing file", guarded([demos], refused(res, demos), before)))
    ev = c.fresh("eval_twice")
    dpft(["rollout", "checkpoint=%s" % c.run, "out=%s" % ev] + ROLL, c.root)
    before = digest_tree(ev)
    res = dpft(["rollout", "checkpoint=%s" % c.run, "out=%s" % ev, "seed=7"] + ROLL, c.root)
    out.append(("outputs", "rollout into an existing out=", guarded([ev], refused(res, ev), before)))
    before = digest_tree(c.run)
    res = dpft(["finetune", "checkpoint=%s" % c.run, "out=%s" % c.run, "overwrite=true"] + TINY_FT, c.root)
    out.append(("outputs", "finetune out= its own checkpoint", guarded([c.run], refused(res, c.run), before)))
    return out


GROUPS = {"option": case_bad_options, "flags": case_flags, "file": case_bad_files, "checkpoint": case_checkpoints,
          "gym": case_gym_success, "fault": case_faults, "outputs": case_concurrent_and_outputs}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma-separated groups: " + ", ".join(GROUPS))
    ap.add_argument("--keep", default=None, help="work in this directory and keep it (default: a temp dir, removed)")
    args = ap.parse_args(argv)
    root = args.keep or tempfile.mkdtemp(prefix="dpft_hostile_")
    os.makedirs(root, exist_ok=True)
    c = Ctx(root)
    t0 = time.time()
    _write_hopper(c.data)
    rc, _, err = dpft(["pretrain", "dataset=%s" % c.data, "out=%s" % c.run] + TINY_PRE, root)
    if rc != 0:
        print("could not pretrain the tiny run:\n" + err, file=sys.stderr)
        return 1
    groups = [g for g in args.only.split(",") if g] or list(GROUPS)
    rows = []  # type: List[Tuple[str, str, Tuple[str, str]]]
    try:
        for g in groups:
            for row in GROUPS[g](c):
                rows.append(row)
                print("%-12s %-13s %-44s %s" % (row[0], row[2][0], row[1], row[2][1]), flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    totals = {v: sum(1 for r in rows if r[2][0] == v) for v in VERDICTS}
    print("\n%d cases in %.0f s: %s" % (len(rows), time.time() - t0,
                                         ", ".join("%s %d" % (v, n) for v, n in totals.items())))
    return 0 if totals["ok"] == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
