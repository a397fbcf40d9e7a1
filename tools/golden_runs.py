"""Golden runs: short seeded runs of every agent, recorded so that a refactor can prove it changed nothing.

Each run goes through the public library API (``dpft.agents.pretrain.pretrain``, ``dpft.agents.finetune.finetune``,
``dpft.agents.cmil.CmilTrainer``) with ``num_threads=1`` and tiny budgets, on envs that need no robosuite: Gym
Hopper (synthetic Hopper demos, as tests/test_finetune.py builds them) and, for CMIL, the 64x64-pixel point-mass
fake of tests/test_cmil_trainer.py. For each run it keeps

- ``metrics``: every numeric key of the last record of ``metrics.jsonl`` and of the last record holding ``eval/``
  keys (wall-clock keys such as ``time`` or ``sps`` left out: they are not reproducible);
- ``weights``: the sha256 of every tensor (dtype, shape and bytes) of every ``*.safetensors`` file of the final
  checkpoint, read back with safetensors: the weights (model, EMA, critic, normalizer) and ``training_state/``
  (optimizer moments, critics, RNG states, IN-RIL/CAIR bookkeeping), keyed ``path/tensor``;

plus the compute environment (:func:`dpft.sysinfo.compute_environment`), since bit-identity only holds on the same
torch build and CPU kernels.

    .venv/bin/python tools/golden_runs.py --check                 # compare with tests/golden/golden_runs.json
    .venv/bin/python tools/golden_runs.py --check --runs dppo,idql
    .venv/bin/python tools/golden_runs.py --record --overwrite    # re-record after an intended behaviour change

Run from the repository root (it reuses ``tests/synth.py`` and the CMIL test env).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from dpft.errors import DpftError  # noqa: E402

GOLDEN = os.path.join(REPO, "tests", "golden", "golden_runs.json")
#: compute-environment keys that must match for bit-identical results (see dpft.sysinfo.RESULT_KEYS)
ENV_KEYS = ("torch_version", "torch_git", "cpu_capability", "blas", "onednn", "numpy_version", "mujoco_version",
            "gymnasium_version")


def is_timing_key(key: str) -> bool:
    """Metric keys that measure wall-clock time (``time``, ``time/...``, ``..._time``, ``..._per_s``): never
    compared."""
    return key == "time" or key.startswith("time/") or key.endswith("_time") or key.endswith("_per_s")


TINY_PRE = ["steps=4", "batch_size=8", "save_every=4", "val_every=0", "progress=false", "num_threads=1",
            "data.valid_ratio=0", "warmup_steps=1", "obs_keys=[obs]", "seed=0"]
DIFF = ["policy.mlp_dims=[16,16,16]", "policy.denoising_steps=5", "horizon_steps=4", "act_steps=2"]
TINY_FT = ["envs=2", "n_steps=8", "iterations=2", "eval_episodes=2", "eval_every=2", "progress=false",
           "max_episode_steps=20", "num_threads=1", "seed=0", "agent.batch_size=16", "agent.update_epochs=2",
           "agent.critic_dims=[16,16,16]", "agent.n_critic_warmup_itr=0"]
FAST_INRIL = ["agent.ft_denoising_steps=3", "agent.target_kl=null", "inril.batch_size=8"]
#: run name -> extra finetune settings (``{ckpt}`` is the pretrained diffusion run)
FINETUNE_RUNS = {
    "dppo": ["agent=dppo", "checkpoint={ckpt}", "agent.ft_denoising_steps=3"],
    "ppo_scratch": ["agent=ppo", "env=hopper"],
    "residual_ppo": ["agent=residual_ppo", "checkpoint={ckpt}", "agent.mlp_dims=[16,16]", "agent.critic_dims=[16,16]"],
    "idql": ["agent=idql", "checkpoint={ckpt}", "agent.replay_ratio=4", "agent.replay_size=100",
             "agent.num_candidates=4", "agent.n_critic_warmup_itr=1", "agent.actor_lr=1e-3"],
    "inril_pcgrad": ["agent=dppo", "checkpoint={ckpt}", "inril.m=1", "inril.separation=pcgrad"] + FAST_INRIL,
    "cair": ["agent=dppo", "checkpoint={ckpt}", "cair=true", "cair.rate=0.05", "cair.start=0.5",
             "inril.monitor_every=3"] + FAST_INRIL,
}
CMIL = ["cmil.deter=32", "cmil.stoch=8", "cmil.hidden=32", "cmil.depth=4", "cmil.ensemble=2", "cmil.mlp_units=16",
        "cmil.actor_layers=2", "cmil.actor_units=16", "cmil.critic_layers=2", "cmil.critic_units=16",
        "cmil.disc_layers=1", "cmil.disc_units=16", "cmil.batch_size=2", "cmil.seq_len=6", "cmil.imag_horizon=3",
        "cmil.pretrain_steps=1", "cmil.bc_init_steps=1", "cmil.seed_steps=5", "cmil.train_every=5",
        "cmil.train_steps=1", "cmil.replay_size=400", "cmil.target_every=2", "envs=1", "n_steps=10",
        "iterations=2", "eval_every=2", "eval_episodes=1", "save_every=2", "progress=false", "num_threads=1",
        "seed=0"]
#: every run, in the order they are made (the fine-tuning runs need ``pretrain``)
RUNS = ["pretrain"] + list(FINETUNE_RUNS) + ["cmil"]


# ------------------------------------------------------------------------------------------------ reading runs
def _numeric(rec: Dict[str, Any]) -> Dict[str, float]:
    out = {}
    for k, v in rec.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if is_timing_key(k):
            continue
        out[k] = v
    return out


def final_metrics(run_dir: str) -> Dict[str, float]:
    """Numeric keys of the last record of ``run_dir/metrics.jsonl``, plus those of the last record with ``eval/``
    keys (prefixed ``last_eval:`` when that is an earlier record)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    if not recs:
        raise DpftError("Golden run '%s' wrote no metrics records; it did not train." % run_dir)
    out = _numeric(recs[-1])
    evals = [i for i, r in enumerate(recs) if any(k.startswith("eval/") for k in r)]
    if evals and evals[-1] != len(recs) - 1:
        out.update({"last_eval:" + k: v for k, v in _numeric(recs[evals[-1]]).items()})
    return out


def tensor_sha256(t: Any) -> str:
    """sha256 of a tensor's dtype, shape and bytes (CPU, contiguous)."""
    import torch

    arr = t.detach().cpu().contiguous()
    h = hashlib.sha256(("%s%s" % (arr.dtype, tuple(arr.shape))).encode())
    h.update(arr.reshape(-1).view(torch.uint8).numpy().tobytes() if arr.numel() else b"")
    return h.hexdigest()


def weight_hashes(run_dir: str) -> Dict[str, str]:
    """``{"path/tensor": sha256}`` for the tensors of every ``*.safetensors`` file in the run's latest checkpoint
    (``path`` relative to the checkpoint folder, read back with safetensors)."""
    from safetensors.torch import load_file

    from dpft.checkpoint import find_latest

    ckpt = find_latest(run_dir)
    if ckpt is None:
        raise DpftError("Golden run '%s' saved no checkpoint." % run_dir)
    out = {}
    for root, dirs, files in os.walk(ckpt):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(".safetensors"):
                rel = os.path.relpath(os.path.join(root, name), ckpt).replace(os.sep, "/")
                for k, t in sorted(load_file(os.path.join(root, name)).items()):
                    out["%s/%s" % (rel, k)] = tensor_sha256(t)
    return out


def summarize(run_dir: str) -> Dict[str, Any]:
    return {"metrics": final_metrics(run_dir), "weights": weight_hashes(run_dir)}


# ------------------------------------------------------------------------------------------------ making runs
def _hopper_data(path: str) -> str:
    import numpy as np

    from dpft.envs.gym_env import default_gym_env_args
    from tests.synth import write_demos_hdf5

    rng = np.random.default_rng(0)
    demos = {"demo_%d" % i: {"obs": {"obs": rng.normal(size=(20, 11))}, "actions": rng.uniform(-0.8, 0.8, (20, 3))}
             for i in range(3)}
    write_demos_hdf5(path, demos, env_args=default_gym_env_args("hopper"))
    return path


def _pretrain(work: str) -> str:
    from dpft.agents.pretrain import pretrain
    from dpft.config import compose

    out = os.path.join(work, "pretrain")
    data = _hopper_data(os.path.join(work, "hopper.hdf5"))
    pretrain(compose("pretrain", ["dataset=%s" % data, "out=%s" % out] + TINY_PRE + DIFF))
    return out


def _finetune(work: str, name: str) -> str:
    from dpft.agents.finetune import finetune
    from dpft.cli import _with_preset
    from dpft.config import compose

    out = os.path.join(work, name)
    ckpt = os.path.join(work, "pretrain")
    args = [a.replace("{ckpt}", ckpt) for a in FINETUNE_RUNS[name]]
    finetune(compose("finetune", _with_preset(["out=%s" % out] + TINY_FT + args)))
    return out


def _cmil(work: str) -> str:
    from dpft.agents.cmil import CmilTrainer
    from dpft.config import compose
    from tests.synth import write_robomimic_hdf5
    from tests.test_cmil_trainer import OBS_SPEC, PixelReach

    data = os.path.join(work, "pix.hdf5")
    write_robomimic_hdf5(data, num_demos=3, lengths=[10, 12, 14], obs_spec=OBS_SPEC, action_dim=3, images=True,
                         image_shape=(64, 64, 3))
    out = os.path.join(work, "cmil")
    cfg = compose("finetune", ["agent=cmil", "preset=cmil_cpu", "dataset=%s" % data, "out=%s" % out] + CMIL)
    tr = CmilTrainer(cfg, env_fns=[lambda: PixelReach()])
    try:
        tr.run()
    finally:
        tr.close()
    return out


def run_all(work: str, runs: Optional[Sequence[str]] = None,
            log: Callable[[str], None] = lambda s: None) -> Dict[str, Dict[str, Any]]:
    """Make the golden runs named in ``runs`` (default all; ``pretrain`` is made first whenever a fine-tuning run
    needs it) under the empty folder ``work`` and return ``{run: {"metrics": ..., "weights": ...}}``."""
    import time

    import torch

    runs = list(RUNS if runs is None else runs)
    bad = [r for r in runs if r not in RUNS]
    if bad:
        raise DpftError("Unknown golden run(s) %s; the runs are %s." % (", ".join(bad), ", ".join(RUNS)))
    threads = torch.get_num_threads()
    out = {}
    try:
        need_pre = "pretrain" in runs or any("checkpoint={ckpt}" in FINETUNE_RUNS.get(r, []) for r in runs)
        for name in [r for r in RUNS if r in runs or (r == "pretrain" and need_pre)]:
            t0 = time.time()
            if name == "pretrain":
                d = _pretrain(work)
            elif name == "cmil":
                d = _cmil(work)
            else:
                d = _finetune(work, name)
            if name in runs:
                out[name] = summarize(d)
            log("%-13s %.1f s" % (name, time.time() - t0))
    finally:
        torch.set_num_threads(threads)
    return out


def record(runs: Optional[Sequence[str]] = None, work: Optional[str] = None,
           log: Callable[[str], None] = lambda s: None) -> Dict[str, Any]:
    """The golden record: ``{"compute": compute_record(), "runs": run_all(...)}`` (in a temporary folder unless
    ``work`` is given)."""
    if work is None:
        with tempfile.TemporaryDirectory(prefix="dpft_golden_") as tmp:
            return record(runs, tmp, log)
    res = run_all(work, runs, log)
    return {"compute": compute_record(), "runs": res}


def compute_record() -> Dict[str, Any]:
    """:func:`dpft.sysinfo.compute_environment` with torch at 1 thread (as the runs use), plus the mujoco and
    gymnasium versions (Hopper's physics)."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from dpft.sysinfo import compute_environment

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        comp = compute_environment()
    finally:
        torch.set_num_threads(n)
    for pkg in ("mujoco", "gymnasium"):
        try:
            comp[pkg + "_version"] = version(pkg)
        except PackageNotFoundError:
            comp[pkg + "_version"] = None
    return comp


def load_golden(path: str = GOLDEN) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise DpftError("No golden record at '%s'; make one with `python tools/golden_runs.py --record`." % path)
    with open(path) as f:
        return json.load(f)


def write_golden(data: Dict[str, Any], path: str = GOLDEN, overwrite: bool = False) -> None:
    """Write ``data`` as JSON to ``path`` atomically; an existing file is refused unless ``overwrite``."""
    if os.path.exists(path) and not overwrite:
        raise DpftError("'%s' already exists; pass --overwrite to replace it (only after an intended behaviour "
                        "change, and say so in the commit)." % path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def environment_differences(saved: Dict[str, Any], current: Dict[str, Any]) -> List[Tuple[str, Any, Any]]:
    """``(key, recorded, current)`` for each of :data:`ENV_KEYS` that differs."""
    return [(k, saved.get(k), current.get(k)) for k in ENV_KEYS if saved.get(k) != current.get(k)]


def compare_run(golden: Dict[str, Any], got: Dict[str, Any]) -> Optional[str]:
    """None when ``got`` equals ``golden`` for every recorded metric and weight, else the first difference in words
    (metric keys first, then weights; keys present only in ``got`` are not differences). A weight key that is
    missing while its bytes are saved under another key is named with that key (a renamed file or tensor)."""
    for part in ("metrics", "weights"):
        want, have = golden.get(part, {}), got.get(part, {})
        for k in sorted(want):
            if k not in have:
                moved = [h for h in sorted(have) if part == "weights" and have[h] == want[k] and h not in want]
                return "%s key %r is missing%s" % (part, k, " (the same bytes are now under %r)" % moved[0]
                                                  if moved else "")
            if have[k] != want[k]:
                return "%s key %r: recorded %r, now %r" % (part, k, want[k], have[k])
    return None


def check(golden: Dict[str, Any], got: Dict[str, Any]) -> Dict[str, Optional[str]]:
    """Per-run verdicts ``{run: None (identical) or the first difference}`` for the runs in ``got``."""
    return {name: (compare_run(golden["runs"][name], res) if name in golden["runs"] else "not in the golden record")
            for name, res in got.items()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--record", action="store_true", help="run and write the golden JSON")
    g.add_argument("--check", action="store_true", help="run and compare with the golden JSON")
    p.add_argument("--overwrite", action="store_true", help="with --record: replace an existing golden JSON")
    p.add_argument("--runs", default=None, help="comma-separated subset of: " + ",".join(RUNS))
    p.add_argument("--golden", default=GOLDEN, help="the golden JSON (default tests/golden/golden_runs.json)")
    a = p.parse_args(argv)
    runs = a.runs.split(",") if a.runs else None
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    try:
        if a.record:
            if os.path.exists(a.golden) and not a.overwrite:
                write_golden({}, a.golden)  # raises the refusal before spending time on the runs
            data = record(runs, log=log)
            if runs is not None and os.path.exists(a.golden):  # re-record a subset: keep the other runs
                old = load_golden(a.golden)
                old["runs"].update(data["runs"])
                old["compute"] = data["compute"]
                data = old
            write_golden(data, a.golden, overwrite=a.overwrite)
            print("recorded %d runs to %s" % (len(data["runs"]), a.golden))
            return 0
        golden = load_golden(a.golden)
        data = record(runs, log=log)
        for k, want, have in environment_differences(golden["compute"], data["compute"]):
            print("note: compute environment differs (%s: recorded %r, now %r); bit-identity is only expected on "
                  "the recorded one" % (k, want, have))
        verdicts = check(golden, data["runs"])
        for name, v in verdicts.items():
            print("%-13s %s" % (name, "identical" if v is None else "DIFFERS: " + v))
        return 0 if all(v is None for v in verdicts.values()) else 1
    except DpftError as e:
        print("error: %s" % e, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
