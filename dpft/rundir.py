"""Run directories a run owns: created and checked writable before any work, locked for the process lifetime,
never mixed with another run's or a foreign program's files.

``open_run_dir(path, kind, resume, overwrite=False)`` is called by every trainer before it loads data or builds
a model (``dpft pretrain`` uses ``kind="pretrain"``, fine-tuning ``kind="finetune"``, ``dpft quickstart``
``kind="quickstart"``). It

1. refuses a path that is a file, or a directory that cannot be created (read-only file system, ``/proc``,
   a parent that is a file, no permission), with the OS reason;
2. refuses a non-empty directory that is not a dpft run (no ``run.json``) and leaves it untouched, even with
   ``overwrite=true`` (dpft never deletes files it did not write);
3. takes an exclusive ``fcntl.flock`` on ``PATH/.dpft.lock`` and writes its pid there; the lock lives as long
   as the process (the OS drops it on exit, also on ``kill -9``, so a lock is never stale) and a second run
   into the same directory gets a DpftError naming the holder's pid;
4. refuses an existing run that holds a checkpoint unless ``resume=true`` (continue it) or ``overwrite=true``
   (delete its files and start over); a run that never wrote a checkpoint (killed before its first save)
   may be restarted without either. A run of another kind (a pretraining run given as a fine-tuning ``out=``)
   is refused unless ``overwrite=true``. ``resume=true`` on a directory without a run is an error;
5. writes the marker ``PATH/run.json`` (``{"kind", "dpft_version", "created"}``).

Directories written by dpft before ``run.json`` existed are recognized by their layout (``known_entries``)
and adopted. The lock is advisory and needs a local file system that supports ``flock`` (most network file
systems do today; where ``flock`` is not supported the run continues without a lock and says so).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import time
from typing import Any, Collection, Dict, List, Optional

from dpft.errors import DpftError

RUN_MARKER = "run.json"
LOCK_FILE = ".dpft.lock"

#: top-level names of a run directory written by dpft's trainers (adopts runs that predate run.json)
RUN_ENTRIES = frozenset(["config.yaml", "metrics.jsonl", "loss_curve.png", "checkpoints", "rollout", "wandb",
                         RUN_MARKER, LOCK_FILE])


def _os_reason(e: OSError) -> str:
    return e.strerror or str(e)


def _describe_entries(names: List[str], limit: int = 6) -> str:
    shown = ", ".join("'%s'" % n for n in sorted(names)[:limit])
    more = len(names) - limit
    return shown + (" and %d more" % more if more > 0 else "")


def read_run_info(path: str) -> Optional[Dict[str, Any]]:
    """The ``run.json`` marker of ``path`` as a dict, or None when there is none (or it is unreadable)."""
    marker = os.path.join(path, RUN_MARKER)
    try:
        with open(marker) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("kind"), str) else None


def is_run_dir(path: str) -> bool:
    """True when ``path`` holds a dpft run (a ``run.json`` marker)."""
    return read_run_info(os.path.abspath(os.path.expanduser(str(path)))) is not None


def _looks_like_old_run(path: str, entries: List[str], known: Collection[str]) -> bool:
    """A directory dpft wrote before run.json existed: only known names, and (for a trainer's run, whose known
    names include ``checkpoints``) a checkpoints/ folder holding only checkpoint names (step_*, latest, .tmp-*)."""
    if not entries or any(e not in known for e in entries):
        return False
    if "checkpoints" not in known:
        return True
    ck = os.path.join(path, "checkpoints")
    if "checkpoints" not in entries or not os.path.isdir(ck):
        return False
    return all(n.startswith(("step_", ".tmp-")) or n == "latest" for n in os.listdir(ck))


class RunDir:
    """An opened, locked run directory. ``path`` (absolute), ``kind``, ``existed`` (a run was there before:
    resumed, or restarted before its first checkpoint), ``info`` (run.json). Release with :meth:`close`
    (or use as a context manager); the OS releases it when the process ends."""

    def __init__(self, path: str, kind: str, existed: bool, info: Dict[str, Any], lock_fd: Optional[int]):
        self.path = path
        self.kind = kind
        self.existed = existed
        self.info = info
        self._fd = lock_fd

    @property
    def locked(self) -> bool:
        return self._fd is not None

    def close(self) -> None:
        """Release the lock (idempotent). The lock file stays: deleting it would let two runs lock different
        files of the same name."""
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_UN)
            except OSError:
                pass
            os.close(fd)

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # an unclosed RunDir collected: release the lock with its descriptor
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return "RunDir(%r, kind=%r, existed=%r)" % (self.path, self.kind, self.existed)


def check_writable_dir(path: Any, option: str) -> str:
    """Create directory ``path`` if needed and check a file can be written in it (DpftError naming ``option``
    and the OS reason otherwise: a file in the way, a read-only or virtual file system). Returns the path."""
    path = os.path.abspath(os.path.expanduser(str(path)))
    if os.path.exists(path) and not os.path.isdir(path):
        raise DpftError("%s='%s' is a file; it must name a directory (created if missing)." % (option, path))
    _create_dir(path, option)
    probe = os.path.join(path, ".dpft-write-test-%d" % os.getpid())
    try:
        with open(probe, "w") as f:
            f.write("x")
        os.remove(probe)
    except OSError as e:
        raise DpftError("%s='%s' is not writable: %s. Choose a writable location." % (option, path, _os_reason(e))) from None
    return path


def _create_dir(path: str, option: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        hint = ""
        if e.errno in (errno.ENOTDIR, errno.EEXIST):
            hint = " (a part of the path is a file)"
        raise DpftError("%s='%s' cannot be created: %s%s. Choose a writable location." % (
            option, path, _os_reason(e), hint)) from None


def _lock(path: str, option: str) -> Optional[int]:
    """Open and exclusively flock ``PATH/.dpft.lock`` (doubles as the writability check)."""
    lock_path = os.path.join(path, LOCK_FILE)
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise DpftError("%s='%s' is not writable: creating '%s' failed: %s. Choose a writable location for the run "
                        "directory." % (option, path, lock_path, _os_reason(e))) from None
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = _read_holder(fd)
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
            raise DpftError("%s='%s' is in use by another dpft run (%s holds '%s'). Wait for it to finish, stop it, "
                            "or choose another %s= directory." % (option, path, holder, lock_path, option)) from None
        print("dpft: warning: cannot lock '%s' (%s); two runs into this directory would not be detected."
              % (lock_path, _os_reason(e)), file=sys.stderr)
        return None
    try:  # record the holder for the message of a second run
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, ("pid %d\n" % os.getpid()).encode())
        os.fsync(fd)
    except OSError as e:
        os.close(fd)
        raise DpftError("%s='%s' is not writable: writing '%s' failed: %s. Choose a writable location for the run "
                        "directory." % (option, path, lock_path, _os_reason(e))) from None
    return fd


def _read_holder(fd: int) -> str:
    for _ in range(20):  # the holder writes its pid right after locking: wait a moment for it
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            text = os.read(fd, 100).decode("ascii", "replace").strip()
        except OSError:
            text = ""
        if text.startswith("pid "):
            return "process %s" % text[4:].strip()
        time.sleep(0.05)
    return "a process of unknown pid"


def _wipe(path: str, option: str) -> None:
    """Delete everything in a dpft run directory except its lock file (overwrite=true)."""
    for name in os.listdir(path):
        if name == LOCK_FILE:
            continue
        p = os.path.join(path, name)
        try:
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.remove(p)
        except OSError as e:
            raise DpftError("overwrite=true: cannot delete '%s' of %s='%s': %s." % (p, option, path, _os_reason(e))) from None


def _write_marker(path: str, kind: str) -> Dict[str, Any]:
    import dpft
    from dpft.checkpoint import write_text_atomic

    from dpft.sysinfo import COMPUTE_KEY, compute_environment

    info = {"kind": kind, "dpft_version": dpft.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            COMPUTE_KEY: compute_environment()}  # the thread count etc. when the run started (checkpoints: at saving)
    try:
        write_text_atomic(os.path.join(path, RUN_MARKER), json.dumps(info, indent=1) + "\n")
    except OSError as e:
        raise DpftError("'%s' is not writable: writing %s failed: %s. Choose a writable location for the run "
                        "directory." % (path, RUN_MARKER, _os_reason(e))) from None
    return info


def open_run_dir(path: Any, kind: str, resume: bool, overwrite: bool = False, option: str = "out",
                 known_entries: Collection[str] = RUN_ENTRIES) -> RunDir:
    """Create or reopen the run directory ``path`` for a run of ``kind`` and lock it (see the module doc).

    Args:
        path: the directory (``~`` expanded; created with its parents when missing).
        kind: ``"pretrain"``, ``"finetune"``, ``"quickstart"``, ... (stored in run.json; a run of another kind
            is refused).
        resume: continue the run in ``path`` (the caller restores its checkpoint).
        overwrite: delete an existing dpft run's files first (never a foreign directory's).
        option: the config key named in messages (``out``).
        known_entries: top-level names by which a directory written before run.json existed is recognized.

    Raises:
        DpftError: path is a file or not writable, the directory is foreign, locked by another process, holds a
        run that needs ``resume=true`` / ``overwrite=true``, or ``resume=true`` finds no run.
    """
    from dpft.checkpoint import list_checkpoints

    if resume and overwrite:
        raise DpftError("resume=true and overwrite=true contradict each other: resume continues the run in "
                        "%s='%s', overwrite deletes it. Pass one of them." % (option, path))
    path = os.path.abspath(os.path.expanduser(str(path)))
    if os.path.exists(path) and not os.path.isdir(path):
        raise DpftError("%s='%s' is a file; %s= must name a run directory (created if missing)." % (option, path, option))
    entries = []  # type: List[str]
    if os.path.isdir(path):
        try:
            entries = [e for e in os.listdir(path) if e != LOCK_FILE]
        except OSError as e:
            raise DpftError("%s='%s' cannot be read: %s." % (option, path, _os_reason(e))) from None
    info = read_run_info(path) if entries else None
    if entries and info is None and RUN_MARKER not in entries and not _looks_like_old_run(path, entries, known_entries):
        raise DpftError("%s='%s' is not empty and is not a dpft run directory (no %s; it holds %s). dpft does not "
                        "write into or delete other files, also not with overwrite=true: choose a new or empty "
                        "directory." % (option, path, RUN_MARKER, _describe_entries(entries)))
    if resume and not entries:
        raise DpftError("resume=true but %s='%s' holds no run to resume%s. Start without resume=true, or point %s= "
                        "at the run directory." % (option, path, "" if os.path.isdir(path) else " (it does not exist)",
                                                   option))
    _create_dir(path, option)
    fd = _lock(path, option)
    try:
        existed = bool(entries)
        if existed:
            info = read_run_info(path)  # again, under the lock
            old_kind = info["kind"] if info is not None else kind
            ckpts = list_checkpoints(path)
            if overwrite:
                _wipe(path, option)
                existed, info = False, None
            elif old_kind != kind:
                raise DpftError("%s='%s' holds a dpft %s run; a %s run needs its own directory. Choose another %s= "
                                "(or pass overwrite=true to delete that run)." % (option, path, old_kind, kind, option))
            elif ckpts and not resume:
                raise DpftError("%s='%s' already holds a %s run with checkpoints (newest: %s). Pass resume=true to "
                                "continue it, overwrite=true to delete it and start over, or choose a new %s= "
                                "directory." % (option, path, kind, os.path.basename(ckpts[-1]), option))
        if info is None:
            info = _write_marker(path, kind)
        return RunDir(path, kind, existed, info, fd)
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise


__all__ = ["RunDir", "open_run_dir", "check_writable_dir", "read_run_info", "is_run_dir", "RUN_MARKER", "LOCK_FILE", "RUN_ENTRIES"]
