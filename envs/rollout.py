"""Evaluate a policy: run N seeded episodes over a batched env, record videos, write ``result.json``.

:func:`rollout` is the library function (any object with ``act(obs, deterministic)`` and ``meta`` works as the
policy); :func:`rollout_checkpoint` loads a checkpoint with :func:`dpft.load_policy`, rebuilds its env from the
checkpoint's ``env_args`` and calls :func:`rollout`.

Seeds: episode ``i`` (0-based) always runs with seed ``seed + i``, whichever env runs it, and the seed is written
per episode into ``result.json``. With a :class:`~dpft.envs.vector.VectorEnv` the first ``num_envs`` episodes start
at once; when envs finish in a chunk they take the next unassigned episode indices in env order, and envs with
nothing left stay idle (not stepped, not given to the policy). Any other :class:`~dpft.envs.base.BatchedEnv` is run in
waves of ``num_envs`` episodes (``reset(seeds)``, step until each env finished its first episode).

Files (``out_dir``):

* ``result.json``: aggregates and per-episode records (see :func:`rollout`), written under a temporary name and
  renamed when complete; a stale ``result.json`` is removed when the rollout starts, so an interrupted rollout
  never leaves a result under the final name.
* ``videos/episode_{i:03d}.mp4``: the first ``video`` episodes (frame after the reset, then one per env step),
  written atomically by :func:`dpft.envs.video.write_video` as each episode finishes.

Ctrl-C or an exception closes the envs the rollout built (worker processes included) and re-raises.
"""
from __future__ import annotations

import copy
import inspect
import json
import math
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from dpft.config import RolloutConfig
from dpft.errors import DpftError
from dpft.envs.base import BatchedEnv, Env, ObsDict, as_numpy
from dpft.envs.vector import VectorEnv
from dpft.envs.registry import has_success_signal

RESULT_NAME = "result.json"
VIDEO_DIR = "videos"

# One set of defaults for `dpft rollout`, rollout_checkpoint() and rollout(): the CLI's schema.
_DEFAULTS = RolloutConfig()
#: seed of the first evaluation episode: far from the demo seeds (``dpft demos`` uses ``seed + i`` from 0)
DEFAULT_ROLLOUT_SEED = int(_DEFAULTS.seed)
DEFAULT_EPISODES = int(_DEFAULTS.episodes)
DEFAULT_TERMINATE_ON_SUCCESS = bool(_DEFAULTS.terminate_on_success)


def _meta_get(meta: Any, name: str, default: Any = None) -> Any:
    if isinstance(meta, dict):
        return meta.get(name, default)
    return getattr(meta, name, default)


def _num_videos(video: Union[int, bool], episodes: int) -> int:
    if video is True:
        return episodes
    if video is False or video is None:
        return 0
    if isinstance(video, (int, np.integer)) and video >= 0:
        return min(int(video), episodes)
    raise DpftError("rollout: video must be True/False or a number of episodes >= 0 to record, got %r." % (video,))


def _json_default(obj: Any) -> Any:
    """numpy scalars/arrays become numbers/lists; anything else unknown its str()."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def _finite_or_none(x: Any) -> Optional[float]:
    """A float for JSON, or None when it is missing or a simulator fault made it NaN/Inf (JSON has no NaN)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _atomic_write_json(path: str, obj: Any) -> None:
    tmp = os.path.join(os.path.dirname(path), ".%s.tmp-%d" % (os.path.basename(path), os.getpid()))
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, allow_nan=False, default=_json_default)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class _Timer:
    """Accumulates wall time per category."""

    def __init__(self) -> None:
        self.totals: Dict[str, float] = {"startup": 0.0, "sim": 0.0, "policy": 0.0, "video": 0.0}

    def add(self, name: str, start: float) -> None:
        self.totals[name] += time.perf_counter() - start


class _Recorder:
    """Collects finished episodes, writes videos, drives the progress bar."""

    def __init__(self, episodes: int, seed: int, n_video: int, out_dir: Optional[str], fps: float,
                 timer: _Timer, progress: bool):
        self.episodes = episodes
        self.seed = seed
        self.n_video = n_video
        self.out_dir = out_dir
        self.fps = fps
        self.timer = timer
        self.records: Dict[int, Dict[str, Any]] = {}
        self.env_steps = 0
        self.has_success = True  # False: the task has no success signal (Gym locomotion), returns only
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=episodes, desc="rollout", unit="ep", leave=False,
                            disable=bool(os.environ.get("SLURM_JOB_ID")) or None)

    def add(self, index: int, env_index: int, ep: Dict[str, Any]) -> None:
        if index in self.records:
            raise RuntimeError("rollout bookkeeping error: episode %d finished twice" % index)
        video_rel = None
        frames = ep.get("frames")
        if index < self.n_video and frames is not None and len(frames) > 0:
            from dpft.envs.video import write_video

            video_rel = os.path.join("videos", "episode_%03d.mp4" % index)
            t0 = time.perf_counter()
            write_video(os.path.join(self.out_dir, video_rel), frames, fps=self.fps)
            self.timer.add("video", t0)
        self.records[index] = {
            "episode": index, "seed": int(ep["seed"]), "env": int(env_index),
            "success": bool(ep["success"]) and not bool(ep.get("failed", False)),
            "return": _finite_or_none(ep["return"]), "length": int(ep["length"]),
            "terminated": bool(ep.get("terminated", False)), "truncated": bool(ep.get("truncated", False)),
            "failed": bool(ep.get("failed", False)), "reason": ep.get("reason"), "video": video_rel,
            "frames": None if frames is None else int(len(frames)),
        }
        if self.bar is not None:
            done = list(self.records.values())
            if self.has_success:
                self.bar.set_postfix(success="%d/%d" % (sum(r["success"] for r in done), len(self.records)))
            else:  # a task without a success signal (Gym locomotion): returns only
                rets = [r["return"] for r in done if r["return"] is not None]
                self.bar.set_postfix(mean_return="%.3g" % (sum(rets) / len(rets)) if rets else "-")
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _check_policy_vs_env(meta: Any, env: BatchedEnv) -> List[str]:
    """Check the env gives the policy what it needs; return the obs keys to pass."""
    for name in ("cond_steps", "act_steps"):
        want = _meta_get(meta, name)
        have = getattr(env, name, None)
        if want is not None and have is not None and int(want) != int(have):
            raise DpftError("The policy was trained with %s=%d but the batched env uses %s=%d; build the env with "
                            "the policy's %s (policy.meta.%s)." % (name, int(want), name, int(have), name, name))
    obs_keys = list(_meta_get(meta, "obs_keys", None) or env.obs_shapes)
    missing = [k for k in obs_keys if k not in env.obs_shapes]
    if missing:
        raise DpftError("The policy needs observation key(s) %s that the env does not produce (it produces %s). "
                        "Build the env with the checkpoint's obs keys (EnvFactory(env_args, obs_keys=...)) and, for "
                        "image keys, with the matching camera enabled." % (missing, sorted(env.obs_shapes)))
    shapes = _meta_get(meta, "obs_shapes", None) or {}
    for k in obs_keys:
        if k in shapes and tuple(shapes[k]) != tuple(env.obs_shapes[k]):
            raise DpftError("Observation '%s' has shape %s in the env but the policy was trained on %s; check the "
                            "env's camera size / obs settings against the checkpoint's meta.json."
                            % (k, tuple(env.obs_shapes[k]), tuple(shapes[k])))
    adim = _meta_get(meta, "action_dim", None)
    if adim is not None and int(adim) != int(env.action_dim):
        raise DpftError("The policy outputs %d-dim actions but the env expects %d; the checkpoint does not match "
                        "this env." % (int(adim), int(env.action_dim)))
    return obs_keys


def _policy_generator(policy: Any, seed: int) -> Optional[Any]:
    """A ``torch.Generator`` seeded with ``seed`` when ``policy.act`` takes ``generator`` (a diffusion policy
    draws its initial noise even when deterministic), else None."""
    try:
        params = inspect.signature(policy.act).parameters
    except (TypeError, ValueError):
        return None
    if "generator" not in params:
        return None
    import torch

    return torch.Generator().manual_seed(int(seed))


class _Actor:
    """Calls ``policy.act`` on the rows of the active envs, checks the result, times it."""

    def __init__(self, policy: Any, keys: List[str], act_steps: int, action_dim: int, deterministic: bool,
                 seed: int, timer: _Timer):
        self.policy, self.keys, self.timer = policy, keys, timer
        self.act_steps, self.action_dim, self.deterministic = act_steps, action_dim, deterministic
        self.kwargs: Dict[str, Any] = {"deterministic": deterministic}
        generator = _policy_generator(policy, seed)
        if generator is not None:
            self.kwargs["generator"] = generator

    def __call__(self, obs: ObsDict, rows: Optional[np.ndarray], n_rows: int) -> np.ndarray:
        if rows is not None and getattr(self.policy, "stateful", False):  # (H-model) row i stays env i
            full = _act(self.policy, obs, self.keys, None, len(next(iter(obs.values()))), self.act_steps,
                        self.action_dim, self.kwargs, self.timer)
            return full[rows]
        return _act(self.policy, obs, self.keys, rows, n_rows, self.act_steps, self.action_dim, self.kwargs,
                    self.timer)

    def reset(self, rows: Optional[Sequence[int]] = None) -> None:
        """(H-model) Episodes start in env ``rows`` (None = all): ``policy.reset(rows)`` when it has one."""
        reset = getattr(self.policy, "reset", None)
        if reset is not None:
            reset(None if rows is None else [int(i) for i in rows])


def _act(policy: Any, obs: ObsDict, keys: List[str], rows: Optional[np.ndarray], n_rows: int, act_steps: int,
         action_dim: int, kwargs: Dict[str, Any], timer: _Timer) -> np.ndarray:
    sub = {k: (obs[k] if rows is None else obs[k][rows]) for k in keys}
    t0 = time.perf_counter()
    chunk = policy.act(sub, **kwargs)
    if hasattr(chunk, "detach"):  # a torch tensor
        chunk = chunk.detach().cpu().numpy()
    chunk = np.asarray(chunk)
    timer.add("policy", t0)
    if chunk.shape != (n_rows, act_steps, action_dim):
        raise DpftError("policy.act returned actions of shape %s; expected (batch, act_steps, action_dim) = %s."
                        % (chunk.shape, (n_rows, act_steps, action_dim)))
    return chunk


def _run_scheduled(actor: _Actor, env: VectorEnv, rec: _Recorder, video_size: Tuple[int, int],
                   camera: Optional[str], timer: _Timer) -> None:
    """Episodes over a VectorEnv: finished envs take the next episode index; idle envs are not stepped."""
    n, episodes, seed = env.num_envs, rec.episodes, rec.seed
    running: List[Optional[int]] = [i if i < episodes else None for i in range(n)]
    chunks = [0] * n
    max_chunks = env.max_episode_steps + 1
    t0 = time.perf_counter()
    for i in range(n):
        want = running[i] is not None and running[i] < rec.n_video
        if want or env.is_recording(i):
            env.set_recording(i, want, size=video_size, camera=camera)
    obs = env.reset([seed + i for i in range(n)])
    timer.add("sim", t0)
    actor.reset(None)
    next_episode = min(n, episodes)
    while len(rec.records) < episodes:
        rows = np.array([i for i in range(n) if running[i] is not None], dtype=np.int64)
        active = np.zeros(n, dtype=bool)
        active[rows] = True
        sub_chunk = actor(obs, rows, len(rows))
        chunk = np.zeros((n, env.act_steps, env.action_dim), dtype=sub_chunk.dtype)
        chunk[rows] = sub_chunk
        t0 = time.perf_counter()
        res = env.step(chunk, active=active, auto_reset=False)
        timer.add("sim", t0)
        rec.env_steps += int(res.info["steps"].sum())
        finished = []
        for ep in res.info["episodes"]:
            i = ep["env"]
            index = running[i]
            if ep["seed"] != seed + index:
                raise RuntimeError("rollout bookkeeping error: env %d ran seed %s for episode %d" % (i, ep["seed"], index))
            rec.add(index, i, ep)
            running[i] = None
            chunks[i] = 0
            finished.append(i)
        for i in rows:
            if running[i] is not None:
                chunks[i] += 1
                if chunks[i] > max_chunks:
                    raise DpftError("Env %d ran %d chunks without ending its episode although max_episode_steps "
                                    "is %d; the env must report truncated=True at its time limit."
                                    % (i, chunks[i], env.max_episode_steps))
        reset_idx, reset_seeds = [], []
        t0 = time.perf_counter()
        for i in sorted(finished):
            want = next_episode < episodes and next_episode < rec.n_video
            if want or env.is_recording(i):
                env.set_recording(i, want, size=video_size, camera=camera)
            if next_episode < episodes:
                running[i] = next_episode
                reset_idx.append(i)
                reset_seeds.append(seed + next_episode)
                next_episode += 1
        obs = env.reset_envs(reset_idx, reset_seeds) if reset_idx else res.obs
        timer.add("sim", t0)
        if reset_idx:
            actor.reset(reset_idx)


def _run_waves(actor: _Actor, env: BatchedEnv, rec: _Recorder, timer: _Timer) -> None:
    """Episodes over a generic BatchedEnv: waves of num_envs episodes, each env's first episode is kept."""
    n, episodes, seed = env.num_envs, rec.episodes, rec.seed
    max_chunks = int(getattr(env, "max_episode_steps", 10 ** 6)) + 1
    start = 0
    while start < episodes:
        count = min(n, episodes - start)
        t0 = time.perf_counter()
        obs = env.reset([seed + start + i for i in range(n)])
        timer.add("sim", t0)
        actor.reset(None)
        ret = np.zeros(n)
        length = np.zeros(n, dtype=np.int64)
        open_envs = set(range(count))
        chunks = 0
        while open_envs:
            chunk = actor(obs, None, n)
            t0 = time.perf_counter()
            res = env.step(chunk)
            timer.add("sim", t0)
            # torch outputs (FurnitureEnv return_torch=True, e.g. dpft finetune's env) -> host arrays, once
            reward, success = as_numpy(res.reward), as_numpy(res.success).astype(bool)
            terminated, truncated = as_numpy(res.terminated).astype(bool), as_numpy(res.truncated).astype(bool)
            done = terminated | truncated
            steps = np.asarray(res.info.get("steps", np.full(n, env.act_steps)))
            failed = np.asarray(res.info.get("failed", np.zeros(n, dtype=bool)))
            reasons = res.info.get("fail_reason", [None] * n)
            # float64 per-episode totals when the env reports them (StepResult.reward is float32)
            ep_ret = np.asarray(res.info.get("episode_return", np.full(n, np.nan)), dtype=np.float64)
            chunks += 1
            for i in sorted(open_envs):
                ret[i] += float(reward[i])
                length[i] += int(steps[i])
                rec.env_steps += int(steps[i])
                if done[i]:
                    open_envs.discard(i)
                    total = ep_ret[i] if np.isfinite(ep_ret[i]) else ret[i]
                    rec.add(start + i, i, {"seed": seed + start + i, "success": bool(success[i]),
                                           "return": total, "length": int(length[i]),
                                           "terminated": bool(terminated[i]), "truncated": bool(truncated[i]),
                                           "failed": bool(failed[i]), "reason": reasons[i]})
            if open_envs and chunks > max_chunks:
                raise DpftError("Env(s) %s ran %d chunks without ending their episode; the batched env must report "
                                "truncated=True at its time limit." % (sorted(open_envs), chunks))
            obs = res.obs
            ended = np.nonzero(done)[0]
            if open_envs and len(ended):  # (H-model) auto-reset envs started new episodes
                actor.reset(ended)
        start += count


def _summary(rec: _Recorder, wall: float, timer: _Timer, extra: Dict[str, Any]) -> Dict[str, Any]:
    records = [rec.records[i] for i in range(rec.episodes)]
    ok = [r for r in records if not r["failed"]]
    returns = np.array([r["return"] for r in ok if r["return"] is not None], dtype=np.float64)
    lengths = np.array([r["length"] for r in ok], dtype=np.float64)
    num_success = sum(bool(r["success"]) and not r["failed"] for r in records)  # a cut episode is a failure
    sim = timer.totals["sim"]
    run = wall - timer.totals["startup"]
    result = {
        "success_rate": num_success / len(records),
        "num_episodes": len(records),
        "num_success": int(num_success),
        "num_failed": len(records) - len(ok),
        "mean_return": _finite_or_none(returns.mean()) if len(returns) else None,
        "std_return": _finite_or_none(returns.std()) if len(returns) else None,
        "mean_length": _finite_or_none(lengths.mean()) if len(ok) else None,
        "wall_time_s": wall,
        "startup_time_s": timer.totals["startup"],
        "env_steps": int(rec.env_steps),
        "env_steps_per_s": rec.env_steps / run if run > 0 else None,
        "sim_time_s": sim,
        "policy_time_s": timer.totals["policy"],
        "video_time_s": timer.totals["video"],
        "outside_sim_fraction": (run - sim) / run if run > 0 else None,
    }
    result.update(extra)
    result["videos"] = [r["video"] for r in records if r["video"]]
    result["episodes"] = records
    return result


def rollout(
    policy: Any,
    env: Union[BatchedEnv, Sequence[Callable[[], Env]]],
    episodes: int,
    seed: int = DEFAULT_ROLLOUT_SEED,
    video: Union[int, bool] = False,
    out_dir: Optional[str] = None,
    deterministic: bool = True,
    progress: bool = True,
    policy_info: Optional[Dict[str, Any]] = None,
    mode: str = "process",
    video_size: Tuple[int, int] = (256, 256),
    camera: Optional[str] = None,
    fps: float = 20.0,
    worker_timeout_s: float = 120.0,
    overwrite: bool = False,
) -> Dict[str, Any]:
    """Run ``episodes`` episodes of ``policy`` and return (and, with ``out_dir``, write) the result.

    Args:
        policy: object with ``act(obs, deterministic) -> (B, act_steps, Da)`` raw actions, given
            ``{key: (B, To, *shape)}`` raw observations, and ``meta`` (``obs_keys``, ``cond_steps``, ``act_steps``,
            ``action_dim``; a :class:`dpft.policy.Policy`).
        env: a :class:`~dpft.envs.base.BatchedEnv` (left open; its ``cond_steps``/``act_steps`` must match the policy)
            or a list of env factories (a :class:`~dpft.envs.vector.VectorEnv` with one env per factory, at most
            ``episodes``, is built in ``mode`` and closed at the end).
        episodes: number of episodes; episode ``i`` uses seed ``seed + i``.
        video: number of episodes to record (the first ones), True for all, False for none (needs ``out_dir``
            and a VectorEnv).
        out_dir: where ``result.json`` and ``videos/`` go; None writes nothing. It is locked while the rollout
            runs (a second rollout into it is refused), and an earlier rollout's files there are refused unless
            ``overwrite=True`` (:func:`prepare_out_dir`).
        overwrite: replace the ``result.json`` and ``videos/episode_*.mp4`` of an earlier rollout in ``out_dir``.
        deterministic: passed to ``policy.act``. When ``policy.act`` takes a ``generator`` (dpft policies do), a
            ``torch.Generator`` seeded with ``seed`` is passed, so the same call (same seed, same envs) gives the
            same result even though a diffusion policy draws its initial noise in deterministic mode too.
        progress: show a tqdm progress bar.
        policy_info: what was evaluated (checkpoint, weights ema/model, ft_denoising_steps, ...), stored as
            ``result["policy"]``; default: ``policy.describe()`` when the policy has it, else ``{}``.
        video_size, camera, fps: video frame size (H, W), camera name (None = the env's default) and frame rate.

    Returns:
        dict with ``success_rate``, ``num_success``, ``num_failed``, ``mean_return``/``std_return``/
        ``mean_length`` (over episodes that did not fail; None when all failed), ``wall_time_s`` (all of it),
        ``startup_time_s`` (starting the workers the rollout built), ``env_steps``, ``env_steps_per_s`` and
        ``outside_sim_fraction`` (both over the wall time after startup), ``sim_time_s`` (inside env reset/step
        calls, worker IPC included), ``policy_time_s``, ``video_time_s``, ``seed``, ``num_envs``, ``cond_steps``,
        ``act_steps``, ``deterministic``, ``policy``, ``videos`` and ``episodes``: per-episode dicts
        ``{episode, seed, env, success, return, length, terminated, truncated, failed, reason, video, frames}``.
        Failed episodes (worker died, env raised) count as unsuccessful in ``success_rate``. ``has_success`` is
        false for tasks without a success signal (Gym locomotion, from the policy's ``meta["env_args"]``); then
        ``success_rate`` and ``num_success`` are None (returns are the figure; the episodes' ``success`` is False).
    """
    if isinstance(episodes, bool) or not isinstance(episodes, (int, np.integer)) or episodes < 1:
        raise DpftError("rollout: episodes must be an integer >= 1, got %r." % (episodes,))
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DpftError("rollout: seed must be a non-negative integer, got %r." % (seed,))
    episodes, seed = int(episodes), int(seed)
    n_video = _num_videos(video, episodes)
    if n_video and out_dir is None:
        raise DpftError("rollout: video=%r needs out_dir (videos are written to out_dir/videos/)." % (video,))
    meta = getattr(policy, "meta", None)
    if meta is None or not callable(getattr(policy, "act", None)):
        raise DpftError("rollout: the policy must have an act(obs, deterministic) method and a meta attribute "
                        "(dpft.load_policy returns such an object); got %r." % (policy,))
    result_path = None
    out_lock = None
    if out_dir is not None:
        out_lock = prepare_out_dir(out_dir, n_video, overwrite)  # held until the result is written
        out_dir = out_lock.path
        result_path = os.path.join(out_dir, RESULT_NAME)

    own_env = not isinstance(env, BatchedEnv)
    timer = _Timer()
    t_start = time.perf_counter()
    rec = None
    try:
        if own_env:
            fns = list(env)
            if not fns:
                raise DpftError("rollout: the list of env factories is empty.")
            t0 = time.perf_counter()
            env = VectorEnv(fns[:episodes], cond_steps=int(_meta_get(meta, "cond_steps", 1)),
                            act_steps=int(_meta_get(meta, "act_steps", 1)), mode=mode,
                            worker_timeout_s=worker_timeout_s)
            timer.add("startup", t0)
        keys = _check_policy_vs_env(meta, env)
        scheduled = isinstance(env, VectorEnv)
        if n_video and not scheduled:
            raise DpftError("rollout: videos need a VectorEnv (it records frames in its workers); %s cannot record. "
                            "Pass video=0." % type(env).__name__)
        rec = _Recorder(episodes, seed, n_video, out_dir, fps, timer, progress)
        rec.has_success = has_success_signal(_meta_get(meta, "env_args"))
        actor = _Actor(policy, keys, env.act_steps, env.action_dim, deterministic, seed, timer)
        if scheduled:
            _run_scheduled(actor, env, rec, video_size, camera, timer)
        else:
            _run_waves(actor, env, rec, timer)
        wall = time.perf_counter() - t_start
        result = _summary(rec, wall, timer, {
            "seed": seed, "num_envs": int(env.num_envs), "cond_steps": int(env.cond_steps),
            "act_steps": int(env.act_steps), "deterministic": bool(deterministic),
            "obs_keys": keys, "policy": _policy_block(policy, policy_info), "has_success": rec.has_success,
        })
        if not rec.has_success:  # no success figure for a task that has no success signal (Gym locomotion)
            result["success_rate"] = result["num_success"] = None
        if result_path is not None:
            _atomic_write_json(result_path, result)
        return result
    finally:
        if rec is not None:
            rec.close()
        if own_env and isinstance(env, BatchedEnv):
            env.close()
        if out_lock is not None:
            out_lock.close()


def earlier_outputs(out_dir: str) -> List[str]:
    """The files of an earlier rollout in ``out_dir``: ``result.json`` and ``videos/episode_*.mp4``."""
    found = []  # type: List[str]
    result_path = os.path.join(out_dir, RESULT_NAME)
    if os.path.isfile(result_path):
        found.append(result_path)
    videos = os.path.join(out_dir, VIDEO_DIR)
    if os.path.isdir(videos):
        found += [os.path.join(videos, n) for n in sorted(os.listdir(videos))
                  if n.startswith("episode_") and n.endswith(".mp4")]
    return found


def prepare_out_dir(out_dir: Any, n_video: int = 0, overwrite: bool = False, delete: bool = True) -> Any:
    """Create ``out_dir`` (and ``out_dir/videos`` when videos are wanted), check both are writable before any
    episode runs, and lock ``out_dir`` (:func:`dpft.rundir.open_output_dir`: a second rollout into it is refused
    naming this process). The files of an earlier rollout there (``result.json``, ``videos/episode_*.mp4``) are
    refused unless ``overwrite=True``, which deletes them (a result never sits beside another run's videos;
    ``delete=False`` only checks, as :func:`rollout_checkpoint` does before loading the policy).
    Returns the lock (a :class:`dpft.rundir.RunDir`; ``.path`` is the directory): close it when done."""
    from dpft.rundir import check_writable_dir, open_output_dir

    out_dir = os.fspath(out_dir)
    check_writable_dir(out_dir, "rollout out")
    lock = open_output_dir(out_dir, earlier_outputs, overwrite, option="out", command="dpft rollout", delete=delete)
    try:
        if n_video:
            check_writable_dir(os.path.join(out_dir, VIDEO_DIR), "rollout videos")
    except BaseException:
        lock.close()
        raise
    return lock


def _policy_block(policy: Any, policy_info: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    if policy_info is not None:
        return copy.deepcopy(dict(policy_info))
    describe = getattr(policy, "describe", None)
    return dict(describe()) if callable(describe) else {}


def _merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def env_mode_for(env_args: Dict[str, Any]) -> str:
    """``"inline"`` for gymnasium envs (cheap; IPC would cost more than the step), ``"process"`` otherwise
    (robosuite: ~10 ms per step, worth one process per env)."""
    from dpft.envs.registry import env_kind

    kind = env_kind(env_args)
    if kind == "robosuite":  # the mujoco backend steps all envs of the process as one batch
        from dpft.envs.mujoco_backend import resolve_backend

        kw = env_args.get("env_kwargs") or {}
        if "backend" not in kw and kw.get("use_camera_obs"):
            return "process"  # pixel checkpoints fall back to robosuite (one process per env)
        return "inline" if resolve_backend(env_args)[0] == "mujoco" else "process"
    return "inline" if kind == "gym" else "process"


_MODEL_FIELDS = ("denoising_steps", "use_ddim", "ddim_steps", "ft_denoising_steps", "min_sampling_denoising_std")
_POLICY_FIELDS = ("policy", "policy_type", "step", "horizon_steps", "act_steps", "cond_steps", "denoising_steps",
                  "ddim_steps", "ft_denoising_steps", "action_dim", "obs_keys", "dpft_version")


def _env_options(env_options: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    options = dict(env_options or {})
    options.setdefault("terminate_on_success", DEFAULT_TERMINATE_ON_SUCCESS)  # as `dpft rollout` does
    return options


def rollout_checkpoint(
    checkpoint: Any,
    episodes: int = DEFAULT_EPISODES,
    num_envs: Optional[int] = None,
    seed: int = DEFAULT_ROLLOUT_SEED,
    video: Union[int, bool] = 0,
    out_dir: Optional[str] = None,
    weights: str = "ema",
    device: str = "cpu",
    env_overrides: Optional[Dict[str, Any]] = None,
    env_options: Optional[Dict[str, Any]] = None,
    progress: bool = True,
    deterministic: bool = True,
    video_size: Tuple[int, int] = (256, 256),
    camera: Optional[str] = None,
    verify: bool = True,
    overwrite: bool = False,
) -> Dict[str, Any]:
    """Evaluate a checkpoint (run dir or checkpoint dir) on the env it was trained for.

    Loads the policy with ``dpft.load_policy(checkpoint, weights, device)``, builds ``num_envs`` (default:
    ``min(episodes, os.cpu_count())``) envs from ``meta.env_args`` deep-merged with ``env_overrides``, runs
    :func:`rollout`, prints a one-line summary and returns the result dict (also in ``out_dir/result.json``).

    robosuite (``type`` 1) envs run in worker processes and gymnasium (``type`` 2) envs in this process, each
    built by :class:`dpft.envs.registry.EnvFactory` with ``env_options`` (keyword arguments of
    :func:`dpft.envs.registry.make_env`: ``max_episode_steps``, ``terminate_on_success`` (default True, as
    ``dpft rollout``), ...). The defaults are those of ``dpft rollout`` (:class:`dpft.config.RolloutConfig`):
    ``episodes=10``, ``seed=100000`` (away from the demo seeds 0, 1, ...), episodes end on success.
    ``verify=False`` loads a checkpoint whose files fail their checksums (``--no-verify``): each such file is warned
    about on stderr and listed in ``result["policy"]["checksum_mismatches"]``, and ``result["policy"]["verified"]``
    is false (true when the checksums were checked). ``out_dir`` is locked and an earlier rollout there is refused
    unless ``overwrite=True`` (:func:`prepare_out_dir`). FurnitureBench
    (``type`` ``"furniture"``) is built by :func:`dpft.envs.furniture.furniture_env_from_args`: Isaac Gym on the GPU
    (``device`` when it is a CUDA device, else ``"cuda"``), or the CPU fake when ``env_args["env_kwargs"]["simulator"]``
    is ``"fake"`` (``env_overrides={"env_kwargs": {"simulator": "fake"}}`` dry-runs any furniture checkpoint); it
    runs in waves and cannot record videos.

    Raises:
        DpftError: the checkpoint does not exist, has no env_args, or its obs keys are not produced by the env.
    """
    path = os.fspath(checkpoint)
    if not os.path.exists(path):
        raise DpftError("Checkpoint '%s' does not exist; pass a run directory (RUN_DIR, its latest checkpoint is "
                        "used) or a checkpoint directory (RUN_DIR/checkpoints/step_XXXXXXXX)." % path)
    if isinstance(num_envs, bool) or (num_envs is not None and int(num_envs) < 1):
        raise DpftError("rollout_checkpoint: num_envs must be >= 1, got %r." % (num_envs,))
    from dpft.envs.registry import import_isaacgym_if_needed

    if ((env_overrides or {}).get("env_kwargs") or {}).get("simulator") != "fake":
        import_isaacgym_if_needed(path)  # Isaac Gym refuses to load after torch
    import dpft

    if out_dir is not None:  # writable (videos/ too), free and unused before the policy is loaded and any episode runs
        prepare_out_dir(out_dir, _num_videos(video, int(episodes)), overwrite, delete=False).close()

    from dpft.checkpoint import verification

    with verification(verify) as mismatched:  # verify=False: load damaged files anyway, warning about each
        policy = dpft.load_policy(path, weights=weights, device=device)
    meta = policy.meta
    env_args = _meta_get(meta, "env_args")
    if not env_args:
        raise DpftError("Checkpoint '%s' has no env_args in its meta.json (the training dataset had no "
                        "data.attrs['env_args']), so its env cannot be rebuilt; build the env yourself and call "
                        "dpft.envs.rollout.rollout(policy, env_fns, ...)." % path)
    if env_overrides:
        env_args = _merge(env_args, env_overrides)
    num_envs = int(num_envs) if num_envs is not None else max(1, min(int(episodes), os.cpu_count() or 1))
    obs_keys = list(_meta_get(meta, "obs_keys", None) or []) or None
    n_video = _num_videos(video, int(episodes))
    info = _policy_block(policy, None)
    info.update({"checkpoint": os.path.abspath(str(info.get("checkpoint") or path)),
                 "weights": getattr(policy, "weights", weights), "requested_weights": weights, "device": device,
                 "verified": bool(verify), "checksum_mismatches": list(mismatched)})
    for name in _POLICY_FIELDS:
        value = _meta_get(meta, name)
        if value is not None and name not in info:
            info[name] = value
    model = getattr(policy, "model", None)
    for name in _MODEL_FIELDS:  # sampling settings actually used (DDIM steps, fine-tuned steps)
        value = getattr(model, name, None)
        if isinstance(value, (bool, int, float, str)) and name not in info:
            info[name] = value
    if env_overrides:
        info["env_overrides"] = env_overrides
    kw = dict(episodes=int(episodes), seed=seed, video=video, out_dir=out_dir, overwrite=overwrite,
              deterministic=deterministic, progress=progress, policy_info=info, video_size=video_size, camera=camera)

    from dpft.envs.registry import env_kind

    kind = env_kind(env_args)
    if kind == "furniture":
        from dpft.envs.furniture import furniture_env_from_args

        options = _env_options(env_options)
        env = furniture_env_from_args(
            env_args, num_envs=num_envs, act_steps=int(_meta_get(meta, "act_steps", 1)),
            cond_steps=int(_meta_get(meta, "cond_steps", 1)), device=device, **options)
        try:
            result = rollout(policy, env, **kw)
        finally:
            env.close()
    else:
        from dpft.envs.registry import EnvFactory

        mode = env_mode_for(env_args)
        options = _env_options(env_options)
        if n_video:
            options["render"] = True
        if mode == "process" and kind == "robosuite":
            # probe the GL backend once here (in a child process: no GL context in this one); the workers
            # inherit the result through the environment instead of probing again each
            from dpft.envs.render import setup_rendering

            setup_rendering(require=bool(n_video))
        fns = [EnvFactory(env_args, obs_keys=obs_keys, kwargs=options) for _ in range(num_envs)]
        result = rollout(policy, fns, mode=mode, **kw)
    print(format_summary(result, out_dir))
    return result


def format_summary(result: Dict[str, Any], out_dir: Optional[str] = None) -> str:
    """One line: success rate, mean return/length, failures, speed, video and result paths."""
    mean_ret = result["mean_return"]
    if result.get("success_rate") is None:  # a task without a success signal: returns only
        line = "%d episodes" % result["num_episodes"]
    else:
        line = "success %d/%d (%.1f%%)" % (result["num_success"], result["num_episodes"],
                                           100.0 * result["success_rate"])
    line += ", mean return %s, mean length %s, %d failed, %.0f env-steps/s" % (
        "n/a" if mean_ret is None else "%.3f" % mean_ret,
        "n/a" if result["mean_length"] is None else "%.1f" % result["mean_length"],
        result["num_failed"], result["env_steps_per_s"] or 0.0)
    policy = result.get("policy") or {}
    if policy.get("verified") is False:
        line += "; checksums NOT verified (--no-verify; %d file(s) did not match)" % len(
            policy.get("checksum_mismatches") or [])
    if out_dir is not None:
        if result["videos"]:
            line += "; videos: " + ", ".join(os.path.join(out_dir, v) for v in result["videos"])
        line += "; result: " + os.path.join(out_dir, RESULT_NAME)
    return line
