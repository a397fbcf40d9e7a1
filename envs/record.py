"""Record rollouts of any dpft policy as a robomimic-format HDF5 file (``dpft demos policy=RUN_DIR ...``).

This is how Gym tasks get demonstrations (there is no D4RL download): train a policy (pretraining, or PPO from
scratch), then record it, optionally with action noise for "medium-quality" data. It works for robosuite tasks
too, and for every policy :func:`dpft.load_policy` builds (diffusion, Gaussian, fine-tuned): only the policy
contract is used, ``act(obs, deterministic, generator) -> (B, act_steps, Da)``, ``meta`` and, when present,
``reset(rows)`` (called with the env rows whose episode starts, before their first ``act``).

The file (written by :class:`dpft.envs.demos.DemoFileWriter`, atomically)::

    data                      attrs: total, env_args (JSON: the checkpoint's env_args, plus "max_episode_steps",
                                     the episode limit the episodes ran with; robosuite camera settings when
                                     images are stored)
      demo_<i>                attrs: num_samples, seed (episode seed), success, return, terminated, truncated,
                                     episode (attempt index)
        obs/<key>             (N, ...)  gym: "obs" (float64); robosuite: robomimic's standard low-dim keys and the
                                        policy's keys; <camera>_image uint8 (H, W, 3) for image_obs / image policies
        next_obs/<key>        (N, ...)  observation after each action (next_obs[t] == obs[t + 1])
        actions               (N, Da)   float64: the actions sent to the env (noise included)
        rewards               (N,)      float64 env rewards (they sum to the episode return)
        dones                 (N,)      int64, 1 at the last step only (robomimic done_mode 1)
        states                (N, D)    float64 MuJoCo state (time, qpos, qvel) before each action
    mask/train, mask/valid    byte strings of demo names (seeded split)

Episodes: episode ``i`` (counting attempts) runs with env seed ``seed + i``; ``envs`` environments step the
policy's action chunks exactly as ``dpft rollout`` does (re-planning every ``act_steps``, the observation history
of ``cond_steps``). An episode is kept when it did not fail (an env fault or a non-finite value cuts it), it
succeeded or ``keep_failures`` is set (Gym locomotion has no success signal: every episode passes this test), and
its return is at least ``min_return`` (when given). Demos are numbered in episode order. Recording stops once
``num`` episodes are kept; at most ``max_attempts`` (default ``3 * num``) are run.

Randomness: the policy gets a ``torch.Generator`` seeded with ``seed`` (shared by the envs' batch, as in
``dpft rollout``), and ``noise`` draws from a generator per episode seeded with its env seed; so the same
arguments (including ``envs``) write the same file. With another ``envs`` a deterministic Gaussian policy records
the same episodes up to float32 rounding (batched matmuls); a diffusion policy draws its initial noise from the
shared generator, so its episodes change with the batch.

Example::

    from dpft.envs.record import record_demos
    summary = record_demos("runs/hopper_ppo", num=50, out="data/hopper_medium.hdf5", noise=0.2, envs=4)
"""
from __future__ import annotations

import copy
import os
import time
import types
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from dpft.errors import DpftError
from dpft.envs.base import Env, ObsDict

#: extra observation keys the recording env adds (per-step reward and simulator state travel with the history)
REWARD_KEY = "_record_reward"
STATE_KEY = "_record_state"

DEFAULT_CAMERAS = ("agentview", "robot0_eye_in_hand")


class _RecordingEnv(Env):
    """Wraps an :class:`Env`: keeps the observation keys to store, adds the step's reward and the simulator state
    to each observation, and renders ``<camera>_image`` keys from the current (refreshed) state, as
    :func:`dpft.envs.demos.observe` does.

    ``standard_keys``: store robomimic's standard low-dim keys of the scene (:func:`dpft.envs.demos.demo_obs_keys`)
    plus ``extra_keys``; otherwise every key the env produces.
    """

    def __init__(self, env: Env, images: Sequence[Tuple[str, int, int]], standard_keys: bool,
                 extra_keys: Sequence[str]):
        from dpft.envs.demos import demo_obs_keys

        self.env = env
        self.images = [(str(k), int(h), int(w)) for k, h, w in images]
        self.action_dim = env.action_dim
        self.max_episode_steps = env.max_episode_steps
        keys = list(env.obs_shapes)
        if standard_keys:
            keys = demo_obs_keys(keys)
            keys += [k for k in extra_keys if k not in keys]
        missing = [k for k in extra_keys if k not in env.obs_shapes]
        if missing:
            raise DpftError("The policy needs observation key(s) {} that the env does not produce (it produces {})."
                            .format(missing, sorted(env.obs_shapes)))
        self.keys = keys
        self.obs_shapes = {k: tuple(env.obs_shapes[k]) for k in keys}
        self.obs_dtypes = {k: env.obs_dtypes[k] for k in keys}
        for key, h, w in self.images:
            self.obs_shapes[key] = (h, w, 3)
            self.obs_dtypes[key] = np.dtype(np.uint8)
        self.obs_shapes[REWARD_KEY] = ()
        self.obs_dtypes[REWARD_KEY] = np.dtype(np.float64)
        state = env.get_state()
        self.has_state = state is not None
        if self.has_state:
            self.obs_shapes[STATE_KEY] = tuple(np.shape(state))
            self.obs_dtypes[STATE_KEY] = np.dtype(np.float64)

    def _extend(self, obs: ObsDict, reward: float) -> ObsDict:
        out = {k: obs[k] for k in self.keys}
        for key, h, w in self.images:
            out[key] = self.env.render(h, w, key[: -len("_image")])
        out[REWARD_KEY] = np.float64(reward)
        if self.has_state:
            out[STATE_KEY] = np.asarray(self.env.get_state(), dtype=np.float64)
        return out

    def reset(self, seed: Optional[int] = None) -> ObsDict:
        return self._extend(self.env.reset(seed=seed), 0.0)

    def step(self, action: np.ndarray) -> Tuple[ObsDict, float, bool, bool, Dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        return self._extend(obs, reward), reward, terminated, truncated, info

    def render(self, height: int = 256, width: int = 256, camera: Optional[str] = None) -> np.ndarray:
        return self.env.render(height, width, camera)

    def get_state(self) -> Optional[np.ndarray]:
        return self.env.get_state()

    def close(self) -> None:
        self.env.close()


@dataclass
class _RecordingFactory:
    """Picklable recipe of a :class:`_RecordingEnv` (worker processes build their own). The inner env is built
    with all its low-dim keys and no camera observables (images are rendered by the wrapper)."""

    env_args: Dict[str, Any]
    extra_keys: List[str] = field(default_factory=list)
    images: List[Tuple[str, int, int]] = field(default_factory=list)
    kwargs: Dict[str, Any] = field(default_factory=dict)

    def __call__(self) -> _RecordingEnv:
        from dpft.envs.registry import env_kind, make_env

        args = copy.deepcopy(self.env_args)
        robosuite = env_kind(args) == "robosuite"
        if robosuite:
            args.setdefault("env_kwargs", {})["use_camera_obs"] = False
            if self.images:  # dataset images through robosuite's renderer (the mujoco backend's frames differ)
                args["env_kwargs"].setdefault("backend", "robosuite")
        return _RecordingEnv(make_env(args, **self.kwargs), self.images, robosuite, self.extra_keys)


# --------------------------------------------------------------------------------------------------- arguments
def _is_int(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, np.integer))


def _check_args(num: Any, seed: Any, envs: Any, noise: Any, min_return: Any, max_episode_steps: Any,
                valid_ratio: Any, max_attempts: Any) -> None:
    if not _is_int(num) or num < 1:
        raise DpftError("Recording demos: num (demonstrations to keep) must be an integer >= 1, got {!r}.".format(num))
    if not _is_int(seed) or seed < 0:
        raise DpftError("Recording demos: seed must be a non-negative integer, got {!r}.".format(seed))
    if not _is_int(envs) or envs < 1:
        raise DpftError("Recording demos: envs (parallel environments) must be an integer >= 1, got {!r}.".format(envs))
    try:
        noise_f = float(noise)
    except (TypeError, ValueError):
        noise_f = float("nan")
    if not np.isfinite(noise_f) or noise_f < 0:
        raise DpftError("Recording demos: noise (std of the Gaussian action noise, normalized action units) must be a "
                        "finite number >= 0, got {!r}.".format(noise))
    if min_return is not None:
        try:
            ok = np.isfinite(float(min_return))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise DpftError("Recording demos: min_return must be a finite number or None, got {!r}.".format(min_return))
    if max_episode_steps is not None and (not _is_int(max_episode_steps) or max_episode_steps < 1):
        raise DpftError("Recording demos: max_episode_steps must be a positive integer or None, got {!r}.".format(
            max_episode_steps))
    try:
        ratio = float(valid_ratio)
    except (TypeError, ValueError):
        ratio = float("nan")
    if not 0.0 <= ratio < 1.0:
        raise DpftError("Recording demos: valid_ratio must be in [0, 1), got {!r}.".format(valid_ratio))
    if max_attempts is not None and (not _is_int(max_attempts) or max_attempts < num):
        raise DpftError("Recording demos: max_attempts must be an integer >= num ({}), got {!r}.".format(
            num, max_attempts))


def _load(policy: Any, weights: str, device: str) -> Tuple[Any, str]:
    """The policy object and a description of where it came from (a path is loaded with dpft.load_policy)."""
    if not isinstance(policy, (str, os.PathLike)):
        if not callable(getattr(policy, "act", None)) or getattr(policy, "meta", None) is None:
            raise DpftError("Recording demos: policy must be a run directory / checkpoint directory or an object with "
                            "act(obs, deterministic) and meta (dpft.load_policy returns one); got {!r}.".format(policy))
        return policy, repr(policy)
    path = os.fspath(policy)
    if not os.path.isdir(path):
        raise DpftError("Recording demos: policy={!r} is not a directory; pass a dpft run directory (RUN_DIR: its newest "
                        "checkpoint is used) or a checkpoint directory (RUN_DIR/checkpoints/step_XXXXXXXX).".format(path))
    from dpft.envs.registry import import_isaacgym_if_needed

    import_isaacgym_if_needed(path)
    import dpft

    try:
        return dpft.load_policy(path, weights=weights, device=device), os.path.abspath(path)
    except DpftError as e:
        raise DpftError("Recording demos: policy={!r} is not a usable dpft checkpoint: {}".format(path, e)) from None


def _meta(policy: Any, name: str, default: Any = None) -> Any:
    meta = policy.meta
    return meta.get(name, default) if isinstance(meta, dict) else getattr(meta, name, default)


def _resolve_env_args(policy: Any, task: Optional[str], source: str) -> Dict[str, Any]:
    """The checkpoint's env_args; ``task`` must name the same env (or supplies env_args when there are none)."""
    from dpft.envs.registry import env_args_for_task, env_kind

    env_args = copy.deepcopy(_meta(policy, "env_args") or {})
    if task is not None:
        task_args = env_args_for_task(task)
        if not env_args:
            env_args = task_args
        elif str(env_args.get("env_name", "")).lower() != str(task_args["env_name"]).lower():
            raise DpftError("Recording demos: task={!r} ({}) does not match the checkpoint {}, which was trained for "
                            "env {!r}; omit task (it is taken from the checkpoint) or pass a checkpoint of {}.".format(
                                task, task_args["env_name"], source, env_args.get("env_name"), task_args["env_name"]))
    if not env_args:
        raise DpftError("Recording demos: the checkpoint {} has no env_args in its meta.json (its training data had no "
                        "data.attrs['env_args']); pass task=... to name its environment.".format(source))
    if env_kind(env_args) == "furniture":
        raise DpftError("Recording demos: FurnitureBench checkpoints cannot be recorded yet (Isaac Gym steps its envs as "
                        "one GPU batch without per-step states); record robosuite or gym tasks.")
    return env_args


def _image_specs(env_args: Dict[str, Any], policy: Any, image_obs: bool, camera_names: Sequence[str],
                 camera_size: int) -> List[Tuple[str, int, int]]:
    from dpft.envs.registry import env_kind

    shapes = _meta(policy, "obs_shapes", {}) or {}
    specs = []  # type: List[Tuple[str, int, int]]
    for k in list(_meta(policy, "obs_keys", []) or []):
        if k.endswith("_image"):
            shape = tuple(shapes.get(k, (camera_size, camera_size, 3)))
            specs.append((k, int(shape[0]), int(shape[1])))
    if image_obs:
        if env_kind(env_args) != "robosuite":
            raise DpftError("Recording demos: image_obs=True needs a robosuite task (cameras); {!r} has state "
                            "observations only.".format(env_args.get("env_name")))
        if isinstance(camera_names, str):
            camera_names = [camera_names]
        if not camera_names:
            raise DpftError("Recording demos: image_obs=True needs at least one camera name.")
        have = [k for k, _, _ in specs]
        specs += [(c + "_image", int(camera_size), int(camera_size)) for c in camera_names if c + "_image" not in have]
    return specs


def _file_env_args(env_args: Dict[str, Any], max_episode_steps: int,
                   images: Sequence[Tuple[str, int, int]]) -> Dict[str, Any]:
    """env_args stored in the file: the checkpoint's, the episode limit, and the cameras of stored images."""
    out = copy.deepcopy(env_args)
    out["max_episode_steps"] = int(max_episode_steps)
    kw = out.get("env_kwargs")
    if isinstance(kw, dict) and "backend" in kw:  # robosuite.make (robomimic) knows no such kwarg: keep it beside
        out["backend"] = kw.pop("backend")
    if images:
        kw = out.setdefault("env_kwargs", {})
        kw["camera_names"] = [k[: -len("_image")] for k, _, _ in images]
        kw["camera_heights"] = [h for _, h, _ in images]
        kw["camera_widths"] = [w for _, _, w in images]
        kw["use_camera_obs"] = True
        kw["has_offscreen_renderer"] = True
    return out


class _NoisyActions:
    """Gaussian noise of std ``noise`` in normalized action units, clamped to the normalized range [-1, 1]."""

    def __init__(self, policy: Any, noise: float):
        self.noise = float(noise)
        self.normalizer = getattr(policy, "normalizer", None)
        if self.noise > 0 and (self.normalizer is None or "action" not in getattr(self.normalizer, "keys", list)()):
            raise DpftError("Recording demos: noise={} needs the policy's action normalizer (policy.normalizer with "
                            "'action' statistics, as dpft checkpoints have); this policy has none.".format(noise))

    def __call__(self, actions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.noise <= 0:
            return actions
        norm = self.normalizer.normalize("action", actions)
        norm = np.clip(norm + self.noise * rng.standard_normal(norm.shape), -1.0, 1.0)
        return np.asarray(self.normalizer.unnormalize("action", norm), dtype=np.float64)


class _Trace:
    """One running episode: the observations (with reward/state keys) after the reset and after each action."""

    def __init__(self, index: int, seed: int, keys: Sequence[str]):
        self.index, self.seed = index, seed
        self.keys = list(keys)
        self.steps = {k: [] for k in self.keys}  # type: Dict[str, List[np.ndarray]]
        self.actions = []  # type: List[np.ndarray]
        self.rng = np.random.default_rng([int(seed), 1])

    def extend(self, hist: Dict[str, np.ndarray], actions: np.ndarray) -> None:
        """Append the last ``len(actions)`` observations of the history ``{key: (To', ...)}``."""
        k = len(actions)
        if k == 0:
            return
        for key in self.keys:
            self.steps[key].extend(list(hist[key][-k:]))
        self.actions.extend(list(actions))

    def episode(self, obs_keys: Sequence[str], has_state: bool, record: Dict[str, Any]) -> Dict[str, Any]:
        n = len(self.actions)
        obs = {k: np.stack(self.steps[k]) for k in obs_keys}
        rewards = np.asarray(self.steps[REWARD_KEY][1:], dtype=np.float64)
        dones = np.zeros(n, dtype=np.int64)
        dones[-1] = 1
        return {
            "obs": {k: v[:-1] for k, v in obs.items()},
            "next_obs": {k: v[1:] for k, v in obs.items()},
            "actions": np.stack(self.actions).astype(np.float64),
            "rewards": rewards,
            "dones": dones,
            "states": np.stack(self.steps[STATE_KEY][:-1]) if has_state else None,
            "seed": self.seed,
            "success": bool(record["success"]),
            "attrs": {"return": float(rewards.sum()), "terminated": bool(record["terminated"]),
                      "truncated": bool(record["truncated"]), "episode": int(self.index)},
        }


# --------------------------------------------------------------------------------------------------- recording
def record_demos(
    policy: Any,
    num: int,
    out: str,
    task: Optional[str] = None,
    seed: int = 0,
    envs: int = 1,
    deterministic: bool = True,
    noise: float = 0.0,
    keep_failures: bool = False,
    min_return: Optional[float] = None,
    max_episode_steps: Optional[int] = None,
    image_obs: bool = False,
    camera_names: Sequence[str] = DEFAULT_CAMERAS,
    camera_size: int = 84,
    terminate_on_success: bool = True,
    valid_ratio: float = 0.1,
    max_attempts: Optional[int] = None,
    weights: str = "ema",
    device: str = "cpu",
    progress: bool = True,
    worker_timeout_s: float = 120.0,
    overwrite: bool = False,
) -> Dict[str, Any]:
    """Record ``num`` episodes of ``policy`` into the robomimic HDF5 file ``out`` (see the module docstring).

    Args:
        policy: RUN_DIR, a checkpoint directory, or a loaded policy (``act``/``meta``, optional ``reset(rows)``).
        num: episodes to keep.
        out: destination ``.hdf5`` path (parent directories are created; an existing file is refused unless
            ``overwrite=True``, and then replaced only when the new file is complete).
        task: optional task name (``hopper``, ``lift``, ...): must match the checkpoint's env (or names the env when
            the checkpoint has no env_args).
        seed: episode ``i`` (counting attempts) runs with env seed ``seed + i``; also seeds the policy's generator
            and the train/valid split.
        envs: parallel environments (gym: in this process; robosuite: one worker process each).
        deterministic: passed to ``policy.act`` (Gaussian mean, DDIM eta 0 / DDPM min std).
        noise: std of Gaussian noise added to each action in normalized action units (the checkpoint's min-max
            scale, [-1, 1] = the training data's range), clamped to that range; 0 = the policy's own actions.
        keep_failures: keep episodes without task success too (robosuite; gym episodes have no success signal
            and always pass).
        min_return: drop episodes whose return is below this.
        max_episode_steps: episode limit (default: ``env_args["max_episode_steps"]`` when the checkpoint's data
            was recorded with one, else the task's default).
        image_obs, camera_names, camera_size: also store ``<camera>_image`` uint8 images (robosuite).
        terminate_on_success: end a robosuite episode at its first success state (the demo ends in success).
        valid_ratio: fraction of demos listed in ``mask/valid``.
        max_attempts: episodes to run at most (default ``3 * num``).
        weights, device: for :func:`dpft.load_policy` when ``policy`` is a path.
        progress: tqdm progress bar.
        overwrite: replace an existing ``out`` file.

    Returns:
        ``{"path", "env_name", "policy", "attempted", "kept", "successes", "success_rate", "failed", "samples",
        "num_train", "num_valid", "returns" (of the kept demos, in demo order), "mean_return", "episodes" (one dict
        per attempt: episode, seed, return, length, success, failed, kept, reason), "seconds"}``.

    Raises:
        DpftError: a bad argument, a path that is no dpft checkpoint, a task other than the checkpoint's, or fewer
        than ``num`` episodes passing the filters in ``max_attempts`` attempts.
    """
    _check_args(num, seed, envs, noise, min_return, max_episode_steps, valid_ratio, max_attempts)
    from dpft.envs.demos import DemoFileWriter
    from dpft.envs.registry import env_kind
    from dpft.envs.rollout import _check_policy_vs_env, _policy_generator, env_mode_for
    from dpft.envs.vector import VectorEnv

    num, seed, envs = int(num), int(seed), int(envs)
    writer = DemoFileWriter(out, "dpft demos", overwrite=overwrite)  # locked; released by the with block
    try:
        policy, source = _load(policy, weights, device)
        env_args = _resolve_env_args(policy, task, source)
        kind = env_kind(env_args)
        max_attempts = int(max_attempts) if max_attempts is not None else 3 * num
        if max_episode_steps is None and _is_int(env_args.get("max_episode_steps")):
            max_episode_steps = int(env_args["max_episode_steps"])
        run_args = {k: v for k, v in env_args.items() if k != "max_episode_steps"}
        policy_keys = [str(k) for k in (_meta(policy, "obs_keys") or [])]
        images = _image_specs(env_args, policy, bool(image_obs), camera_names, int(camera_size))
        if kind == "robosuite":  # the physics backend the episodes run on (images: robosuite's renderer), as recorded
            from dpft.envs.mujoco_backend import resolve_backend

            kw = dict(run_args.get("env_kwargs") or {})
            if images:
                kw.setdefault("backend", "robosuite")
            kw["backend"] = resolve_backend(dict(run_args, env_kwargs=kw), policy_keys)[0]
            run_args = dict(run_args, env_kwargs=kw)
        noisy = _NoisyActions(policy, float(noise))
        cond_steps = int(_meta(policy, "cond_steps", 1))
        act_steps = int(_meta(policy, "act_steps", 1))
        kwargs = {"max_episode_steps": max_episode_steps, "terminate_on_success": bool(terminate_on_success)}
        if kind == "robosuite":
            from dpft.envs.render import setup_rendering

            setup_rendering(require=bool(images))
        factory = _RecordingFactory(run_args, [k for k in policy_keys if not k.endswith("_image")], images,
                                    {k: v for k, v in kwargs.items() if v is not None})
        n_envs = min(envs, num)  # more envs than episodes still needed would idle
    except BaseException:
        writer.close()
        raise
    t0 = time.time()
    bar = None
    venv = None
    try:
        # histories long enough to hold every observation of a chunk (the policy sees the last cond_steps)
        venv = VectorEnv([factory] * n_envs, cond_steps=max(cond_steps, act_steps), act_steps=act_steps,
                         mode=env_mode_for(run_args), worker_timeout_s=worker_timeout_s)
        obs_keys = [k for k in venv.obs_shapes if k not in (REWARD_KEY, STATE_KEY)]
        view = types.SimpleNamespace(cond_steps=cond_steps, act_steps=act_steps, obs_shapes=venv.obs_shapes,
                                     action_dim=venv.action_dim)
        act_keys = _check_policy_vs_env(policy.meta, view)
        has_state = STATE_KEY in venv.obs_shapes
        trace_keys = obs_keys + [REWARD_KEY] + ([STATE_KEY] if has_state else [])
        act_kwargs = {"deterministic": bool(deterministic)}  # type: Dict[str, Any]
        generator = _policy_generator(policy, seed)
        if generator is not None:
            act_kwargs["generator"] = generator
        reset_fn = getattr(policy, "reset", None)
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=num, desc="record {}".format(env_args.get("env_name")), unit="demo")
        with writer:
            summary = _record_loop(venv, policy, act_keys, act_kwargs, reset_fn, noisy, trace_keys, obs_keys,
                                   has_state, writer, num, seed, max_attempts, bool(keep_failures), min_return,
                                   kind, bar)
            if summary["kept"] < num:
                raise DpftError(
                    "Recording demos: only {} of {} episodes passed the filters ({} successes, {} failed by env "
                    "faults; keep_failures={}, min_return={}), fewer than the num={} asked for, and at most {} "
                    "episodes (3 x num) are tried. Pass keep_failures=true, lower min_return or noise, or ask for "
                    "fewer (num=).".format(
                        summary["kept"], summary["attempted"], summary["successes"], summary["failed"],
                        bool(keep_failures), min_return, num, max_attempts))
            horizon = venv.max_episode_steps
            split = writer.finish(_file_env_args(run_args, horizon, images), float(valid_ratio), seed)
    finally:
        writer.close()
        if bar is not None:
            bar.close()
        if venv is not None:
            venv.close()
    kept = sorted((e for e in summary["episodes"] if e["kept"]), key=lambda e: e["episode"])
    returns = [e["return"] for e in kept]
    summary.update({
        "path": writer.path, "env_name": env_args.get("env_name"), "policy": source, "samples": writer.samples,
        "num_train": len(split["train"]), "num_valid": len(split.get("valid", [])), "returns": returns,
        "mean_return": float(np.mean(returns)), "max_episode_steps": int(horizon), "seconds": time.time() - t0,
    })
    from dpft.envs.registry import has_success_signal

    if not has_success_signal(env_args):  # Gym locomotion: no success figure
        summary["success_rate"] = summary["successes"] = None
    return summary


def _record_loop(venv: Any, policy: Any, act_keys: List[str], act_kwargs: Dict[str, Any], reset_fn: Any,
                 noisy: _NoisyActions, trace_keys: List[str], obs_keys: List[str], has_state: bool, writer: Any,
                 num: int, seed: int, max_attempts: int, keep_failures: bool, min_return: Optional[float], kind: str,
                 bar: Any) -> Dict[str, Any]:
    """Schedule episodes over the envs (a finished env takes the next episode index while more may be needed),
    step chunks, and write kept episodes. Returns the counts and per-attempt records."""
    n, to = venv.num_envs, int(_meta(policy, "cond_steps", 1))
    traces = [None] * n  # type: List[Optional[_Trace]]
    records = []  # type: List[Dict[str, Any]]
    state = {"attempted": 0, "kept": 0}
    chunk_limit = venv.max_episode_steps + 1
    chunks = [0] * n

    def start(indices: List[int], obs: Optional[Dict[str, np.ndarray]] = None) -> Dict[str, np.ndarray]:
        """Give the next episodes to the idle envs in ``indices`` while more may be needed; reset them."""
        chosen, seeds = [], []
        for i in indices:
            running = sum(t is not None for t in traces)
            if state["attempted"] >= max_attempts or state["kept"] + running >= num:
                break
            traces[i] = _Trace(state["attempted"], seed + state["attempted"], trace_keys)
            chosen.append(i)
            seeds.append(seed + state["attempted"])
            state["attempted"] += 1
        if not chosen:
            return obs if obs is not None else {}
        hist = venv.reset_envs(chosen, seeds)
        for i in chosen:
            for k in trace_keys:
                traces[i].steps[k].append(hist[k][i, -1])
            chunks[i] = 0
        if callable(reset_fn):
            reset_fn(list(chosen))
        return hist

    obs = start(list(range(n)))
    while any(t is not None for t in traces):
        active = np.array([t is not None for t in traces])
        chunk = policy.act({k: obs[k][:, -to:] for k in act_keys}, **act_kwargs)
        if hasattr(chunk, "detach"):
            chunk = chunk.detach().cpu().numpy()
        chunk = np.array(chunk, dtype=np.float64)
        if chunk.shape != (n, venv.act_steps, venv.action_dim):
            raise DpftError("policy.act returned actions of shape {}; expected (envs, act_steps, action_dim) = {}."
                            .format(chunk.shape, (n, venv.act_steps, venv.action_dim)))
        for i in np.flatnonzero(active):
            chunk[i] = noisy(chunk[i], traces[i].rng)
        res = venv.step(chunk, active=active, auto_reset=False)
        ended = {ep["env"]: ep for ep in res.info["episodes"]}
        for i in np.flatnonzero(active):
            t = traces[i]
            steps = int(res.info["steps"][i])
            if i not in ended:
                t.extend({k: res.obs[k][i] for k in trace_keys}, chunk[i, :steps])
                chunks[i] += 1
                if chunks[i] > chunk_limit:
                    raise DpftError("Env {} ran {} chunks without ending its episode although max_episode_steps is "
                                    "{}.".format(i, chunks[i], venv.max_episode_steps))
                continue
            rec = ended[i]
            entry = {"episode": t.index, "seed": t.seed, "return": rec["return"], "length": int(rec["length"]),
                     "success": bool(rec["success"]), "failed": bool(rec["failed"]), "reason": rec["reason"],
                     "kept": False}
            if not rec["failed"]:
                t.extend({k: res.final_obs[k][i] for k in trace_keys}, chunk[i, :steps])
                passes = (keep_failures or kind != "robosuite" or entry["success"]) and (
                    min_return is None or rec["return"] >= float(min_return))
                if passes:
                    ep = t.episode(obs_keys, has_state, rec)
                    entry["return"] = float(ep["attrs"]["return"])
                    writer.add(ep, order=t.index)
                    entry["kept"] = True
                    state["kept"] += 1
                    if bar is not None:
                        bar.update(1)
            records.append(entry)
            traces[i] = None
            if bar is not None:
                done = len(records)
                bar.set_postfix(attempts=done, kept=state["kept"], refresh=True)
        idle = [i for i in range(n) if traces[i] is None]
        obs = start(idle, res.obs) if idle else res.obs
    records.sort(key=lambda e: e["episode"])
    successes = sum(e["success"] for e in records)
    return {"attempted": len(records), "kept": state["kept"], "successes": successes,
            "success_rate": successes / max(len(records), 1), "failed": sum(e["failed"] for e in records),
            "episodes": records}


__all__ = ["record_demos"]
