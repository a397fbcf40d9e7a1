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
   starts over at step 0 with or without ``resume=true``, and its ``metrics.jsonl`` is kept as
   ``metrics.restarted-<n>.jsonl`` (a note says so). A run of another kind (a pretraining run given as a
   fine-tuning ``out=``) is refused unless ``overwrite=true``. ``resume=true`` on a directory without a run is
   an error;
5. never lets ``overwrite=true`` delete the command's own inputs (``inputs``: a dataset or start checkpoint
   inside ``out=``, or ``out=`` itself) or another run's files (a directory holding a ``run.json`` below
   ``out=``): it refuses naming them, and deletes nothing (:func:`protected_paths`);
6. writes the marker ``PATH/run.json`` (``{"kind", "dpft_version", "created"}``).

Commands that write a result file or folder rather than a run (``dpft rollout`` into ``out=``, ``dpft demos`` into
``out=FILE.hdf5``) use :func:`open_output_dir` / :func:`lock_output_file`: the same lock (its file removed when
released, so nothing is left beside the outputs), and existing outputs are refused unless ``overwrite=true``.

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
from typing import Any, Callable, Collection, Dict, List, Mapping, Optional

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

    def __init__(self, path: str, kind: str, existed: bool, info: Dict[str, Any], lock_fd: Optional[int],
                 remove_lock: Optional[str] = None):
        self.path = path
        self.kind = kind
        self.existed = existed
        self.info = info
        self._fd = lock_fd
        self._remove_lock = remove_lock  # an output's lock file, deleted (while still held) on close

    @property
    def locked(self) -> bool:
        return self._fd is not None

    def close(self) -> None:
        """Release the lock (idempotent). A run's lock file stays; an output's (``dpft rollout``/``dpft demos``) is
        deleted first, which is safe because a locker retries when the file it locked was unlinked meanwhile."""
        fd, self._fd = self._fd, None
        if fd is not None:
            if self._remove_lock is not None:  # safe: a locker checks that the file it locked is still linked
                try:
                    os.remove(self._remove_lock)
                except OSError:
                    pass
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
    return _lock_file(os.path.join(path, LOCK_FILE), path, option)


def _same_file(fd: int, path: str) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _lock_file(lock_path: str, path: str, option: str, _tries: int = 20) -> Optional[int]:
    """Open and exclusively flock ``lock_path`` (the lock of ``path``) and write this process's pid into it."""
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
        if not _same_file(fd, lock_path):  # unlinked by its previous holder after we opened it: lock the new one
            os.close(fd)
            if _tries > 0:
                return _lock_file(lock_path, path, option, _tries - 1)
            raise DpftError("%s='%s' is in use by other dpft processes (its lock '%s' keeps being replaced). Wait for "
                            "them to finish, or choose another %s=." % (option, path, lock_path, option))
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


def _inside(child: str, parent: str) -> bool:
    """True when ``child`` is ``parent`` or lies below it (compared as given and with links resolved)."""
    pairs = ((os.path.abspath(child), os.path.abspath(parent)), (os.path.realpath(child), os.path.realpath(parent)))
    for c, p in pairs:
        if c == p or c.startswith(p.rstrip(os.sep) + os.sep):
            return True
    return False


def input_clashes(path: str, inputs: Optional[Mapping[str, Any]], option: str = "out") -> List[str]:
    """``["dataset='...' (inside out=)", ...]``: the inputs (``{option: path}``; None values skipped) that are
    ``path`` itself or lie inside it, so deleting ``path``'s files would delete them."""
    out = []  # type: List[str]
    for name, value in sorted((inputs or {}).items()):
        if value in (None, "") or not os.path.exists(os.path.expanduser(str(value))):
            continue
        value_path = os.path.expanduser(str(value))
        if _inside(value_path, path):
            where = "the %s= directory itself" % option if _inside(path, value_path) else "inside %s=" % option
            out.append("%s='%s' (%s)" % (name, value, where))
    return out


def nested_runs(path: str) -> List[str]:
    """Directories below ``path`` (not ``path`` itself) that hold another dpft run (a ``run.json`` marker)."""
    found = []  # type: List[str]
    for root, dirs, files in os.walk(path):
        if root != path and RUN_MARKER in files:
            found.append(root)
            dirs[:] = []  # that run's own sub-runs go with it
    return sorted(found)


def protected_paths(path: str, option: str, inputs: Optional[Mapping[str, Any]] = None) -> None:
    """Refuse (DpftError) to delete the files of ``path`` when that would delete one of the command's ``inputs``
    or another dpft run nested inside it; nothing is deleted. Called before every ``overwrite=true``."""
    clashes = input_clashes(path, inputs, option)
    if clashes:
        raise DpftError("overwrite=true would delete this command's own input %s: overwrite never deletes what a "
                        "command reads. Write the run to another %s= directory than '%s' (or move the input out of "
                        "it first)." % (" and ".join(clashes), option, path))
    runs = nested_runs(path)
    if runs:
        raise DpftError("overwrite=true would delete another dpft run inside %s='%s': %s. overwrite deletes only the "
                        "run's own files; move that run elsewhere (or delete it yourself) first, or choose another "
                        "%s= directory." % (option, path, ", ".join("'%s'" % r for r in runs[:4])
                                            + (" and %d more" % (len(runs) - 4) if len(runs) > 4 else ""), option))


def _keep_restarted_metrics(path: str) -> Optional[str]:
    """A run that stopped before its first checkpoint starts over: move its ``metrics.jsonl`` (when it holds
    records) to ``metrics.restarted-<n>.jsonl`` so nothing it logged is lost. Returns the new name or None."""
    src = os.path.join(path, "metrics.jsonl")
    try:
        if os.path.getsize(src) == 0:
            return None
    except OSError:
        return None
    n = 1
    while os.path.exists(os.path.join(path, "metrics.restarted-%d.jsonl" % n)):
        n += 1
    dst = os.path.join(path, "metrics.restarted-%d.jsonl" % n)
    os.replace(src, dst)
    return dst


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
                 known_entries: Collection[str] = RUN_ENTRIES, inputs: Optional[Mapping[str, Any]] = None) -> RunDir:
    """Create or reopen the run directory ``path`` for a run of ``kind`` and lock it (see the module doc).

    Args:
        path: the directory (``~`` expanded; created with its parents when missing).
        kind: ``"pretrain"``, ``"finetune"``, ``"quickstart"``, ... (stored in run.json; a run of another kind
            is refused).
        resume: continue the run in ``path`` (the caller restores its checkpoint).
        overwrite: delete an existing dpft run's files first (never a foreign directory's).
        option: the config key named in messages (``out``).
        known_entries: top-level names by which a directory written before run.json existed is recognized.
        inputs: ``{option: path}`` the command reads (``dataset``, ``checkpoint``); ``overwrite=true`` refuses to
            delete a directory that holds one of them (or is one), and no message suggests it then.

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
            clashes = input_clashes(path, inputs, option)
            if overwrite:
                protected_paths(path, option, inputs)
                _wipe(path, option)
                existed, info = False, None
            elif clashes:
                raise DpftError("%s='%s' holds this command's own input: %s. A run cannot be written into the "
                                "directory it reads from; choose another %s= directory." % (
                                    option, path, " and ".join(clashes), option))
            elif old_kind != kind:
                raise DpftError("%s='%s' holds a dpft %s run; a %s run needs its own directory. Choose another %s= "
                                "(or pass overwrite=true to delete that run)." % (option, path, old_kind, kind, option))
            elif ckpts and not resume:
                raise DpftError("%s='%s' already holds a %s run with checkpoints (newest: %s). Pass resume=true to "
                                "continue it, overwrite=true to delete it and start over, or choose a new %s= "
                                "directory." % (option, path, kind, os.path.basename(ckpts[-1]), option))
            elif not ckpts and "checkpoints" in known_entries:  # a trainer's run stopped before its first
                # checkpoint: it starts over; keep what it logged
                kept = _keep_restarted_metrics(path)
                print("dpft %s: note: %s='%s' holds a run that stopped before its first checkpoint; it starts over at "
                      "step 0%s." % (kind, option, path, (" (the metrics it logged are kept in '%s')"
                                                            % os.path.basename(kept)) if kept else ""), flush=True)
        if info is None:
            info = _write_marker(path, kind)
        return RunDir(path, kind, existed, info, fd)
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise


def _describe_paths(paths: List[str], limit: int = 4) -> str:
    shown = ", ".join("'%s'" % p for p in paths[:limit])
    return shown + (" and %d more" % (len(paths) - limit) if len(paths) > limit else "")


def open_output_dir(path: Any, existing: Callable[[str], List[str]], overwrite: bool, option: str = "out",
                    command: str = "dpft rollout", delete: bool = True) -> RunDir:
    """Lock the output directory ``path`` of a command that writes results rather than a run (``dpft rollout``):
    created and write-checked, then locked as :func:`open_run_dir` locks a run (a second process writing there
    gets a DpftError naming the holder; ``.dpft.lock`` is removed when released). ``existing(path)`` lists the
    earlier outputs found there (absolute file paths); they are refused unless ``overwrite=true``, which deletes
    exactly those files (nothing else; ``delete=False`` only checks, e.g. before the work is known to start).
    Returns the lock (a :class:`RunDir` of kind ``"output"``; close it when the outputs are written)."""
    path = check_writable_dir(path, option)
    fd = _lock(path, option)
    try:
        found = sorted(existing(path))
        if found and not overwrite:
            raise DpftError("%s='%s' already holds the outputs of an earlier %s: %s. Pass overwrite=true to replace "
                            "them, or choose another %s= directory." % (option, path, command,
                                                                      _describe_paths(found), option))
        for f in (found if delete else []):
            try:
                os.remove(f)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise DpftError("overwrite=true: cannot delete '%s' of %s='%s': %s." % (f, option, path,
                                                                                        _os_reason(e))) from None
        return RunDir(path, "output", bool(found), {"kind": "output"}, fd, remove_lock=os.path.join(path, LOCK_FILE))
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise


def output_lock_path(path: str) -> str:
    """The lock file of an output file: ``<dir>/.<name>.lock`` beside it."""
    return os.path.join(os.path.dirname(path), ".%s.lock" % os.path.basename(path))


def lock_output_file(path: Any, overwrite: bool, option: str = "out", command: str = "dpft demos") -> RunDir:
    """Lock the output file ``path`` of a command that writes one file (``dpft demos``): its directory is created
    and write-checked, ``<dir>/.<name>.lock`` is locked (a second process writing the same file gets a DpftError
    naming the holder; the lock file is removed when released), and an existing file is refused unless
    ``overwrite=true`` (the caller then replaces it atomically when the new file is complete, so the old one stays
    until then). Returns the lock (a
    :class:`RunDir` of kind ``"output"`` whose ``path`` is the file)."""
    path = os.path.abspath(os.path.expanduser(str(path)))
    if os.path.isdir(path):
        raise DpftError("%s='%s' is a directory; %s writes a file there: pass a file path such as "
                        "'%s'." % (option, path, command, os.path.join(path, "demos.hdf5")))
    check_writable_dir(os.path.dirname(path), option)
    fd = _lock_file(output_lock_path(path), path, option)
    try:
        existed = os.path.exists(path)
        if existed and not overwrite:
            raise DpftError("%s='%s' already exists; %s does not replace it without overwrite=true. Pass "
                            "overwrite=true to replace it, or choose another %s= file." % (option, path, command,
                                                                                          option))
        return RunDir(path, "output", existed, {"kind": "output"}, fd, remove_lock=output_lock_path(path))
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise


__all__ = ["RunDir", "open_run_dir", "open_output_dir", "lock_output_file", "protected_paths", "nested_runs",
           "input_clashes", "check_writable_dir", "read_run_info", "is_run_dir", "RUN_MARKER", "LOCK_FILE",
           "RUN_ENTRIES"]
