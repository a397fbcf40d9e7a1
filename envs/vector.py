"""Vector env: ``num_envs`` :class:`~dpft.envs.base.Env` instances behind the :class:`~dpft.envs.base.BatchedEnv` API.

Two modes:

* ``mode="process"``: one worker process per env (more envs than cores is fine; they time-share). Workers
  are started with ``forkserver`` (default) or ``spawn``, never ``fork``, and each worker builds its own env
  from a picklable zero-argument factory, so no OpenGL context or simulator is ever created in the parent
  (forked GL contexts segfault). Workers start with the parent's environment as it was when the VectorEnv
  was built (also under forkserver, whose server may be older), run with one BLAS/OpenMP/torch thread and
  ignore SIGINT (Ctrl-C is handled by the parent, which closes them).
* ``mode="inline"``: the envs run in this process, one after the other (cheap envs such as gymnasium MuJoCo,
  where inter-process communication costs more than the simulation).

Each worker executes a whole action chunk per command, so one chunk is one round trip; it keeps the
observation history itself and, with ``auto_reset``, resets in the same round trip when its episode ends.

Observation history: ``cond_steps`` observations, current one last; right after a reset the history is the
first observation repeated ``cond_steps`` times (front padding, as in the training windows).

Chunk stepping: the actions of a chunk ``(act_steps, Da)`` are executed in order until the episode ends
(terminated or truncated); the remaining actions are dropped. ``reward`` is the sum over executed steps and
``info["steps"]`` the number executed.

Seeds (one stream per env): ``reset(seeds)`` starts env ``i`` with ``seeds[i]``; the ``k``-th automatic or
stream reset after that (``k = 1, 2, ...``) uses ``seeds[i] + k * num_envs``. With ``seeds = base + i`` the
episodes of all envs therefore get the distinct seeds ``base, base + 1, base + 2, ...``.
``reset(None)`` continues every env's stream (starting the streams at ``0..N-1`` on the first call).
``reset_envs(indices, seeds)`` resets chosen envs with explicit seeds and leaves their streams untouched.

Episode bookkeeping: every finished episode (ended by the env, or cut by a worker failure) appears once in
``StepResult.info["episodes"]`` as a dict with ``env``, ``seed``, ``return``, ``length``, ``success``
(sticky: reached at any step of the episode), ``terminated``, ``truncated``, ``failed``, ``reason`` and,
when the episode was recorded, ``frames`` (uint8 ``(T, H, W, 3)``: the frame after the reset, then one per
env step, so ``T = length + 1`` when recording was on for the whole episode).

Fault tolerance: a worker that dies (EOF / broken pipe / exit) or does not answer within ``worker_timeout_s``
is killed and restarted (its env is rebuilt); an env that raises inside ``step`` or returns a non-finite
observation is reset. Either way the current episode is reported as failed (``failed=True``,
``truncated=True``, a ``reason`` such as ``"worker 3 (pid 123) died (exit code -9) at env step 57 of the
episode with seed 7"``), ``final_obs`` holds the last good history, and the env continues with the next seed
of its stream. An env that fails ``max_consecutive_failures`` times in a row without completing a chunk
raises :class:`WorkerError` instead of looping forever.

Shapes: ``obs`` ``{key: (N, To, *shape)}``; action chunk ``(N, act_steps, Da)``.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import signal
import sys
import time
import traceback
from collections import deque
from multiprocessing.connection import wait as _mp_wait
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from dpft.errors import DpftError
from dpft.envs.base import BatchedEnv, Env, ObsDict, StepResult

_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")
_CONNECTION_ERRORS = (EOFError, BrokenPipeError, ConnectionResetError, ConnectionAbortedError, OSError)


class WorkerError(RuntimeError):
    """An env worker failed in a way the vector env cannot recover from (build/reset error, repeated
    failures); the message carries the worker's traceback."""


# ---------------------------------------------------------------------------------------------------------
# The per-env logic, shared by worker processes and inline mode.
# ---------------------------------------------------------------------------------------------------------
class _EnvRunner:
    """Owns one :class:`Env`: history of ``cond_steps`` observations, chunk execution, frame recording."""

    def __init__(self, env: Env, cond_steps: int):
        for name in ("obs_shapes", "obs_dtypes", "action_dim", "max_episode_steps"):
            if not hasattr(env, name):
                raise DpftError(
                    "The env built by the factory (%s) has no attribute '%s'; an dpft.envs.base.Env must define "
                    "obs_shapes, obs_dtypes, action_dim and max_episode_steps." % (type(env).__name__, name))
        self.env = env
        self.cond_steps = int(cond_steps)
        self.keys = list(env.obs_shapes)
        self.dtypes = {k: np.dtype(env.obs_dtypes[k]) for k in self.keys}
        self.shapes = {k: tuple(int(s) for s in env.obs_shapes[k]) for k in self.keys}
        self.history: deque = deque(maxlen=self.cond_steps)
        self.recording = False
        self.size = (256, 256)
        self.camera: Optional[str] = None
        self.frames: List[np.ndarray] = []
        self.steps = 0
        self.has_reset = False

    def spec(self) -> Dict[str, Any]:
        return {
            "obs_shapes": dict(self.shapes),
            "obs_dtypes": {k: self.dtypes[k].str for k in self.keys},
            "action_dim": int(self.env.action_dim),
            "max_episode_steps": int(self.env.max_episode_steps),
            "pid": os.getpid(),
        }

    def _convert(self, obs: ObsDict) -> Tuple[ObsDict, Optional[str]]:
        """Copy ``obs`` into the declared dtypes/shapes; return it and the first key holding a non-finite
        value (None when all finite)."""
        out = {}
        bad = None
        for k in self.keys:
            if k not in obs:
                raise DpftError("The env returned an observation without key '%s' (it returned %s); the keys "
                                "must match its obs_shapes %s." % (k, sorted(obs), self.keys))
            v = np.array(obs[k], dtype=self.dtypes[k], copy=True)
            if v.shape != self.shapes[k]:
                raise DpftError("The env returned observation '%s' of shape %s, but its obs_shapes declares %s."
                                % (k, v.shape, self.shapes[k]))
            if bad is None and v.dtype.kind == "f" and not np.isfinite(v).all():
                bad = k
            out[k] = v
        return out, bad

    def history_arrays(self) -> ObsDict:
        return {k: np.stack([o[k] for o in self.history]) for k in self.keys}

    def _frame(self) -> np.ndarray:
        frame = np.asarray(self.env.render(height=self.size[0], width=self.size[1], camera=self.camera))
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise DpftError("env.render must return a uint8 (H, W, 3) frame, got %s %s."
                            % (frame.dtype, frame.shape))
        return frame

    def reset(self, seed: Optional[int]) -> ObsDict:
        obs, bad = self._convert(self.env.reset(seed=seed))
        if bad is not None:
            raise WorkerError("env.reset(seed=%s) returned a non-finite value in observation '%s'." % (seed, bad))
        self.history.clear()
        for _ in range(self.cond_steps):
            self.history.append(obs)
        self.steps = 0
        self.has_reset = True
        self.frames = [self._frame()] if self.recording else []
        return self.history_arrays()

    def set_recording(self, on: bool, size: Tuple[int, int], camera: Optional[str]) -> None:
        was_on = self.recording
        self.recording = bool(on)
        self.size = (int(size[0]), int(size[1]))
        self.camera = camera
        if not self.recording:
            self.frames = []
        elif not was_on and self.has_reset and self.steps == 0:
            self.frames = [self._frame()]

    def step_chunk(self, actions: np.ndarray, reset: bool, seed: Optional[int]) -> Dict[str, Any]:
        reward = 0.0
        n = 0
        terminated = truncated = success = False
        nonfinite = None
        for a in actions:
            obs, r, term, trunc, info = self.env.step(a)
            n += 1
            self.steps += 1
            obs, nonfinite = self._convert(obs)
            if nonfinite is not None:
                nonfinite = "non-finite value in observation '%s' at env step %d" % (nonfinite, self.steps)
                truncated = True
                break
            if not np.isfinite(r):  # a diverged simulator: cut the episode, keep the return finite
                nonfinite = "non-finite reward %r at env step %d" % (float(r), self.steps)
                truncated = True
                break
            reward += float(r)
            success = success or bool(info.get("success", False))
            self.history.append(obs)
            if self.recording:
                self.frames.append(self._frame())
            if term or trunc:
                terminated, truncated = bool(term), bool(trunc) and not bool(term)
                break
        out: Dict[str, Any] = {"reward": reward, "steps": n, "terminated": terminated, "truncated": truncated,
                               "success": success, "nonfinite": nonfinite, "frames": None}
        hist = self.history_arrays()
        if terminated or truncated:
            if self.recording and self.frames:
                out["frames"] = np.stack(self.frames)
            self.frames = []
            out["final_obs"] = hist
            out["obs"] = self.reset(seed) if reset else hist
        else:
            out["obs"] = hist
        return out

    def handle(self, cmd: str, payload: Any) -> Any:
        if cmd == "step":
            return self.step_chunk(payload["actions"], payload["reset"], payload["seed"])
        if cmd == "reset":
            return self.reset(payload)
        if cmd == "set_recording":
            return self.set_recording(*payload)
        if cmd == "render":
            height, width, camera = payload
            return np.asarray(self.env.render(height=height, width=width, camera=camera))
        if cmd == "get_state":
            return self.env.get_state()
        if cmd == "ping":
            return os.getpid()
        raise ValueError("unknown vector-env command %r" % (cmd,))

    def close(self) -> None:
        self.env.close()


def _error_payload(exc: BaseException) -> Dict[str, Any]:
    return {"type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc(),
            "dpft": isinstance(exc, DpftError)}


def _limit_threads() -> None:
    for var in _THREAD_VARS:
        os.environ[var] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def _worker_main(conn, fn_bytes: bytes, cond_steps: int, environ: Dict[str, str]) -> None:
    """Worker process body: build the env, answer ``("ok", spec)``, then serve commands until ``close``.

    ``environ`` is the parent's environment when the vector env was built: a forkserver child would otherwise
    see the environment of the moment the forkserver started (e.g. without a ``MUJOCO_GL`` chosen later).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.update(environ)
    _limit_threads()
    try:
        env_fn = pickle.loads(fn_bytes)
        runner = _EnvRunner(env_fn(), cond_steps)
        _limit_threads()  # the factory may have imported torch
        conn.send(("ok", runner.spec()))
    except BaseException as exc:  # report anything, including SystemExit from a factory
        with contextlib.suppress(*_CONNECTION_ERRORS):
            conn.send(("error", _error_payload(exc)))
        return
    while True:
        try:
            cmd, payload = conn.recv()
        except _CONNECTION_ERRORS:
            break  # the parent is gone
        if cmd == "close":
            with contextlib.suppress(Exception):
                runner.close()
            with contextlib.suppress(*_CONNECTION_ERRORS):
                conn.send(("ok", None))
            break
        try:
            reply = ("ok", runner.handle(cmd, payload))
        except Exception as exc:
            reply = ("error", _error_payload(exc))
        try:
            conn.send(reply)
        except _CONNECTION_ERRORS:
            break


# ---------------------------------------------------------------------------------------------------------
# Handles: one per env; same interface in both modes.
# ---------------------------------------------------------------------------------------------------------
class _InlineHandle:
    def __init__(self, env_fn: Callable[[], Env], cond_steps: int):
        self.runner = _EnvRunner(env_fn(), cond_steps)
        self.pid = os.getpid()
        self._reply: Optional[Tuple[str, Any]] = None

    def spec(self) -> Dict[str, Any]:
        return self.runner.spec()

    def send(self, cmd: str, payload: Any) -> None:
        try:
            self._reply = ("ok", self.runner.handle(cmd, payload))
        except Exception as exc:
            self._reply = ("error", _error_payload(exc))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.runner.close()


class _ProcessHandle:
    def __init__(self, ctx, fn_bytes: bytes, cond_steps: int, index: int, environ: Dict[str, str]):
        self.index = index
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        self.conn = parent_conn
        self.process = ctx.Process(target=_worker_main, args=(child_conn, fn_bytes, cond_steps, environ),
                                   name="dpft-env-%d" % index, daemon=True)
        with _single_thread_environ():
            self.process.start()
        child_conn.close()
        self.pid = self.process.pid

    def send(self, cmd: str, payload: Any) -> Optional[str]:
        """Send a command; return a failure description when the pipe is broken."""
        try:
            self.conn.send((cmd, payload))
            return None
        except _CONNECTION_ERRORS as exc:
            return "pipe broken (%s)" % type(exc).__name__

    def exit_description(self) -> str:
        self.process.join(timeout=1.0)
        code = self.process.exitcode
        if code is None:
            return "closed its pipe"
        text = "died (exit code %s)" % code
        if code < 0 and code != -signal.SIGSEGV:
            try:
                text += " [killed by signal %d, %s]" % (-code, signal.Signals(-code).name)
            except ValueError:
                pass
        if code == -signal.SIGSEGV:
            text += " [a segmentation fault, often OpenGL: check MUJOCO_GL and `dpft info`]"
        return text

    def kill(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(Exception):
                self.process.kill()
        self.process.join(timeout=5.0)
        with contextlib.suppress(Exception):
            self.conn.close()

    def close(self, timeout: float = 2.0) -> None:
        if self.process.is_alive() and self.send("close", None) is None:
            self.process.join(timeout=timeout)
        self.kill()


@contextlib.contextmanager
def _single_thread_environ():
    """Set the BLAS/OpenMP thread variables to 1 while a worker (or the forkserver) is started, so that the
    child imports numpy/torch single-threaded."""
    old = {v: os.environ.get(v) for v in _THREAD_VARS}
    for v in _THREAD_VARS:
        os.environ[v] = "1"
    try:
        yield
    finally:
        for v, val in old.items():
            if val is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = val


# ---------------------------------------------------------------------------------------------------------
# The vector env.
# ---------------------------------------------------------------------------------------------------------
class VectorEnv(BatchedEnv):
    """``len(env_fns)`` envs stepped one action chunk at a time (see the module docstring for the rules).

    Args:
        env_fns: zero-argument callables returning an :class:`~dpft.envs.base.Env` (for process mode they must
            be picklable, e.g. :class:`dpft.envs.registry.EnvFactory` or a ``functools.partial``).
        cond_steps: observation history length To.
        act_steps: actions per chunk.
        mode: ``"process"`` (one worker process per env) or ``"inline"`` (in this process).
        worker_timeout_s: a worker that does not answer a command within this many seconds is killed and
            restarted (building an env and its first reset get the same limit).
        context: multiprocessing start method, ``"forkserver"`` or ``"spawn"`` (``fork`` is refused).
        max_consecutive_failures: an env failing this many times in a row raises :class:`WorkerError`.

    Extra methods beyond :class:`BatchedEnv`: :meth:`reset_envs`, :meth:`set_recording`, :meth:`render`,
    :meth:`get_state`, :attr:`worker_pids`; :meth:`step` also takes ``active`` and ``auto_reset``.
    """

    def __init__(
        self,
        env_fns: Sequence[Callable[[], Env]],
        cond_steps: int = 1,
        act_steps: int = 1,
        mode: str = "process",
        worker_timeout_s: float = 120.0,
        context: str = "forkserver",
        max_consecutive_failures: int = 3,
    ):
        self._closed = True  # until construction succeeds
        env_fns = list(env_fns)
        if not env_fns:
            raise DpftError("VectorEnv needs at least one env factory; env_fns is empty.")
        for name, value in (("cond_steps", cond_steps), ("act_steps", act_steps),
                            ("max_consecutive_failures", max_consecutive_failures)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise DpftError("VectorEnv %s must be an integer >= 1, got %r." % (name, value))
        if mode not in ("process", "inline"):
            raise DpftError("VectorEnv mode must be 'process' or 'inline', got %r." % (mode,))
        if not float(worker_timeout_s) > 0:
            raise DpftError("VectorEnv worker_timeout_s must be > 0, got %r." % (worker_timeout_s,))
        self.num_envs = len(env_fns)
        self.cond_steps = int(cond_steps)
        self.act_steps = int(act_steps)
        self.mode = mode
        self.worker_timeout_s = float(worker_timeout_s)
        self.max_consecutive_failures = int(max_consecutive_failures)
        self._env_fns = env_fns
        self._handles: List[Any] = [None] * self.num_envs
        if mode == "process":
            if context not in ("forkserver", "spawn"):
                raise DpftError("VectorEnv context must be 'forkserver' or 'spawn' (fork breaks OpenGL and "
                                "torch in the workers), got %r." % (context,))
            if context not in mp.get_all_start_methods():
                context = "spawn"
            self._ctx = mp.get_context(context)
            self._environ = dict(os.environ)
            self._fn_bytes = []
            for i, fn in enumerate(env_fns):
                try:
                    self._fn_bytes.append(pickle.dumps(fn, protocol=pickle.HIGHEST_PROTOCOL))
                except Exception as exc:
                    raise DpftError(
                        "env_fns[%d] (%r) cannot be pickled (%s: %s); process mode sends each factory to its "
                        "worker, so use a picklable factory such as dpft.envs.registry.EnvFactory or "
                        "functools.partial of a module-level class, or mode='inline'."
                        % (i, fn, type(exc).__name__, exc)) from None
        self.context = context if mode == "process" else None

        n = self.num_envs
        self._first_seed = list(range(n))
        self._stream_k = [0] * n
        self._seeded = False
        self._ep_seed: List[Optional[int]] = [None] * n
        self._ep_return = np.zeros(n, dtype=np.float64)
        self._ep_length = np.zeros(n, dtype=np.int64)
        self._ep_success = np.zeros(n, dtype=bool)
        self._needs_reset = np.ones(n, dtype=bool)
        self._fail_streak = [0] * n
        self._recording: List[Tuple[bool, Tuple[int, int], Optional[str]]] = [(False, (256, 256), None)] * n
        self._hist: List[Optional[ObsDict]] = [None] * n
        self._closed = False
        try:
            specs = self._start_all()
        except BaseException:
            self.close()
            raise
        spec0 = specs[0]
        for i, spec in enumerate(specs[1:], start=1):
            for name in ("obs_shapes", "obs_dtypes", "action_dim"):
                if spec[name] != spec0[name]:
                    self.close()
                    raise DpftError("VectorEnv envs disagree: env 0 has %s=%r but env %d has %r; all env_fns "
                                    "must build the same kind of env." % (name, spec0[name], i, spec[name]))
        self.obs_shapes: Dict[str, Tuple[int, ...]] = {k: tuple(v) for k, v in spec0["obs_shapes"].items()}
        self.obs_dtypes: Dict[str, np.dtype] = {k: np.dtype(v) for k, v in spec0["obs_dtypes"].items()}
        self.action_dim = int(spec0["action_dim"])
        self.max_episode_steps = int(spec0["max_episode_steps"])

    # -- worker management -------------------------------------------------------------------------------
    @property
    def worker_pids(self) -> List[int]:
        """Process id of each env's worker (this process's id in inline mode)."""
        return [h.pid for h in self._handles]

    def _start_all(self) -> List[Dict[str, Any]]:
        if self.mode == "inline":
            specs = []
            for i, fn in enumerate(self._env_fns):
                self._handles[i] = _InlineHandle(fn, self.cond_steps)
                specs.append(self._handles[i].spec())
            return specs
        for i in range(self.num_envs):
            self._handles[i] = _ProcessHandle(self._ctx, self._fn_bytes[i], self.cond_steps, i, self._environ)
        replies = self._gather(list(range(self.num_envs)), "starting")
        for i in range(self.num_envs):
            if replies[i][0] == "dead":  # killed (OOM killer, a signal) or hung while building: no traceback to show
                raise DpftError(
                    "Env worker %d died while building its environment (%s), so no episode ran. A worker killed by "
                    "signal 9 (SIGKILL) is usually the kernel's out-of-memory killer: run fewer parallel "
                    "environments (envs=) or free memory, then run the command again." % (i, replies[i][1]))
        return [self._unwrap(i, replies[i], "build its env") for i in range(self.num_envs)]

    def _restart(self, i: int) -> None:
        """Kill env ``i``'s worker (if any) and start a fresh one with a freshly built env."""
        old = self._handles[i]
        if self.mode == "inline":
            old.close()
            self._handles[i] = _InlineHandle(self._env_fns[i], self.cond_steps)
        else:
            old.kill()
            self._handles[i] = _ProcessHandle(self._ctx, self._fn_bytes[i], self.cond_steps, i, self._environ)
            self._unwrap(i, self._gather([i], "restarting")[i], "rebuild its env after a failure")
        on, size, camera = self._recording[i]
        if on:
            self._call(i, "set_recording", (on, size, camera), "restore recording")

    def _gather(self, indices: List[int], what: str) -> Dict[int, Tuple[str, Any]]:
        """Collect one reply from each worker in ``indices``: ``("ok", value)``, ``("error", payload)`` for
        an exception in the env, or ``("dead", description)`` for a dead/unresponsive worker."""
        replies: Dict[int, Tuple[str, Any]] = {}
        if self.mode == "inline":
            for i in indices:
                replies[i] = self._handles[i]._reply
                self._handles[i]._reply = None
            return replies
        pending = {}
        for i in indices:
            h = self._handles[i]
            pending[h.conn] = i
            pending[h.process.sentinel] = i
        deadline = time.monotonic() + self.worker_timeout_s
        waiting = set(indices)
        while waiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            ready = _mp_wait([obj for obj, i in pending.items() if i in waiting], timeout=remaining)
            for obj in ready:
                i = pending[obj]
                if i not in waiting:
                    continue
                h = self._handles[i]
                try:
                    if h.conn.poll():
                        replies[i] = h.conn.recv()
                        waiting.discard(i)
                    elif not h.process.is_alive():
                        replies[i] = ("dead", "worker %d (pid %d) %s" % (i, h.pid, h.exit_description()))
                        waiting.discard(i)
                except _CONNECTION_ERRORS:
                    replies[i] = ("dead", "worker %d (pid %d) %s" % (i, h.pid, h.exit_description()))
                    waiting.discard(i)
        for i in waiting:
            h = self._handles[i]
            replies[i] = ("dead", "worker %d (pid %d) did not answer within %.1f s while %s (killed)"
                          % (i, h.pid, self.worker_timeout_s, what))
            h.kill()
        return replies

    def _send_many(self, cmds: Dict[int, Tuple[str, Any]]) -> Dict[int, Tuple[str, Any]]:
        """Send one command per env and gather the replies (all workers work in parallel)."""
        broken: Dict[int, Tuple[str, Any]] = {}
        if self.mode == "inline":
            self._prestep_batched(cmds)
        for i, (cmd, payload) in cmds.items():
            err = self._handles[i].send(cmd, payload)
            if err is not None:
                h = self._handles[i]
                broken[i] = ("dead", "worker %d (pid %d) %s; %s" % (i, h.pid, h.exit_description(), err))
        what = "running '%s'" % next(iter(cmds.values()))[0] if cmds else ""
        replies = self._gather([i for i in cmds if i not in broken], what)
        replies.update(broken)
        return replies

    def _prestep_batched(self, cmds: Dict[int, Tuple[str, Any]]) -> None:
        """Inline envs that share a batched simulator (``env.prestep_group``, the mujoco backend) step their action
        chunks together first; each env's own steps then replay the results (recording envs step on their own)."""
        groups: Dict[int, List[int]] = {}
        for i, (cmd, payload) in cmds.items():
            runner = self._handles[i].runner
            if cmd == "step" and not runner.recording and getattr(runner.env, "prestep_group", None) is not None:
                groups.setdefault(id(getattr(runner.env.prestep_group, "__self__", runner.env)), []).append(i)
        for members in groups.values():
            envs = [self._handles[i].runner.env for i in members]
            try:
                envs[0].prestep_group(envs, [cmds[i][1]["actions"] for i in members])
            except Exception:  # each env then steps (and reports the failure) on its own
                for env in envs:
                    env.clear_prestep()

    def _unwrap(self, i: int, reply: Tuple[str, Any], what: str) -> Any:
        status, value = reply
        if status == "ok":
            return value
        if status == "error":
            if value["dpft"]:
                raise DpftError(value["message"])
            raise WorkerError("env %d failed to %s: %s: %s\nworker traceback:\n%s"
                              % (i, what, value["type"], value["message"], value["traceback"]))
        raise WorkerError("env %d failed to %s: %s." % (i, what, value))

    def _call(self, i: int, cmd: str, payload: Any, what: str) -> Any:
        """One command to one env; errors raise (a dead worker is restarted first)."""
        self._check_open()
        reply = self._send_many({i: (cmd, payload)})[i]
        if reply[0] == "dead":
            self._restart(i)
            self._needs_reset[i] = True
        return self._unwrap(i, reply, what)

    def _check_open(self) -> None:
        if self._closed:
            raise DpftError("This VectorEnv is closed; build a new one.")

    # -- seeds and resets --------------------------------------------------------------------------------
    def _stream_seed(self, i: int) -> int:
        seed = self._first_seed[i] + self._stream_k[i] * self.num_envs
        self._stream_k[i] += 1
        return seed

    @staticmethod
    def _check_seed(seed: Any, where: str) -> int:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise DpftError("%s must be a non-negative integer seed, got %r." % (where, seed))
        return int(seed)

    def _begin_episode(self, i: int, seed: int, hist: ObsDict) -> None:
        self._ep_seed[i] = seed
        self._ep_return[i] = 0.0
        self._ep_length[i] = 0
        self._ep_success[i] = False
        self._needs_reset[i] = False
        self._hist[i] = hist

    def _reset_indices(self, indices: List[int], seeds: List[int]) -> None:
        replies = self._send_many({i: ("reset", s) for i, s in zip(indices, seeds)})
        for i, s in zip(indices, seeds):
            if replies[i][0] == "dead":  # one retry with a fresh worker
                self._restart(i)
                replies[i] = self._send_many({i: ("reset", s)})[i]
            self._begin_episode(i, s, self._unwrap(i, replies[i], "reset with seed %d" % s))

    def reset(self, seeds: Optional[List[int]] = None) -> ObsDict:
        """Reset every env (env ``i`` with ``seeds[i]``, which also restarts its seed stream) and return
        histories ``{key: (N, To, *shape)}``. ``seeds=None`` continues each env's stream."""
        self._check_open()
        if seeds is None:
            if not self._seeded:
                self._first_seed, self._stream_k, self._seeded = list(range(self.num_envs)), [0] * self.num_envs, True
            seeds = [self._stream_seed(i) for i in range(self.num_envs)]
        else:
            seeds = list(seeds)
            if len(seeds) != self.num_envs:
                raise DpftError("VectorEnv.reset got %d seeds for %d envs; pass one seed per env."
                                % (len(seeds), self.num_envs))
            seeds = [self._check_seed(s, "seeds[%d]" % i) for i, s in enumerate(seeds)]
            self._first_seed, self._stream_k, self._seeded = list(seeds), [1] * self.num_envs, True
        self._reset_indices(list(range(self.num_envs)), seeds)
        return self._batched_obs()

    def reset_envs(self, env_indices: Sequence[int], seeds: Optional[Sequence[int]] = None) -> ObsDict:
        """Reset only the envs in ``env_indices`` (in parallel), with explicit ``seeds`` (their seed streams are
        left as they are) or, when None, the next seed of each env's stream. Returns all histories."""
        self._check_open()
        indices = [int(i) for i in env_indices]
        for i in indices:
            if not 0 <= i < self.num_envs:
                raise DpftError("reset_envs: env index %d is out of range for %d envs." % (i, self.num_envs))
        if seeds is None:
            if not self._seeded:
                self._first_seed, self._stream_k, self._seeded = list(range(self.num_envs)), [0] * self.num_envs, True
            seed_list = [self._stream_seed(i) for i in indices]
        else:
            if len(seeds) != len(indices):
                raise DpftError("reset_envs got %d seeds for %d env indices." % (len(seeds), len(indices)))
            seed_list = [self._check_seed(s, "seeds[%d]" % j) for j, s in enumerate(seeds)]
        if indices:
            self._reset_indices(indices, seed_list)
        return self._batched_obs()

    # -- stepping ----------------------------------------------------------------------------------------
    def _batched_obs(self) -> ObsDict:
        """Current histories ``{key: (N, To, *shape)}``; rows of envs never reset are zeros."""
        out = {}
        for k, shape in self.obs_shapes.items():
            arr = np.zeros((self.num_envs, self.cond_steps) + tuple(shape), dtype=self.obs_dtypes[k])
            for i, hist in enumerate(self._hist):
                if hist is not None:
                    arr[i] = hist[k]
            out[k] = arr
        return out

    def _check_chunk(self, action_chunk: Any, active: np.ndarray) -> np.ndarray:
        chunk = np.asarray(action_chunk)
        expected = (self.num_envs, self.act_steps, self.action_dim)
        if chunk.shape != expected:
            raise DpftError("VectorEnv.step expects an action chunk of shape (num_envs, act_steps, action_dim) "
                            "= %s, got %s." % (expected, chunk.shape))
        if chunk.dtype.kind not in "fiu":
            raise DpftError("VectorEnv.step expects a numeric action chunk, got dtype %s." % chunk.dtype)
        bad = [i for i in np.flatnonzero(active) if not np.isfinite(chunk[i]).all()]
        if bad:
            raise DpftError("The policy produced non-finite (NaN/inf) actions for env(s) %s on finite observations; "
                            "an environment cannot step with them. Check the checkpoint's weights and normalizer "
                            "(loading one refuses NaN/inf tensors) and the sampling settings." % bad)
        return chunk

    def step(self, action_chunk: np.ndarray, active: Optional[np.ndarray] = None,
             auto_reset: bool = True) -> StepResult:
        """Execute ``action_chunk`` ``(N, act_steps, Da)`` in the envs where ``active`` (``(N,)`` bool,
        default all) is set; inactive envs are not stepped (reward 0, ``steps`` 0, obs unchanged).

        With ``auto_reset`` an env whose episode ends is reset with the next seed of its stream in the same
        round trip and ``obs`` holds the new episode's first history. Without it the env is held: ``obs``
        equals ``final_obs`` for that row, ``info["needs_reset"]`` is set, and it must be reset with
        :meth:`reset_envs` before it is stepped again.
        """
        self._check_open()
        n = self.num_envs
        active = np.ones(n, dtype=bool) if active is None else np.asarray(active, dtype=bool).reshape(-1)
        if active.shape != (n,):
            raise DpftError("VectorEnv.step: active must have shape (%d,), got %s." % (n, active.shape))
        chunk = self._check_chunk(action_chunk, active)
        indices = [int(i) for i in np.flatnonzero(active)]
        held = [i for i in indices if self._needs_reset[i]]
        if held:
            raise DpftError("VectorEnv.step: env(s) %s ended their episode (or were never reset) and must be "
                            "reset with reset()/reset_envs() before stepping them again." % held)

        # Seeds for the resets that may happen inside this round trip; consumed only when used.
        next_seed = {i: self._first_seed[i] + self._stream_k[i] * n for i in indices} if auto_reset else {}
        replies = self._send_many({i: ("step", {"actions": chunk[i], "reset": bool(auto_reset),
                                                "seed": next_seed.get(i)}) for i in indices})

        reward = np.zeros(n, dtype=np.float32)
        terminated = np.zeros(n, dtype=bool)
        truncated = np.zeros(n, dtype=bool)
        success = self._ep_success.copy()
        steps = np.zeros(n, dtype=np.int64)
        failed = np.zeros(n, dtype=bool)
        nan_resets = np.zeros(n, dtype=bool)
        fail_reason: List[Optional[str]] = [None] * n
        episode_return = np.full(n, np.nan)
        episode_length = np.full(n, -1, dtype=np.int64)
        finals: Dict[int, ObsDict] = {}
        episodes: List[Dict[str, Any]] = []

        for i in indices:
            status, value = replies[i]
            frames = None
            if status == "ok":
                steps[i] = value["steps"]
                reward[i] = value["reward"]
                self._ep_return[i] += value["reward"]
                self._ep_length[i] += value["steps"]
                self._ep_success[i] |= bool(value["success"])
                success[i] = self._ep_success[i]
                if value["nonfinite"] is not None:
                    nan_resets[i] = failed[i] = True
                    fail_reason[i] = "env %d returned a %s of the episode with seed %s" % (
                        i, value["nonfinite"], self._ep_seed[i])
                    self._fail_streak[i] += 1
                else:
                    self._fail_streak[i] = 0
                if not (value["terminated"] or value["truncated"]):
                    self._hist[i] = value["obs"]
                    continue
                terminated[i], truncated[i] = value["terminated"], value["truncated"]
                frames = value["frames"]
                finals[i] = value["final_obs"]
            else:
                failed[i] = truncated[i] = True
                self._fail_streak[i] += 1
                if status == "dead":
                    fail_reason[i] = "%s at env step %d of the episode with seed %s" % (
                        value, self._ep_length[i], self._ep_seed[i])
                else:
                    fail_reason[i] = "env %d raised %s: %s at env step %d of the episode with seed %s" % (
                        i, value["type"], value["message"], self._ep_length[i], self._ep_seed[i])
                finals[i] = self._hist[i]
            if failed[i]:  # an episode cut by a fault is not a success, whatever it reached before (as FurnitureEnv)
                self._ep_success[i] = False
                success[i] = False
            if self._fail_streak[i] >= self.max_consecutive_failures:
                raise WorkerError("env %d failed %d times in a row; last failure: %s"
                                  % (i, self._fail_streak[i], fail_reason[i]))
            episode_return[i] = self._ep_return[i]
            episode_length[i] = self._ep_length[i]
            record = {"env": i, "seed": self._ep_seed[i], "return": float(self._ep_return[i]),
                      "length": int(self._ep_length[i]), "success": bool(self._ep_success[i]),
                      "terminated": bool(terminated[i]), "truncated": bool(truncated[i]),
                      "failed": bool(failed[i]), "reason": fail_reason[i]}
            if frames is not None:
                record["frames"] = frames
            episodes.append(record)
            self._needs_reset[i] = True
            self._hist[i] = finals[i]
            if status == "dead":
                self._restart(i)
            if not auto_reset:
                continue
            seed = self._stream_seed(i)
            if status == "ok":
                self._begin_episode(i, seed, value["obs"])  # the worker already reset with this seed
            else:
                self._reset_indices([i], [seed])

        obs = self._batched_obs()
        final_obs = obs  # the same arrays when no episode ended (the common case): no per-chunk copy
        if finals:
            final_obs = {k: v.copy() for k, v in obs.items()}
            for i, hist in finals.items():
                for k in final_obs:
                    final_obs[k][i] = hist[k]
        info: Dict[str, Any] = {
            "steps": steps, "failed": failed, "fail_reason": fail_reason, "nan_resets": nan_resets,
            "episode_return": episode_return, "episode_length": episode_length, "episodes": episodes,
            "needs_reset": self._needs_reset.copy(), "active": active.copy(),
        }
        return StepResult(obs=obs, reward=reward, terminated=terminated, truncated=truncated, success=success,
                          final_obs=final_obs, info=info)

    # -- recording, rendering, state ---------------------------------------------------------------------
    def set_recording(self, env_index: int, on: bool, size: Tuple[int, int] = (256, 256),
                      camera: Optional[str] = None) -> None:
        """Record env ``env_index``: render a ``size`` = (H, W) frame (from ``camera``, None = the env's
        default) after each reset and env step, and return the frames of each finished episode in
        ``info["episodes"][j]["frames"]``. Turned on right after a reset, the reset frame is included;
        recording stays on for later episodes until turned off (which drops unreturned frames)."""
        i = int(env_index)
        if not 0 <= i < self.num_envs:
            raise DpftError("set_recording: env index %d is out of range for %d envs." % (i, self.num_envs))
        size = (int(size[0]), int(size[1]))
        if size[0] < 1 or size[1] < 1:
            raise DpftError("set_recording: size must be (height, width) >= 1, got %r." % (size,))
        self._recording[i] = (bool(on), size, camera)
        self._call(i, "set_recording", (bool(on), size, camera), "start recording")

    def is_recording(self, env_index: int) -> bool:
        """Whether :meth:`set_recording` is on for env ``env_index``."""
        return self._recording[int(env_index)][0]

    def render(self, env_index: int, height: int = 256, width: int = 256,
               camera: Optional[str] = None) -> np.ndarray:
        """One RGB frame ``(height, width, 3)`` uint8 of env ``env_index``."""
        return self._call(int(env_index), "render", (int(height), int(width), camera), "render")

    def get_state(self, env_index: int) -> Optional[np.ndarray]:
        """Flat simulator state of env ``env_index`` (see :meth:`dpft.envs.base.Env.get_state`)."""
        return self._call(int(env_index), "get_state", None, "get its state")

    # -- shutdown ----------------------------------------------------------------------------------------
    def close(self) -> None:
        """Close every env and stop the workers (a worker that does not exit within 2 s is killed)."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        handles = [h for h in self._handles if h is not None]
        if self.mode == "process":
            for h in handles:
                if h.process.is_alive():
                    h.send("close", None)
            deadline = time.monotonic() + 2.0
            for h in handles:
                h.process.join(timeout=max(0.0, deadline - time.monotonic()))
        for h in handles:
            if self.mode == "process":
                h.kill()
            else:
                h.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        return "VectorEnv(num_envs=%d, mode=%r, cond_steps=%d, act_steps=%d)" % (
            self.num_envs, self.mode, self.cond_steps, self.act_steps)
