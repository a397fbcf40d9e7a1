"""Run directories (dpft.rundir): exclusive lock held by a live process, foreign directories untouched,
unwritable locations refused before any work, resume/overwrite rules."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from dpft.errors import DpftError
from dpft.rundir import LOCK_FILE, RUN_MARKER, is_run_dir, open_run_dir, read_run_info

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _snapshot(path):
    """{relative path: (bytes, mtime_ns)} of every file under path, plus the directory names."""
    snap = {}
    for root, dirs, files in os.walk(path):
        for d in dirs:
            snap[os.path.relpath(os.path.join(root, d), path) + "/"] = None
        for f in files:
            p = os.path.join(root, f)
            snap[os.path.relpath(p, path)] = (open(p, "rb").read(), os.stat(p).st_mtime_ns)
    return snap


def test_new_dir_gets_marker_and_lock(tmp_path):
    out = tmp_path / "a" / "run"
    with open_run_dir(str(out), "pretrain", resume=False) as rd:
        assert rd.path == str(out) and rd.locked and not rd.existed
        info = json.loads((out / RUN_MARKER).read_text())
        assert info["kind"] == "pretrain" and "dpft_version" in info
        assert (out / LOCK_FILE).read_text() == "pid %d\n" % os.getpid()
        # a second open in this very process is refused too (flock is per open file)
        with pytest.raises(DpftError, match=r"is in use by another dpft run \(process %d holds" % os.getpid()):
            open_run_dir(str(out), "pretrain", resume=True)
    assert not rd.locked
    assert is_run_dir(str(out)) and read_run_info(str(out))["kind"] == "pretrain"
    with open_run_dir(str(out), "pretrain", resume=True) as rd2:  # released: reopens
        assert rd2.existed


def test_two_real_pretrain_processes_into_one_out(tmp_path):
    from tests.synth import write_learnable_hdf5

    data = tmp_path / "d.hdf5"
    write_learnable_hdf5(data)
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("DPFT_TEST_KILL_AT_STEP", None)

    def cmd(seed, lr):
        return [sys.executable, "-m", "dpft", "pretrain", "dataset=%s" % data, "out=%s" % out,
                "obs_keys=[robot0_eef_pos,object]", "policy.mlp_dims=[32]", "policy.denoising_steps=3",
                "steps=100000000", "batch_size=8", "save_every=100000000", "log_every=100000000",
                "++num_threads=1", "++progress=false", "seed=%d" % seed, "lr=%g" % lr]

    first = subprocess.Popen(cmd(0, 1e-3), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # wait until the first run holds the lock and trains
            if first.poll() is not None:
                raise AssertionError("first run exited: %s" % first.communicate()[1].decode())
            lock = out / LOCK_FILE
            if lock.exists() and lock.read_text().startswith("pid ") and (out / "config.yaml").exists():
                break
            time.sleep(0.2)
        config_before = (out / "config.yaml").read_bytes()
        second = subprocess.run(cmd(1, 5e-4), cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert ("out='%s' is in use by another dpft run (process %d holds" % (out, first.pid)) in second.stderr
        assert "Traceback" not in second.stderr
        assert (out / "config.yaml").read_bytes() == config_before  # the second run wrote nothing
        assert first.poll() is None  # and the first one still trains
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # kill -9 leaves no stale lock: the directory can be reopened at once
    with open_run_dir(str(out), "pretrain", resume=True) as rd:
        assert rd.locked and (out / LOCK_FILE).read_text() == "pid %d\n" % os.getpid()


def test_foreign_directory_is_refused_and_kept_intact(tmp_path):
    from dpft.agents.pretrain import pretrain
    from dpft.config import compose

    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.yaml").write_text("my: own config\n")
    (out / "metrics.jsonl").write_text('{"epoch": 1, "acc": 0.5}\n')
    (out / "loss_curve.png").write_bytes(b"\x89PNG not really")
    (out / "notes.txt").write_text("do not touch\n")
    (out / "sub").mkdir()
    (out / "sub" / "x.bin").write_bytes(os.urandom(64))
    before = _snapshot(str(out))
    for extra in ([], ["++overwrite=true"], ["resume=true"]):
        with pytest.raises(DpftError) as e:
            pretrain(compose("pretrain", ["dataset=%s" % (tmp_path / "missing.hdf5"), "out=%s" % out] + extra))
        msg = str(e.value)
        assert "out='%s' is not empty and is not a dpft run directory (no run.json; it holds 'config.yaml', " \
               "'loss_curve.png', 'metrics.jsonl', 'notes.txt', 'sub')" % out in msg
        assert "also not with overwrite=true" in msg
        assert _snapshot(str(out)) == before  # byte for byte, no lock file added


@pytest.mark.parametrize("where, expected", [
    ("/proc/dpft_test_run/run", "out='/proc/dpft_test_run/run' cannot be created: No such file or directory"),
    ("/sys/dpft_test_run", "out='/sys/dpft_test_run' cannot be created: Operation not permitted"),
    ("FILE/run", "cannot be created: Not a directory (a part of the path is a file)"),
    ("FILE", "is a file; out= must name a run directory"),
])
def test_unwritable_out_refused_before_any_work(tmp_path, monkeypatch, where, expected):
    """As root, chmod does not make a directory read-only, so /proc, /sys and a file-as-directory stand in."""
    import dpft.agents.pretrain as P
    from dpft.config import compose

    if where.startswith("/sys") and not os.path.isdir("/sys/kernel"):
        pytest.skip("no /sys")
    (tmp_path / "FILE").write_text("a file")
    where = where.replace("FILE", str(tmp_path / "FILE"))

    def no_work(*a, **k):
        raise AssertionError("data was loaded before out= was checked")

    monkeypatch.setattr(P, "build_datasets", no_work)
    with pytest.raises(DpftError) as e:
        P.pretrain(compose("pretrain", ["dataset=%s" % (tmp_path / "missing.hdf5"), "out=%s" % where]))
    assert expected in str(e.value)
    assert (tmp_path / "FILE").read_text() == "a file"


def test_existing_run_rules(tmp_path):
    from dpft.checkpoint import CHECKPOINTS

    out = tmp_path / "run"
    open_run_dir(str(out), "pretrain", resume=False).close()
    # no checkpoint yet (killed before its first save): a plain restart is allowed
    with open_run_dir(str(out), "pretrain", resume=False) as rd:
        assert rd.existed
    (out / CHECKPOINTS / "step_00000010").mkdir(parents=True)
    (out / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(DpftError, match="already holds a pretrain run with checkpoints .newest: step_00000010.. Pass "
                                        "resume=true to continue it, overwrite=true to delete it and start over"):
        open_run_dir(str(out), "pretrain", resume=False)
    with pytest.raises(DpftError, match="holds a dpft pretrain run; a finetune run needs its own directory"):
        open_run_dir(str(out), "finetune", resume=True)
    with pytest.raises(DpftError, match="resume=true and overwrite=true contradict"):
        open_run_dir(str(out), "pretrain", resume=True, overwrite=True)
    with open_run_dir(str(out), "finetune", resume=False, overwrite=True) as rd:  # explicit: wipes the run
        assert not rd.existed
        assert sorted(os.listdir(out)) == [LOCK_FILE, RUN_MARKER]
        assert read_run_info(str(out))["kind"] == "finetune"


def test_run_written_before_run_json_is_adopted(tmp_path):
    out = tmp_path / "old"
    (out / "checkpoints" / "step_00000005").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step_00000005\n")
    (out / "config.yaml").write_text("steps: 5\n")
    with open_run_dir(str(out), "pretrain", resume=True) as rd:
        assert rd.existed and read_run_info(str(out))["kind"] == "pretrain"
    # the same names plus a foreign file are not adopted
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    (other / "notes.txt").write_text("x")
    with pytest.raises(DpftError, match="is not a dpft run directory"):
        open_run_dir(str(other), "pretrain", resume=True)


@pytest.fixture
def read_only_dir(tmp_path):
    """An empty directory this process cannot write: chmod for a normal user, a read-only bind mount for root
    (root ignores permission bits); skipped where neither is possible."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    src = tmp_path / "ro_src"
    src.mkdir()
    ok = subprocess.run(["mount", "--bind", str(src), str(d)], capture_output=True).returncode == 0
    if ok:
        ok = subprocess.run(["mount", "-o", "remount,bind,ro", str(d)], capture_output=True).returncode == 0
        if not ok:
            subprocess.run(["umount", str(d)], capture_output=True)
    if not ok:
        pytest.skip("cannot make a read-only directory as root here (no bind mounts)")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], capture_output=True)


def test_read_only_out_refused_before_any_work(read_only_dir, tmp_path, monkeypatch):
    import dpft.agents.pretrain as P
    from dpft.config import compose

    monkeypatch.setattr(P, "build_datasets", lambda *a, **k: pytest.fail("data loaded before out= was checked"))
    with pytest.raises(DpftError) as e:  # the (empty) directory itself
        P.pretrain(compose("pretrain", ["dataset=%s" % (tmp_path / "missing.hdf5"), "out=%s" % read_only_dir]))
    assert "out='%s' is not writable: creating '%s' failed: " % (read_only_dir, read_only_dir / LOCK_FILE) in str(e.value)
    with pytest.raises(DpftError) as e:  # a run directory to be created inside it
        P.pretrain(compose("pretrain", ["dataset=%s" % (tmp_path / "missing.hdf5"), "out=%s/run" % read_only_dir]))
    assert "out='%s/run' cannot be created: " % read_only_dir in str(e.value)
    assert os.listdir(read_only_dir) == []
