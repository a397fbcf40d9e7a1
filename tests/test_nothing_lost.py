"""Nothing destroyed, nothing swapped (issue 23, part A): a fine-tuning resume is bound to its start checkpoint,
overwrite=true never deletes a command's inputs or another run, `dpft demos` / `dpft rollout` lock their outputs and
refuse to replace them without overwrite=true, a run restarted before its first checkpoint keeps its metrics, and
files are written with the umask's mode."""
from __future__ import annotations

import functools
import json
import os
import stat

import h5py
import numpy as np
import pytest

from dpft.errors import DpftError
from dpft.envs.render import setup_rendering

setup_rendering(require=False)
pytest.importorskip("gymnasium")
pytest.importorskip("mujoco")

from dpft.config import compose  # noqa: E402
from dpft.envs.gym_env import default_gym_env_args  # noqa: E402
from tests.synth import write_demos_hdf5  # noqa: E402

HOPPER = default_gym_env_args("hopper")
TINY_PRE = ["steps=2", "batch_size=8", "save_every=2", "val_every=0", "progress=false", "num_threads=1",
            "data.valid_ratio=0", "warmup_steps=1", "obs_keys=[obs]", "policy=gaussian_mlp", "policy.mlp_dims=[8]",
            "horizon_steps=2", "act_steps=2"]
TINY_FT = ["agent=ppo", "envs=2", "n_steps=4", "iterations=1", "save_every=1", "eval_every=0", "eval_episodes=1",
           "progress=false", "max_episode_steps=10", "agent.batch_size=8", "agent.update_epochs=1",
           "agent.critic_dims=[8]", "agent.n_critic_warmup_itr=0"]


def _data(path, n=3):
    rng = np.random.default_rng(0)
    demos = {"demo_%d" % i: {"obs": {"obs": rng.normal(size=(12, 11))}, "actions": rng.uniform(-0.8, 0.8, (12, 3))}
             for i in range(n)}
    write_demos_hdf5(str(path), demos, env_args=HOPPER)
    return str(path)


def _pretrain(dataset, out, *extra):
    from dpft.agents.pretrain import pretrain

    pretrain(compose("pretrain", ["dataset=%s" % dataset, "out=%s" % out] + TINY_PRE + list(extra)))
    return str(out)


def _finetune(out, *extra):
    from dpft.agents.finetune import finetune
    from dpft.cli import _with_preset

    return finetune(compose("finetune", _with_preset(["out=%s" % out] + TINY_FT + list(extra))))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _data(tmp_path_factory.mktemp("data") / "hopper.hdf5")


def _tree(path):
    """{relative path: bytes} of every file under path (the lock file left out)."""
    out = {}
    for root, _, files in os.walk(str(path)):
        for f in files:
            if f != ".dpft.lock":
                p = os.path.join(root, f)
                out[os.path.relpath(p, str(path))] = open(p, "rb").read()
    return out


def _num_demos(path):
    with h5py.File(str(path), "r") as f:
        return len([k for k in f["data"] if k.startswith("demo_")])


# ------------------------------------------------------------------------------------------------ 1. resume binding
def test_resume_refuses_another_start_checkpoint_naming_both(tmp_path, data):
    a = _pretrain(data, tmp_path / "a", "seed=0")
    b = _pretrain(data, tmp_path / "b", "seed=1")
    ft = tmp_path / "ft"
    _finetune(ft, "checkpoint=%s" % a)
    recorded = json.loads((ft / "start_checkpoint.json").read_text())
    assert recorded["path"] == os.path.join(a, "checkpoints", "step_00000002")
    assert set(recorded["sha256"]) >= {"model.safetensors", "normalizer.safetensors", "meta.json"}
    before = _tree(ft)
    with pytest.raises(DpftError, match=r"started from checkpoint '%s/checkpoints/step_00000002', but checkpoint= "
                                        r"now resolves to '%s/checkpoints/step_00000002', a different checkpoint "
                                        r"\(.*model.safetensors.*\).*Pass checkpoint=%s/checkpoints/step_00000002 to "
                                        r"continue it" % (a, b, a)):
        _finetune(ft, "checkpoint=%s" % b, "resume=true", "iterations=2")
    assert _tree(ft) == before  # nothing written
    # the same checkpoint, named by its step directory, continues
    _finetune(ft, "checkpoint=%s" % recorded["path"], "resume=true", "iterations=2")
    from dpft.checkpoint import find_latest, read_json

    meta = read_json(os.path.join(find_latest(str(ft)), "meta.json"))
    assert meta["step"] == 2 and meta["start_checkpoint"]["sha256"] == recorded["sha256"]


def test_resume_refuses_a_start_run_re_pretrained_in_place(tmp_path, data):
    a = _pretrain(data, tmp_path / "a", "seed=0")
    ft = tmp_path / "ft"
    _finetune(ft, "checkpoint=%s" % a)
    _pretrain(data, a, "seed=3", "overwrite=true")  # same path, other weights and normalizer
    with pytest.raises(DpftError, match=r"started from checkpoint '%s/checkpoints/step_00000002', and that checkpoint "
                                        r"has changed since \(ema.safetensors, meta.json, model.safetensors differ"
                                        % a):
        _finetune(ft, "checkpoint=%s" % a, "resume=true", "iterations=2")


def test_resume_before_the_first_checkpoint_is_bound_too(tmp_path, data):
    from dpft.agents.finetune import Finetuner
    from dpft.cli import _with_preset

    a = _pretrain(data, tmp_path / "a", "seed=0")
    b = _pretrain(data, tmp_path / "b", "seed=1")
    ft = tmp_path / "ft"
    Finetuner(compose("finetune", _with_preset(["out=%s" % ft, "checkpoint=%s" % a] + TINY_FT))).close()  # "killed"
    assert (ft / "start_checkpoint.json").is_file() and not (ft / "checkpoints").exists()
    with pytest.raises(DpftError, match=r"started from checkpoint '%s/.*recorded in %s"
                                        % (a, ft / "start_checkpoint.json")):
        _finetune(ft, "checkpoint=%s" % b, "resume=true")


def test_same_content_at_another_path_resumes_with_a_note(tmp_path, data, capsys):
    import shutil

    a = _pretrain(data, tmp_path / "a")
    ft = tmp_path / "ft"
    _finetune(ft, "checkpoint=%s" % a)
    shutil.copytree(a, str(tmp_path / "moved"))
    _finetune(ft, "checkpoint=%s" % (tmp_path / "moved"), "resume=true", "iterations=2")
    assert "holds the same files (same sha256); continuing" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ 2. overwrite
def test_finetune_out_equal_to_its_checkpoint_is_refused_and_never_suggests_overwrite(tmp_path, data):
    from dpft.cli import main

    a = _pretrain(data, tmp_path / "a")
    before = _tree(a)
    with pytest.raises(DpftError, match=r"overwrite=true would delete this command's own input checkpoint='%s' \(the "
                                        r"out= directory itself\)" % a):
        _finetune(a, "checkpoint=%s" % a, "overwrite=true")
    assert _tree(a) == before
    with pytest.raises(DpftError, match=r"out='%s' holds this command's own input: checkpoint='%s' \(the out= directory "
                                        r"itself\). A run cannot be written into the directory it reads from" % (a, a)) as e:
        _finetune(a, "checkpoint=%s" % a)
    assert "overwrite" not in str(e.value)
    assert main(["finetune", "checkpoint=%s" % a, "out=%s" % a, "overwrite=true"] + TINY_FT) == 2
    assert _tree(a) == before


def test_pretrain_overwrite_keeps_a_dataset_inside_out(tmp_path, data):
    run = tmp_path / "run"
    _pretrain(data, run)
    inside = _data(run / "mine.hdf5", n=4)
    with pytest.raises(DpftError, match=r"would delete this command's own input dataset='%s' \(inside out=\)" % inside):
        _pretrain(inside, run, "overwrite=true")
    assert _num_demos(inside) == 4 and (run / "checkpoints" / "step_00000002").is_dir()


def test_pretrain_overwrite_keeps_a_finetune_run_nested_in_it(tmp_path, data):
    run = tmp_path / "run"
    _pretrain(data, run)
    _finetune(run / "ft", "checkpoint=%s" % run)
    nested = _tree(run / "ft")
    with pytest.raises(DpftError, match=r"would delete another dpft run inside out='%s': '%s'" % (run, run / "ft")):
        _pretrain(data, run, "overwrite=true")
    assert _tree(run / "ft") == nested and (run / "checkpoints" / "step_00000002").is_dir()


# ------------------------------------------------------------------------------------------------ 3. demos, rollout
@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    return _pretrain(data, tmp_path_factory.mktemp("run") / "run")


def test_demos_onto_an_existing_file_is_refused_without_overwrite(tmp_path, run, capsys):
    from dpft.cli import main

    out = _data(tmp_path / "demos.hdf5", n=8)
    args = ["demos", "policy=%s" % run, "num=1", "out=%s" % out, "max_episode_steps=5", "progress=false"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "out='%s' already exists; dpft demos does not replace it without overwrite=true" % out in err
    assert _num_demos(out) == 8
    old = os.umask(0o022)
    try:
        assert main(args + ["overwrite=true"]) == 0
    finally:
        os.umask(old)
    assert _num_demos(out) == 1
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o644  # the umask's mode, not mkstemp's 0600


def test_demos_writer_locks_its_file(tmp_path):
    from dpft.envs.demos import DemoFileWriter

    out = tmp_path / "d.hdf5"
    first = DemoFileWriter(out, overwrite=False)
    try:
        with pytest.raises(DpftError, match=r"out='%s' is in use by another dpft run \(process %d holds"
                                            % (out, os.getpid())):
            DemoFileWriter(out, overwrite=True)
    finally:
        first.close()
    DemoFileWriter(out).close()  # released


def _rollout(out, **kw):
    from dpft.envs.fake_env import FakeEnv, ScriptedReachPolicy
    from dpft.envs.rollout import rollout

    fns = [functools.partial(FakeEnv, max_episode_steps=8)]
    return rollout(ScriptedReachPolicy(act_steps=4), fns, episodes=1, out_dir=str(out), mode="inline",
                   progress=False, **kw)


def test_rollout_into_an_earlier_rollout_is_refused_without_overwrite(tmp_path):
    out = tmp_path / "eval"
    _rollout(out)
    (out / "videos").mkdir()
    (out / "videos" / "episode_000.mp4").write_bytes(b"earlier video")
    before = _tree(out)
    with pytest.raises(DpftError, match=r"out='%s' already holds the outputs of an earlier dpft rollout: '%s', '%s'. "
                                        r"Pass overwrite=true" % (out, out / "result.json",
                                                                  out / "videos" / "episode_000.mp4")):
        _rollout(out)
    assert _tree(out) == before
    _rollout(out, overwrite=True)
    assert not (out / "videos" / "episode_000.mp4").exists() and json.loads((out / "result.json").read_text())


def test_cli_rollout_twice_into_the_same_out(tmp_path, run, capsys):
    from dpft.cli import main

    args = ["rollout", "checkpoint=%s" % run, "episodes=1", "envs=1", "max_episode_steps=5", "progress=false",
            "out=%s" % (tmp_path / "r")]
    assert main(args) == 0
    first = (tmp_path / "r" / "result.json").read_bytes()
    assert main(args) == 2
    assert "already holds the outputs of an earlier dpft rollout" in capsys.readouterr().err
    assert (tmp_path / "r" / "result.json").read_bytes() == first
    import shutil

    from dpft.checkpoint import find_latest

    damaged = str(tmp_path / "damaged")
    shutil.copytree(run, damaged)
    with open(os.path.join(find_latest(damaged), "model.safetensors"), "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\0\0\0\0")
    assert main([a if not a.startswith("checkpoint=") else "checkpoint=" + damaged for a in args]
                + ["overwrite=true"]) == 2  # the policy fails to load: the earlier result stays
    assert "model.safetensors" in capsys.readouterr().err
    assert (tmp_path / "r" / "result.json").read_bytes() == first
    assert main(args + ["overwrite=true"]) == 0
    from dpft.envs.rollout import prepare_out_dir

    held = prepare_out_dir(str(tmp_path / "r"), overwrite=True)  # a rollout running there now (its old result gone)
    try:
        assert main(args + ["overwrite=true"]) == 2
        assert "out='%s' is in use by another dpft run (process %d holds" % (tmp_path / "r", os.getpid()) in \
            capsys.readouterr().err
    finally:
        held.close()
    assert ".dpft.lock" not in os.listdir(str(tmp_path / "r"))  # no lock file left behind


def test_concurrent_rollout_into_one_out_fails_naming_the_holder(tmp_path):
    from dpft.envs.rollout import prepare_out_dir

    out = tmp_path / "eval"
    held = prepare_out_dir(str(out))  # as a running rollout holds it
    try:
        with pytest.raises(DpftError, match=r"out='%s' is in use by another dpft run \(process %d holds"
                                            % (out, os.getpid())):
            _rollout(out)
    finally:
        held.close()
    assert not (out / "result.json").exists()
    _rollout(out)
    assert (out / "result.json").exists()


# ------------------------------------------------------------------------------------------------ 4. restarted runs
def _killed_before_first_checkpoint(out, kind, records=130):
    from dpft.rundir import open_run_dir

    with open_run_dir(str(out), kind, resume=False):
        pass
    with open(str(out / "metrics.jsonl"), "w") as f:
        for i in range(records):
            f.write(json.dumps({"step": i + 1, "loss": 1.0}) + "\n")


@pytest.mark.parametrize("kind", ["finetune", "pretrain"])
def test_resume_before_the_first_checkpoint_keeps_the_metrics_and_says_so(tmp_path, data, run, kind, capsys):
    out = tmp_path / "x"
    _killed_before_first_checkpoint(out, kind)
    old = (out / "metrics.jsonl").read_bytes()
    if kind == "finetune":
        _finetune(out, "checkpoint=%s" % run, "resume=true")
    else:
        _pretrain(data, out, "resume=true")
    assert "dpft %s: note: out='%s' holds a run that stopped before its first checkpoint; it starts over at step 0 " \
           "(the metrics it logged are kept in 'metrics.restarted-1.jsonl')" % (kind, out) in capsys.readouterr().out
    assert (out / "metrics.restarted-1.jsonl").read_bytes() == old
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())][-1] in (1, 2)


# ------------------------------------------------------------------------------------------------ 5. file modes
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_checkpoint_files_follow_the_umask(tmp_path, umask, mode):
    import torch

    from dpft.checkpoint import save_tensors
    from dpft.rng import save_rng_state

    old = os.umask(umask)
    try:
        save_tensors(str(tmp_path / "w.safetensors"), {"a": torch.zeros(2)})
        save_rng_state(str(tmp_path))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(str(tmp_path / "w.safetensors")).st_mode) == mode
    assert stat.S_IMODE(os.stat(str(tmp_path / "rng.safetensors")).st_mode) == mode


def test_every_file_of_a_run_follows_the_umask(tmp_path, data):
    old = os.umask(0o022)
    try:
        run = _pretrain(data, tmp_path / "run")
    finally:
        os.umask(old)
    modes = {p: stat.S_IMODE(os.stat(os.path.join(run, p)).st_mode) for p in _tree(run)}
    assert modes and all(m == 0o644 for m in modes.values()), modes


# ------------------------------------------------------------------------------------------------ 5. torchrun errors
def test_error_under_torchrun_is_reported_once(tmp_path, monkeypatch, capsys):
    from dpft.cli import report_error

    attempt = tmp_path / "attempt_0"
    for r in ("0", "1"):
        (attempt / r).mkdir(parents=True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(attempt / "0" / "error.json"))
    report_error("dpft pretrain: error: bad dataset")  # local rank 0: printed and recorded for torchrun
    assert capsys.readouterr().err == "dpft pretrain: error: bad dataset\n"
    assert json.loads((attempt / "0" / "error.json").read_text())["message"]["message"] == \
        "dpft pretrain: error: bad dataset"
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(attempt / "1" / "error.json"))
    report_error("dpft pretrain: error: bad dataset", wait_s=0.5)  # the same error on rank 1: silent
    assert capsys.readouterr().err == "" and not (attempt / "1" / "error.json").exists()
    report_error("dpft pretrain: error: rank 1 only", wait_s=0.5)  # its own error: never lost
    assert capsys.readouterr().err == "dpft pretrain: error: rank 1 only\n"
    assert json.loads((attempt / "1" / "error.json").read_text())["message"]["message"] == \
        "dpft pretrain: error: rank 1 only"


@pytest.mark.slow  # three processes importing torch: ~20 s on a loaded 2-core machine
def test_torchrun_prints_a_dpft_error_once(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "dpft.cli", "pretrain", "dataset=%s" % (tmp_path / "missing.hdf5"),
                        "out=%s" % (tmp_path / "out")], cwd=root, env=env, capture_output=True, text=True,
                       timeout=240)
    assert p.returncode != 0
    msg = "dpft pretrain: error: Dataset file '%s' does not exist" % (tmp_path / "missing.hdf5")
    assert [line for line in p.stderr.splitlines() if line.startswith(msg)] != []
    assert len([line for line in p.stderr.splitlines() if line.startswith(msg)]) == 1, p.stderr
    assert "traceback : " + msg in p.stderr  # torchrun's summary names dpft's message, not a link


def test_quickstart_reopened_gets_no_restart_note(tmp_path, capsys):
    from dpft.agents.quickstart import QUICKSTART_ENTRIES
    from dpft.rundir import open_run_dir

    out = tmp_path / "q"
    open_run_dir(str(out), "quickstart", resume=False, known_entries=QUICKSTART_ENTRIES).close()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')  # not a trainer's run: nothing is moved or announced
    open_run_dir(str(out), "quickstart", resume=False, known_entries=QUICKSTART_ENTRIES).close()
    assert "note" not in capsys.readouterr().out and (out / "metrics.jsonl").exists()
