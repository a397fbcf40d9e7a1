"""Scripted-expert demonstrations written as robomimic HDF5 files.

:func:`make_demos` runs the scripted experts of :mod:`dpft.envs.experts` in :class:`dpft.envs.robosuite_env.RobosuiteEnv`
and writes the file the way robomimic's / robosuite's dataset tools do::

    data                      attrs: total (int, all samples), env_args (JSON of the env_args used)
      demo_<i>                attrs: num_samples, model_file (MJCF xml), seed (episode seed), success
        obs/<key>             (N, ...)  robot0_eef_pos, robot0_eef_quat, robot0_gripper_qpos, robot0_joint_pos,
                                        robot0_joint_pos_cos, robot0_joint_pos_sin, robot0_joint_vel,
                                        robot0_gripper_qvel, object (float64); <camera>_image uint8 (H, W, 3)
        next_obs/<key>        (N, ...)  observation after each action (next_obs[t] == obs[t + 1])
        actions               (N, 7)    float64 in [-1, 1] (OSC_POSE delta + gripper)
        rewards               (N,)      float64 sparse task reward (1 in success states)
        dones                 (N,)      int64, 1 at the last step only (robomimic done_mode 1)
        states                (N, D)    float64 flattened MuJoCo states (time, qpos, qvel) before each action
    mask/train, mask/valid    byte strings of demo names (seeded split)

An episode stops :data:`POST_SUCCESS_STEPS` steps after the first success (ending in a success state, as
robomimic's human demonstrations do). Failed episodes are dropped (unless ``keep_failures``) and more are run, up
to ``3 * num`` attempts. The file is written under a temporary name in the destination directory and renamed
when complete, so an interrupted run never leaves a truncated file under the final name.

Example::

    from dpft.envs.demos import make_demos
    summary = make_demos("lift", num=100, out="data/lift_expert.hdf5", noise=0.3)
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from dpft.errors import DpftError
from dpft.envs.experts import EXPERTS, Expert

#: steps recorded after the first success (the demo ends in a success state)
POST_SUCCESS_STEPS = 10

#: steps an episode may go on after the expert finished without success (e.g. a nut still sliding down)
DONE_GRACE_STEPS = 25

#: robomimic's standard low-dim observation suffixes (robot<i>_ prefixed) plus ``object``; velocity keys that
#: robosuite 1.5 no longer provides (``eef_vel_lin``/``eef_vel_ang``) are stored when the env has them.
#: Accelerations are not stored: they are not part of the MuJoCo state, so ``reset_to(states[t])`` could not
#: reproduce them.
LOW_DIM_SUFFIXES = (
    "eef_pos", "eef_quat", "eef_vel_lin", "eef_vel_ang", "gripper_qpos", "gripper_qvel",
    "joint_pos", "joint_pos_cos", "joint_pos_sin", "joint_vel",
)


def demo_obs_keys(available: Sequence[str], image_keys: Sequence[str] = ()) -> List[str]:
    """Observation keys a demo file stores, chosen from the env's ``available`` keys.

    Returns the standard robomimic low-dim keys (:data:`LOW_DIM_SUFFIXES` of every ``robot<i>_`` prefix, then
    ``object``) that the env has, followed by ``image_keys`` (each must be available).
    """
    available = list(available)
    prefixes = sorted({k.split("_", 1)[0] for k in available if k.startswith("robot") and "_" in k})
    keys = [p + "_" + s for p in prefixes for s in LOW_DIM_SUFFIXES if p + "_" + s in available]
    if "object" in available:
        keys.append("object")
    for k in image_keys:
        if k not in available:
            raise DpftError("Image observation {!r} is not produced by the env; available: {}.".format(
                k, ", ".join(available)))
        keys.append(k)
    return keys


def split_train_valid(names: Sequence[str], valid_ratio: float, seed: int) -> Dict[str, List[str]]:
    """Seeded train/valid split of demo names (robomimic's ``mask/train`` and ``mask/valid``).

    ``int(valid_ratio * n)`` demos (at least 1 when ``n >= 2`` and ``valid_ratio > 0``, at most ``n - 1``) go to
    ``valid``; with ``valid_ratio == 0`` or a single demo there is no ``valid`` key. Lists are in demo order.
    """
    names = list(names)
    n = len(names)
    n_valid = 0
    if n >= 2 and valid_ratio > 0.0:
        n_valid = min(n - 1, max(1, int(valid_ratio * n)))
    picked = set(np.random.default_rng(seed).permutation(n)[:n_valid].tolist())
    out = {"train": [nm for i, nm in enumerate(names) if i not in picked]}
    if n_valid:
        out["valid"] = [nm for i, nm in enumerate(names) if i in picked]
    return out


def _check_args(task: str, num: Any, noise: Any, valid_ratio: Any, max_steps: Any, seed: Any) -> None:
    if task not in EXPERTS:
        raise DpftError(
            "make_demos: no scripted expert for task {!r}; tasks with experts: {}.".format(
                task, ", ".join(sorted(EXPERTS)))
        )
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 1:
        raise DpftError("make_demos: num (demonstrations to keep) must be an integer >= 1, got {!r}.".format(num))
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DpftError("make_demos: seed must be a non-negative integer, got {!r}.".format(seed))
    try:
        noise_f = float(noise)
    except (TypeError, ValueError):
        noise_f = float("nan")
    if not np.isfinite(noise_f) or noise_f < 0:
        raise DpftError("make_demos: noise must be a finite number >= 0 (0 = clean demos), got {!r}.".format(noise))
    try:
        ratio = float(valid_ratio)
    except (TypeError, ValueError):
        ratio = float("nan")
    if not (0.0 <= ratio < 1.0):
        raise DpftError("make_demos: valid_ratio must be in [0, 1), got {!r}.".format(valid_ratio))
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer))
                                  or max_steps < 1):
        raise DpftError("make_demos: max_steps must be a positive integer or None, got {!r}.".format(max_steps))


def observe(env: Any, keys: Sequence[str], camera_size: int = 84) -> Dict[str, np.ndarray]:
    """The observation of the current simulator state as ``env.reset_to(env.get_state())`` would return it.

    robosuite returns observations sampled after the last physics sub-step, whose kinematics (site and body
    positions) lag the integrated joint positions by one sub-step; robomimic datasets instead hold observations
    recomputed from each stored state. So the kinematics are refreshed (``mj_forward``, which changes no state)
    before reading. ``<camera>_image`` keys are rendered upright at ``camera_size`` squared.
    """
    env.env.sim.forward()
    low = env.get_observation()
    out = {}  # type: Dict[str, np.ndarray]
    for k in keys:
        if k.endswith("_image") and k not in low:
            out[k] = env.render(camera_size, camera_size, k[: -len("_image")])
        else:
            out[k] = low[k]
    return out


def run_episode(env: Any, expert: Expert, seed: int, keys: Sequence[str], max_steps: int,
                camera_size: int = 84, rng: Optional[np.random.Generator] = None) -> Dict[str, Any]:
    """Run one expert episode in a RobosuiteEnv and record it (observations as in :func:`observe`).

    Args:
        env: :class:`dpft.envs.robosuite_env.RobosuiteEnv` of the expert's task.
        expert: the scripted expert (reset here with ``rng``).
        seed: episode seed (``env.reset(seed)``).
        keys: observation keys to record (``<camera>_image`` keys are rendered at ``camera_size``).
        max_steps: step limit.
        camera_size: image height and width.
        rng: noise generator of the expert (default ``default_rng([seed, 1])``).

    Returns:
        ``{"obs": {k: (N, ...)}, "next_obs": {k: (N, ...)}, "actions": (N, Da), "rewards": (N,), "dones": (N,),
        "states": (N, D), "success": bool, "model_file": str, "seed": int}``.
    """
    env.reset(seed=int(seed))
    obs = observe(env, keys, camera_size)
    model_file = env.env.sim.model.get_xml()
    expert.reset(env, rng=rng if rng is not None else np.random.default_rng([int(seed), 1]))
    obs_l = {k: [] for k in keys}  # type: Dict[str, List[np.ndarray]]
    next_l = {k: [] for k in keys}  # type: Dict[str, List[np.ndarray]]
    actions, rewards, states = [], [], []
    first_success = None  # type: Optional[int]
    done_at = None  # type: Optional[int]
    success = False
    for t in range(int(max_steps)):
        states.append(env.get_state())
        action = np.clip(np.asarray(expert.act(env), dtype=np.float64), -1.0, 1.0)
        _, reward, _, _, info = env.step(action)
        nxt = observe(env, keys, camera_size)
        for k in keys:
            obs_l[k].append(obs[k])
            next_l[k].append(nxt[k])
        actions.append(action)
        rewards.append(float(reward))
        obs = nxt
        success = bool(info["success"])
        if success and first_success is None:
            first_success = t
        if expert.done and done_at is None:
            done_at = t
        if success and first_success is not None and t >= first_success + POST_SUCCESS_STEPS:
            break
        if not success and done_at is not None and t >= done_at + DONE_GRACE_STEPS:
            break
    n = len(actions)
    dones = np.zeros(n, dtype=np.int64)
    dones[-1] = 1
    return {
        "obs": {k: np.stack(v) for k, v in obs_l.items()},
        "next_obs": {k: np.stack(v) for k, v in next_l.items()},
        "actions": np.stack(actions).astype(np.float64),
        "rewards": np.asarray(rewards, dtype=np.float64),
        "dones": dones,
        "states": np.stack(states).astype(np.float64),
        "success": success,
        "model_file": model_file,
        "seed": int(seed),
    }


def _write_demo(data_grp: Any, name: str, ep: Dict[str, Any]) -> int:
    """Write one episode dict (see :func:`run_episode`) as the group ``data/<name>``; returns its length.

    ``obs``, ``next_obs`` and ``actions`` are required; ``rewards``, ``dones`` and ``states`` are written when
    present (and not None); the attributes ``model_file``, ``seed``, ``success`` when present, plus any of
    ``ep["attrs"]``.
    """
    grp = data_grp.create_group(name)
    n = int(ep["actions"].shape[0])
    grp.attrs["num_samples"] = n
    if ep.get("model_file") is not None:
        grp.attrs["model_file"] = ep["model_file"]
    if "seed" in ep:
        grp.attrs["seed"] = int(ep["seed"])
    if "success" in ep:
        grp.attrs["success"] = bool(ep["success"])
    for k, v in (ep.get("attrs") or {}).items():
        grp.attrs[k] = v
    for part in ("obs", "next_obs"):
        g = grp.create_group(part)
        for k, v in ep[part].items():
            g.create_dataset(k, data=v)
    for k in ("actions", "rewards", "dones", "states"):
        if ep.get(k) is not None:
            grp.create_dataset(k, data=ep[k])
    return n


class DemoFileWriter:
    """Write a robomimic HDF5 file atomically (the one writer of :func:`make_demos` and
    :func:`dpft.envs.record.record_demos`).

    Episodes are written into a temporary file in the destination directory as they come (so memory holds one
    episode at a time), named ``demo_0, demo_1, ...`` in the order of their ``order`` key when the file is
    finished; :meth:`finish` writes ``data.attrs["total"]``, ``data.attrs["env_args"]`` (JSON) and the seeded
    ``mask/train`` / ``mask/valid`` split. Leaving the ``with`` block after :meth:`finish` renames the file to
    its final name (``os.replace``); leaving it without :meth:`finish` or by an exception deletes it, so an
    interrupted run never leaves a truncated file under the final name.

    Example::

        with DemoFileWriter("data/x.hdf5", "record_demos") as w:
            w.add(episode, order=3)
            split = w.finish(env_args, valid_ratio=0.1, seed=0)
    """

    def __init__(self, out: Any, caller: str = "make_demos", overwrite: bool = False):
        from dpft.rundir import lock_output_file

        out = os.path.abspath(os.fspath(out))
        if os.path.isdir(out):
            raise DpftError("{}: out={!r} is a directory; expected an .hdf5 file path.".format(caller, out))
        # locked for the writer's life (a second writer of the same file is refused naming this process); an
        # existing file is refused unless overwrite=True, and then replaced only when the new one is complete
        self._lock = lock_output_file(out, overwrite, option="out", command="dpft demos")
        self.path = out
        self.caller = caller
        self.samples = 0
        self._orders = []  # type: List[Any]
        self._file = None  # type: Any
        self._tmp = None  # type: Optional[str]
        self._finished = False

    def __enter__(self) -> "DemoFileWriter":
        import h5py

        out_dir = os.path.dirname(self.path)
        os.makedirs(out_dir, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(prefix="." + os.path.basename(self.path) + ".", suffix=".tmp", dir=out_dir)
        os.close(fd)
        try:
            self._file = h5py.File(self._tmp, "w")
            self._data = self._file.create_group("data")
        except BaseException:
            self._discard()
            raise
        return self

    @property
    def num_demos(self) -> int:
        return len(self._orders)

    def add(self, ep: Dict[str, Any], order: Any = None) -> int:
        """Write one episode (``order``: sort key of its final name, default: the number added so far);
        returns its number of samples."""
        order = len(self._orders) if order is None else order
        if order in self._orders:
            raise ValueError("DemoFileWriter.add: order {!r} was used already".format(order))
        n = _write_demo(self._data, "_pending_{}".format(len(self._orders)), ep)
        self._orders.append(order)
        self.samples += n
        return n

    def finish(self, env_args: Dict[str, Any], valid_ratio: float, seed: int) -> Dict[str, List[str]]:
        """Name the demos, write ``total``, ``env_args`` and the train/valid masks; returns the split."""
        ranked = sorted(range(len(self._orders)), key=lambda j: self._orders[j])
        names = []  # type: List[str]
        for i, j in enumerate(ranked):
            name = "demo_{}".format(i)
            self._data.move("_pending_{}".format(j), name)
            names.append(name)
        self._data.attrs["total"] = int(self.samples)
        self._data.attrs["env_args"] = json.dumps(env_args)
        split = split_train_valid(names, float(valid_ratio), int(seed))
        for key, members in split.items():
            self._file.create_dataset("mask/" + key, data=np.array(members, dtype="S"))
        self._finished = True
        return split

    def _discard(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            finally:
                self._file = None
        if self._tmp is not None and os.path.exists(self._tmp):
            os.remove(self._tmp)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None or not self._finished:
            try:
                self._discard()
            finally:
                self.close()
            return
        try:
            self._file.close()
            self._file = None
            from dpft.checkpoint import default_file_mode

            os.chmod(self._tmp, default_file_mode())  # mkstemp makes it 0600: the mode open() would give
            os.replace(self._tmp, self.path)
        finally:
            self.close()

    def close(self) -> None:
        """Release the output file's lock (idempotent; leaving the ``with`` block does it)."""
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.close()


def make_demos(task: str, num: int, out: str, seed: int = 0, noise: float = 0.0, image_obs: bool = False,
               camera_names: Sequence[str] = ("agentview", "robot0_eye_in_hand"), camera_size: int = 84,
               max_steps: Optional[int] = None, keep_failures: bool = False, valid_ratio: float = 0.1,
               progress: bool = True, overwrite: bool = False) -> Dict[str, Any]:
    """Generate ``num`` scripted-expert demonstrations of ``task`` into the robomimic HDF5 file ``out``.

    Args:
        task: a task with a scripted expert (a key of :data:`dpft.envs.experts.EXPERTS`: ``lift``, ``can``, ...).
        num: demonstrations to keep.
        out: destination ``.hdf5`` path (parent directories are created; an existing file is refused unless
            ``overwrite=True``, and then replaced only when the new file is complete).
        seed: episode ``i`` (counting attempts) is seeded ``seed + i`` (env reset and expert noise); the
            train/valid split is seeded with ``seed``.
        noise: expert imperfection (0 = clean and deterministic; 0.3-0.5 = human-like).
        image_obs: also store ``<camera>_image`` uint8 ``(camera_size, camera_size, 3)`` for ``camera_names``.
        camera_names, camera_size: cameras for image observations.
        max_steps: step limit per episode (default: the task's evaluation horizon in RobosuiteEnv).
        keep_failures: keep unsuccessful episodes too (then exactly ``num`` episodes are run).
        valid_ratio: fraction of demos in ``mask/valid`` (at least one when ``num >= 2`` and the ratio is > 0).
        progress: show a tqdm progress bar.

    Returns:
        Summary ``{"path", "task", "attempted", "kept", "successes", "success_rate", "samples", "num_train",
        "num_valid", "seconds", "seconds_per_demo"}`` (``success_rate`` = successes / attempted).

    Raises:
        DpftError: unknown task or bad argument, or fewer than ``num`` successes in ``3 * num`` attempts.
    """
    _check_args(task, num, noise, valid_ratio, max_steps, seed)
    from dpft.envs.robosuite_env import RobosuiteEnv, default_env_args

    num, seed, noise = int(num), int(seed), float(noise)
    if isinstance(camera_names, str):
        camera_names = [camera_names]
    camera_names = list(camera_names)
    env_args = default_env_args(task, image_obs=image_obs, camera_names=camera_names, camera_size=camera_size)
    writer = DemoFileWriter(out, "dpft demos", overwrite=overwrite)  # checks and locks the path before the simulator

    # the episodes run without camera observables (robosuite would render every step, before the kinematics are
    # refreshed); images are rendered from the refreshed state by observe()
    try:
        if image_obs:  # images through robosuite's renderer, as robomimic's image datasets
            env = RobosuiteEnv(default_env_args(task), max_episode_steps=max_steps)
        else:  # the default physics backend of the task (dpft.envs.mujoco_backend: the fast one where it holds)
            from dpft.envs.registry import make_env

            env = make_env(default_env_args(task), max_episode_steps=max_steps)
    except BaseException:
        writer.close()
        raise
    if image_obs:
        known = env.camera_names()
        missing = [c for c in camera_names if c not in known]
        if missing:
            env.close()
            writer.close()
            raise DpftError("make_demos: camera(s) {} not in the {} scene; cameras: {}.".format(
                ", ".join(repr(c) for c in missing), env.env_name, ", ".join(known)))
    image_keys = [c + "_image" for c in camera_names] if image_obs else []
    keys = demo_obs_keys(list(env.obs_keys) + image_keys, image_keys)
    horizon = int(max_steps) if max_steps is not None else env.max_episode_steps
    expert = EXPERTS[task](noise=noise)
    max_attempts = num if keep_failures else 3 * num

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=num, desc="{} demos".format(task), unit="demo")
    t0 = time.time()
    attempted = kept = successes = samples = 0
    try:
        with writer:
            while kept < num and attempted < max_attempts:
                ep = run_episode(env, expert, seed + attempted, keys, horizon, camera_size=int(camera_size))
                attempted += 1
                successes += int(ep["success"])
                if bar is not None:
                    bar.set_postfix(attempts=attempted, success="{:.0%}".format(successes / attempted),
                                    refresh=False)
                if ep["success"] or keep_failures:
                    samples += writer.add(ep)
                    kept += 1
                    if bar is not None:
                        bar.update(1)
                elif bar is not None:
                    bar.refresh()
            if kept < num:
                raise DpftError(
                    "make_demos({!r}): only {} of {} episodes succeeded (success rate {:.0%}, noise={}), fewer than "
                    "the {} demonstrations asked for; lower noise, raise max_steps (now {}) or pass "
                    "keep_failures=True.".format(task, successes, attempted, successes / max(attempted, 1), noise,
                                                 num, horizon)
                )
            # beside env_kwargs (robomimic's robosuite.make knows no such key): the physics that made the file
            backend = "robosuite" if isinstance(env, RobosuiteEnv) else "mujoco"
            split = writer.finish(dict(env_args, backend=backend), float(valid_ratio), seed)
    finally:
        if bar is not None:
            bar.close()
        env.close()
    seconds = time.time() - t0
    return {
        "path": writer.path,
        "task": task,
        "attempted": attempted,
        "kept": kept,
        "successes": successes,
        "success_rate": successes / attempted,
        "samples": samples,
        "num_train": len(split["train"]),
        "num_valid": len(split.get("valid", [])),
        "seconds": seconds,
        "seconds_per_demo": seconds / max(kept, 1),
    }
