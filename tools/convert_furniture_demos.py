"""Convert FurnitureBench demonstration pickles into a robomimic-layout HDF5 file dpft can train on.

Input: the episode files FurnitureBench and ResiP write (``.pkl``, ``.pkl.xz``, ``.pkl.gz``): a dict with
``observations`` (a list of dicts with ``robot_state`` (a dict ``ee_pos, ee_quat (xyzw), ee_pos_vel,
ee_ori_vel, gripper_width, ...`` or a flat 14-vector), ``parts_poses`` and ``color_image1`` (wrist) /
``color_image2`` (front) uint8 HWC), ``actions`` (8-D ``[delta pos 3, delta quat xyzw 4, gripper 1]``),
``rewards``, ``skills``, ``success``, ``furniture`` (``task`` in ResiP rollouts). References:
``furniture_bench/data/data_collector.py::DataCollector.save`` (ankile fork) and ResiP's
``src/data_collection/io.py::save_raw_rollout``.

``parts_poses`` sizes: teleoperated and scripted demos from the fork's, ResiP's and clvrai's collectors are
recorded with ``FurnitureSimFull-v0`` (``furniture_sim_env.py``), whose ``parts_poses`` has ``num_parts * 7``
values (35 for one_leg) without the obstacle; only ``FurnitureRLSimEnv`` (what dpft fine-tunes in, and ResiP's
``save_raw_rollout`` of RL-env rollouts) appends the front obstacle's pose, ``(num_parts + 1) * 7`` values.
Files of the first kind are refused unless ``append_obstacle=True`` (``--append-obstacle``), which appends the
obstacle's nominal pose in the AprilTag frame (:data:`dpft.envs.furniture.OBSTACLE_FRONT_NOMINAL_POSE`, the
fork's reset pose before the RL env's random offset) to every step; the summary and the file's ``conversion``
attribute report how many episodes got it. The simulator collector stores one observation more than
actions (the one after the last action); it is dropped.

**Pickle is the upstream format and can execute code when loaded: convert only files you trust.** This
converter is the only place dpft reads pickles; its output is plain HDF5.

Output (robomimic layout, see docs/design.md):

* ``data/demo_<i>/obs/robot_state`` float32 ``(T, 16)``: ee_pos, ee rot6d (first two rows of the rotation
  matrix), ee_pos_vel, ee_ori_vel, gripper_width (ResiP's ``np_proprioceptive_quat_to_6d_rotation``);
* ``data/demo_<i>/obs/parts_poses`` float32 ``(T, P)`` as stored (P = (num_parts + 1) * 7: 42 one_leg,
  28 lamp / round_table), checked against the task; ``num_parts * 7`` with ``append_obstacle`` (see above);
* with ``include_images``: ``obs/color_image1``, ``obs/color_image2`` uint8 ``(T, H, W, 3)`` as stored (no
  resizing; channel-first frames are transposed);
* ``actions`` float32 ``(T, 10)``: **absolute** end-effector pose ``[pos 3, rot6d 6, gripper 1]``, the
  action space of ``FurnitureRLSimEnv(action_type="pos", act_rot_repr="rot_6d")`` that DPPO and ResiP train
  on. From the stored deltas, as ResiP's ``process_pickles.py`` (``calculate_pos_action_from_delta``):
  ``pos = ee_pos + clip(delta_pos, +-0.025)``, ``quat = ee_quat * clip(delta_quat, 0.35 rad)`` (the delta
  acts in the end-effector frame, as in the fork's ``simulate_step``), ``gripper = sign(gripper)``.
  ResiP clips the rotation with the norm of the whole trajectory's rotation vectors (a bug that shrinks
  every rotation of a long episode); here each step's rotation is clipped on its own.
  10-D stored actions are taken as absolute rot6d poses already (``action_format="pos_rot6d"``).
* ``rewards`` float32 ``(T,)``; ``dones`` int64 ``(T,)`` with 1 at the last step (end of trajectory);
* demo attrs ``num_samples``, ``success``, ``source_file``; ``data`` attrs ``total`` and ``env_args``
  (JSON ``{"env_name": "FurnitureRLSim-<task>", "type": "furniture", "env_kwargs": {...}}``) and
  ``conversion`` (JSON of the settings used); ``mask/train`` and ``mask/valid`` (seeded random split).

Example::

    python tools/convert_furniture_demos.py --input raw/one_leg/low --out one_leg_low.hdf5 --task one_leg
"""
from __future__ import annotations

import argparse
import gzip
import json
import lzma
import os
import pickle
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

try:  # running as `python tools/convert_furniture_demos.py` puts tools/ (not the repo) on sys.path
    import dpft.envs  # noqa: F401
except ImportError:  # pragma: no cover - depends on how the script is launched
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import h5py  # noqa: E402
import torch  # noqa: E402

from dpft.errors import DpftError  # noqa: E402
from dpft.envs.furniture import DEFAULT_STATE_OBS, OBSTACLE_FRONT_NOMINAL_POSE, ROBOT_STATE_KEYS, TASKS  # noqa: E402
from dpft.envs.rotation import (  # noqa: E402
    axis_angle_to_quat_xyzw,
    matrix_to_rot6d,
    quat_multiply,
    quat_xyzw_to_axis_angle,
    quat_xyzw_to_rot6d,
    robot_state_quat_to_rot6d,
    rot6d_to_matrix,
)

__all__ = ["convert_furniture_demos", "load_episode", "convert_episode", "find_episode_files", "parse_success",
           "main"]

PICKLE_SUFFIXES = (".pkl", ".pkl.xz", ".pkl.gz")
IMAGE_KEYS = ("color_image1", "color_image2")
ACTION_FORMATS = ("auto", "delta_quat", "pos_quat", "pos_rot6d")


def find_episode_files(inputs: Union[str, Path, Sequence[Union[str, Path]]]) -> List[Path]:
    """Episode files from files and/or directories (searched recursively), sorted by path."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    files: List[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(p for p in path.rglob("*") if p.is_file() and p.name.endswith(PICKLE_SUFFIXES))
        elif path.is_file():
            if not path.name.endswith(PICKLE_SUFFIXES):
                raise DpftError("%s is not a FurnitureBench episode file: expected a name ending in %s."
                                % (path, ", ".join(PICKLE_SUFFIXES)))
            files.append(path)
        else:
            raise DpftError("Input %s does not exist (expected an episode file or a directory of them)." % path)
    files = sorted(set(files), key=lambda p: str(p))
    if not files:
        raise DpftError("No FurnitureBench episode files (%s) found under %s."
                        % (", ".join(PICKLE_SUFFIXES), ", ".join(str(i) for i in inputs)))
    return files


def load_episode(path: Union[str, Path]) -> Dict[str, Any]:
    """Unpickle one episode file (``.pkl``, ``.pkl.xz`` or ``.pkl.gz``). Trusted files only."""
    path = Path(path)
    opener = lzma.open if path.name.endswith(".xz") else gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:  # type: ignore[operator]
            data = pickle.load(fh)
    except Exception as exc:  # corrupt archive, truncated pickle, missing module for a pickled class...
        raise DpftError("Could not unpickle %s (%s: %s); expected a FurnitureBench episode dict."
                        % (path, type(exc).__name__, exc)) from None
    if not isinstance(data, dict):
        raise DpftError("%s holds a %s; expected a dict with 'observations' and 'actions'."
                        % (path, type(data).__name__))
    for key in ("observations", "actions"):
        if key not in data:
            raise DpftError("%s lacks the key %r (has %s)." % (path, key, sorted(data)))
    return data


def _robot_state_14(obs: Dict[str, Any], path: Path, t: int) -> np.ndarray:
    rs = obs.get("robot_state")
    if rs is None:
        raise DpftError("%s: observations[%d] has no 'robot_state'." % (path, t))
    if isinstance(rs, dict):
        parts = []
        for key, dim in ROBOT_STATE_KEYS:
            if key not in rs:
                raise DpftError("%s: observations[%d]['robot_state'] lacks %r (has %s)." % (path, t, key, sorted(rs)))
            value = np.asarray(rs[key], dtype=np.float64).reshape(-1)
            if value.size != dim:
                raise DpftError("%s: observations[%d]['robot_state'][%r] has %d values; expected %d."
                                % (path, t, key, value.size, dim))
            parts.append(value)
        return np.concatenate(parts)
    flat = np.asarray(rs, dtype=np.float64).reshape(-1)
    if flat.size != 14:
        raise DpftError("%s: observations[%d]['robot_state'] is a vector of %d values; expected 14 (ee_pos, "
                        "ee_quat xyzw, ee_pos_vel, ee_ori_vel, gripper_width)." % (path, t, flat.size))
    return flat


def _image(obs: Dict[str, Any], key: str, path: Path, t: int) -> np.ndarray:
    if key not in obs:
        raise DpftError("%s: observations[%d] has no %r; convert without images or use demos that stored "
                        "camera frames." % (path, t, key))
    img = np.asarray(obs[key])
    if img.ndim == 3 and img.shape[0] == 3 and img.shape[-1] != 3:
        img = np.transpose(img, (1, 2, 0))
    if img.ndim != 3 or img.shape[-1] != 3:
        raise DpftError("%s: observations[%d][%r] has shape %s; expected (H, W, 3)." % (path, t, key, img.shape))
    if img.dtype != np.uint8:
        if np.issubdtype(img.dtype, np.floating) and img.size and img.max() <= 1.0:
            raise DpftError("%s: observations[%d][%r] is float in [0, 1]; expected uint8 frames." % (path, t, key))
        img = np.clip(img, 0, 255).astype(np.uint8)
    return img


def _clip_rotation(quat: torch.Tensor, max_angle: Optional[float]) -> torch.Tensor:
    """Per-row rotation magnitude clip of xyzw quaternions ``(T, 4)``."""
    quat = quat / quat.norm(dim=-1, keepdim=True)
    if max_angle is None:
        return quat
    rotvec = quat_xyzw_to_axis_angle(quat)
    angle = rotvec.norm(dim=-1, keepdim=True)
    scale = torch.clamp(max_angle / torch.clamp(angle, min=1e-12), max=1.0)
    return axis_angle_to_quat_xyzw(rotvec * scale)


def _absolute_actions(actions: np.ndarray, robot_state: np.ndarray, fmt: str, clip_delta_pos: Optional[float],
                      clip_delta_rot: Optional[float]) -> np.ndarray:
    """``(T, 8|10)`` stored actions + ``(T, 14)`` robot states -> ``(T, 10)`` absolute rot6d actions."""
    act = torch.from_numpy(actions.astype(np.float64))
    rs = torch.from_numpy(robot_state)
    gripper = torch.sign(act[:, -1:])
    if fmt == "delta_quat":
        dpos = act[:, :3]
        if clip_delta_pos is not None:
            dpos = torch.clamp(dpos, -clip_delta_pos, clip_delta_pos)
        dquat = _clip_rotation(act[:, 3:7], clip_delta_rot)
        pos = rs[:, :3] + dpos
        rot6d = quat_xyzw_to_rot6d(quat_multiply(rs[:, 3:7], dquat))
    elif fmt == "pos_quat":
        pos = act[:, :3]
        rot6d = quat_xyzw_to_rot6d(act[:, 3:7])
    else:  # pos_rot6d: re-orthonormalize so every action is a valid rotation
        pos = act[:, :3]
        rot6d = matrix_to_rot6d(rot6d_to_matrix(act[:, 3:9]))
    return torch.cat([pos, rot6d, gripper], dim=-1).numpy().astype(np.float32)


def _resolve_action_format(fmt: str, dim: int, path: Path) -> str:
    if fmt == "auto":
        if dim == 8:
            return "delta_quat"
        if dim == 10:
            return "pos_rot6d"
        raise DpftError("%s: actions have %d values per step; expected 8 ([delta pos, delta quat xyzw, gripper]) "
                        "or 10 ([pos, rot6d, gripper])." % (path, dim))
    expected = 10 if fmt == "pos_rot6d" else 8
    if dim != expected:
        raise DpftError("%s: actions have %d values per step but action_format=%r expects %d."
                        % (path, dim, fmt, expected))
    return fmt


def convert_episode(
    data: Dict[str, Any],
    task: str,
    path: Union[str, Path] = "<episode>",
    include_images: bool = False,
    action_format: str = "auto",
    clip_delta_pos: Optional[float] = 0.025,
    clip_delta_rot: Optional[float] = 0.35,
    append_obstacle: bool = False,
) -> Dict[str, Any]:
    """Convert one unpickled episode to arrays.

    ``append_obstacle``: accept ``parts_poses`` of ``num_parts * 7`` values (``FurnitureSimFull-v0`` demos) and
    append the obstacle's nominal pose to every step.

    Returns:
        dict with ``obs`` (``robot_state (T, 16)``, ``parts_poses (T, P)``, optional images
        ``(T, H, W, 3)``), ``actions (T, 10)``, ``rewards (T,)``, ``dones (T,)``, ``success`` (bool),
        ``obstacle_appended`` (bool).
    """
    path = Path(path)
    spec = TASKS[task]
    observations = data["observations"]
    if not isinstance(observations, (list, tuple)) or not all(isinstance(o, dict) for o in observations):
        raise DpftError("%s: 'observations' must be a list of dicts (one per step)." % path)
    actions = np.asarray(data["actions"], dtype=np.float64)
    if actions.ndim != 2 or actions.shape[0] == 0:
        raise DpftError("%s: 'actions' has shape %s; expected (T, 8) with T >= 1." % (path, actions.shape))
    t_len = actions.shape[0]
    if len(observations) == t_len + 1:
        observations = observations[:-1]  # the simulator collector stores the observation after the last action
    elif len(observations) != t_len:
        raise DpftError("%s: %d observations for %d actions; expected as many or one more."
                        % (path, len(observations), t_len))
    fmt = _resolve_action_format(action_format, actions.shape[1], path)
    if not np.isfinite(actions).all():
        raise DpftError("%s: 'actions' contains NaN or Inf." % path)

    robot14 = np.stack([_robot_state_14(o, path, t) for t, o in enumerate(observations)])
    if not np.isfinite(robot14).all():
        raise DpftError("%s: robot_state contains NaN or Inf." % path)
    if np.any(np.linalg.norm(robot14[:, 3:7], axis=-1) < 1e-6):
        raise DpftError("%s: robot_state ee_quat has a zero quaternion." % path)
    parts = []
    for t, o in enumerate(observations):
        if "parts_poses" not in o:
            raise DpftError("%s: observations[%d] has no 'parts_poses'." % (path, t))
        parts.append(np.asarray(o["parts_poses"], dtype=np.float32).reshape(-1))
    sizes = {p.size for p in parts}
    appended = False
    if sizes == {spec.num_parts * 7} and append_obstacle:
        obstacle = np.asarray(OBSTACLE_FRONT_NOMINAL_POSE, dtype=np.float32)
        parts = [np.concatenate([p, obstacle]) for p in parts]
        appended = True
    elif sizes != {spec.parts_poses_dim}:
        size = sorted(sizes)[0] if len(sizes) == 1 else sorted(sizes)
        old = (" = num_parts * 7 without the obstacle's pose: FurnitureSimFull-v0 demos (the fork's, ResiP's and "
               "clvrai's collectors record with it), while FurnitureRLSimEnv, which dpft fine-tunes in, appends the "
               "obstacle; pass --append-obstacle (append_obstacle=True) to append its nominal pose"
               if size == spec.num_parts * 7 else "")
        raise DpftError("%s: parts_poses has %s values per step%s; task %r expects %d = (%d parts + 1 obstacle) * 7."
                        % (path, size, old, task, spec.parts_poses_dim, spec.num_parts))
    parts_poses = np.stack(parts)
    if not np.isfinite(parts_poses).all():
        raise DpftError("%s: parts_poses contains NaN or Inf." % path)

    robot16 = robot_state_quat_to_rot6d(torch.from_numpy(robot14)).numpy().astype(np.float32)
    obs: Dict[str, np.ndarray] = {"robot_state": robot16, "parts_poses": parts_poses}
    if include_images:
        for key in IMAGE_KEYS:
            frames = [_image(o, key, path, t) for t, o in enumerate(observations)]
            shapes = {f.shape for f in frames}
            if len(shapes) != 1:
                raise DpftError("%s: %r frames have different shapes %s." % (path, key, sorted(shapes)))
            obs[key] = np.stack(frames)

    rewards = np.asarray(data.get("rewards", np.zeros(t_len)), dtype=np.float32).reshape(-1)
    if rewards.shape[0] != t_len:
        raise DpftError("%s: %d rewards for %d actions." % (path, rewards.shape[0], t_len))
    dones = np.zeros(t_len, dtype=np.int64)
    dones[-1] = 1
    return {
        "obs": obs,
        "actions": _absolute_actions(actions, robot14, fmt, clip_delta_pos, clip_delta_rot),
        "rewards": rewards,
        "dones": dones,
        "success": parse_success(data.get("success", False)),
        "action_format": fmt,
        "obstacle_appended": appended,
    }


def parse_success(value: Any) -> bool:
    """An episode's ``success`` field: bools/ints, or ResiP's strings (``partial_success`` counts, as in
    ``process_pickles.py``)."""
    if isinstance(value, (str, bytes)):
        text = value.decode() if isinstance(value, bytes) else value
        return text.lower() in ("success", "partial_success", "true", "1")
    return bool(value)


def _split(names: List[str], valid_ratio: float, seed: int) -> Tuple[List[str], List[str]]:
    n = len(names)
    n_valid = int(round(valid_ratio * n))
    if valid_ratio > 0 and n >= 2:
        n_valid = min(max(n_valid, 1), n - 1)
    elif n < 2:
        n_valid = 0
    order = np.random.default_rng(seed).permutation(n)
    valid = sorted((names[i] for i in order[:n_valid]), key=lambda s: int(s[5:]))
    train = sorted((names[i] for i in order[n_valid:]), key=lambda s: int(s[5:]))
    return train, valid


def convert_furniture_demos(
    inputs: Union[str, Path, Sequence[Union[str, Path]]],
    out_hdf5: Union[str, Path],
    task: str,
    randomness: str = "low",
    include_images: bool = False,
    valid_ratio: float = 0.1,
    seed: int = 0,
    only_success: bool = False,
    action_format: str = "auto",
    clip_delta_pos: Optional[float] = 0.025,
    clip_delta_rot: Optional[float] = 0.35,
    overwrite: bool = False,
    append_obstacle: bool = False,
) -> Dict[str, Any]:
    """Convert FurnitureBench episode pickles to one robomimic-layout HDF5 file (see the module docstring).

    Args:
        inputs: episode files and/or directories searched recursively for ``*.pkl``, ``*.pkl.xz``,
            ``*.pkl.gz`` (processed in sorted path order: ``demo_<i>`` is the i-th kept file).
        out_hdf5: output path (written to a temporary name, then renamed).
        task: FurnitureSim task (``one_leg``, ``lamp``, ``round_table``, ...); episodes that name another
            furniture are rejected.
        randomness: recorded in ``env_args`` (the demos' initial-state randomness).
        include_images: also store ``color_image1`` / ``color_image2``.
        valid_ratio: fraction of demos in ``mask/valid`` (at least one when > 0 and there are >= 2 demos).
        seed: seed of the train/valid split.
        only_success: skip episodes whose ``success`` flag is false.
        action_format: ``auto`` (8-D -> ``delta_quat``, 10-D -> ``pos_rot6d``), ``delta_quat``,
            ``pos_quat`` (absolute pose with a quaternion) or ``pos_rot6d``.
        clip_delta_pos: per-axis clip of delta positions in m (None: no clip); ``delta_quat`` only.
        clip_delta_rot: per-step clip of delta rotation angles in rad (None: no clip); ``delta_quat`` only.
        overwrite: replace an existing output file.
        append_obstacle: accept ``FurnitureSimFull-v0`` episodes (``parts_poses`` of ``num_parts * 7``) by appending
            the obstacle's nominal pose (module docstring).

    Returns:
        summary dict: ``num_demos``, ``num_samples``, ``train``/``valid`` demo names, ``skipped``
        (list of ``(file, reason)``), ``out`` path, ``obstacle_appended`` (episodes that got the nominal
        obstacle pose).
    """
    if task not in TASKS:
        raise DpftError("Unknown FurnitureBench task %r: expected one of %s." % (task, ", ".join(sorted(TASKS))))
    if action_format not in ACTION_FORMATS:
        raise DpftError("action_format=%r: expected one of %s." % (action_format, ", ".join(ACTION_FORMATS)))
    if not 0.0 <= float(valid_ratio) < 1.0:
        raise DpftError("valid_ratio=%r: expected a fraction in [0, 1)." % (valid_ratio,))
    for name, value in (("clip_delta_pos", clip_delta_pos), ("clip_delta_rot", clip_delta_rot)):
        if value is not None and not float(value) > 0:
            raise DpftError("%s=%r: expected a positive number or None." % (name, value))
    out = Path(out_hdf5)
    if out.exists() and not overwrite:
        raise DpftError("Output %s already exists; pass overwrite=True (--overwrite) to replace it." % out)
    if not out.parent.exists():
        raise DpftError("The output directory %s does not exist." % out.parent)
    from dpft.rundir import lock_output_file

    files = find_episode_files(inputs)
    lock = lock_output_file(out, overwrite, option="--out", command="convert_furniture_demos")  # one writer at a time
    try:
        return _convert_locked(files, out, task, randomness, include_images, valid_ratio, seed, only_success, action_format,
                               clip_delta_pos, clip_delta_rot, append_obstacle)
    finally:
        lock.close()


def _convert_locked(files, out, task, randomness, include_images, valid_ratio, seed, only_success, action_format,
                    clip_delta_pos, clip_delta_rot, append_obstacle):
    tmp = out.with_name(out.name + ".tmp-%d" % os.getpid())
    names: List[str] = []
    skipped: List[Tuple[str, str]] = []
    formats = set()
    total = 0
    appended = 0
    image_shapes: Dict[str, Tuple[int, ...]] = {}
    try:
        with h5py.File(tmp, "w") as f:
            data_grp = f.create_group("data")
            for path in files:
                raw = load_episode(path)
                furniture = raw.get("furniture", raw.get("task"))
                if furniture is not None and furniture != task:
                    raise DpftError("%s is a %r episode; this conversion is for task %r (pass matching files)."
                                    % (path, furniture, task))
                if only_success and not parse_success(raw.get("success", False)):
                    skipped.append((str(path), "not successful"))
                    continue
                ep = convert_episode(raw, task, path, include_images, action_format, clip_delta_pos, clip_delta_rot,
                                     append_obstacle=append_obstacle)
                appended += int(ep["obstacle_appended"])
                for key in IMAGE_KEYS:
                    if key in ep["obs"]:
                        shape = ep["obs"][key].shape[1:]
                        if image_shapes.setdefault(key, shape) != shape:
                            raise DpftError("%s: %r frames are %s but earlier episodes have %s; one dataset needs "
                                            "one image size." % (path, key, shape, image_shapes[key]))
                name = "demo_%d" % len(names)
                grp = data_grp.create_group(name)
                obs_grp = grp.create_group("obs")
                for key, value in ep["obs"].items():
                    if value.dtype == np.uint8:
                        obs_grp.create_dataset(key, data=value, chunks=(1,) + value.shape[1:], compression="gzip",
                                               compression_opts=4)
                    else:
                        obs_grp.create_dataset(key, data=value)
                grp.create_dataset("actions", data=ep["actions"])
                grp.create_dataset("rewards", data=ep["rewards"])
                grp.create_dataset("dones", data=ep["dones"])
                n = int(ep["actions"].shape[0])
                grp.attrs["num_samples"] = n
                grp.attrs["success"] = int(ep["success"])
                grp.attrs["source_file"] = str(path)
                formats.add(ep["action_format"])
                names.append(name)
                total += n
            if not names:
                raise DpftError("No episodes were converted from %d file(s): all were skipped (%s)."
                                % (len(files), "; ".join("%s: %s" % s for s in skipped[:3])))
            data_grp.attrs["total"] = total
            spec = TASKS[task]
            env_args = {
                "env_name": "FurnitureRLSim-%s" % task,
                "type": "furniture",
                "env_version": "ankile/furniture-bench",
                "env_kwargs": {
                    "furniture": task,
                    "randomness": randomness,
                    "act_rot_repr": "rot_6d",
                    "action_type": "pos",
                    "ctrl_mode": "diffik",
                    "obs_keys": list(DEFAULT_STATE_OBS),
                    "concat_robot_state": True,
                    "max_episode_steps": spec.max_episode_steps,
                },
            }
            data_grp.attrs["env_args"] = json.dumps(env_args)
            data_grp.attrs["conversion"] = json.dumps({
                "tool": "tools/convert_furniture_demos.py",
                "action_formats": sorted(formats),
                "actions": "absolute [pos 3, rot6d 6 (first two rows of R), gripper sign 1]",
                "robot_state": "[ee_pos 3, rot6d 6, ee_pos_vel 3, ee_ori_vel 3, gripper_width 1]",
                "clip_delta_pos": clip_delta_pos,
                "clip_delta_rot": clip_delta_rot,
                "only_success": bool(only_success),
                "append_obstacle": bool(append_obstacle),
                "obstacle_appended_episodes": appended,
                "obstacle_nominal_pose": list(OBSTACLE_FRONT_NOMINAL_POSE) if appended else None,
            })
            train, valid = _split(names, float(valid_ratio), int(seed))
            mask = f.create_group("mask")
            mask.create_dataset("train", data=np.array([s.encode() for s in train], dtype="S"))
            mask.create_dataset("valid", data=np.array([s.encode() for s in valid], dtype="S16"))
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"out": str(out), "num_demos": len(names), "num_samples": total, "train": train, "valid": valid,
            "skipped": skipped, "obstacle_appended": appended}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Convert FurnitureBench demo pickles (.pkl/.pkl.xz/.pkl.gz) to a robomimic-layout HDF5 "
                    "with 16-D robot_state, parts_poses and 10-D absolute rot6d actions. Pickles can run "
                    "code when loaded: convert only trusted files.")
    parser.add_argument("--input", nargs="+", required=True, help="episode files or directories (recursive)")
    parser.add_argument("--out", required=True, help="output .hdf5 path")
    parser.add_argument("--task", required=True, choices=sorted(TASKS))
    parser.add_argument("--randomness", default="low", help="recorded in env_args (default: low)")
    parser.add_argument("--images", action="store_true", help="also store color_image1/color_image2")
    parser.add_argument("--valid-ratio", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/valid split")
    parser.add_argument("--only-success", action="store_true", help="skip unsuccessful episodes")
    parser.add_argument("--action-format", default="auto", choices=ACTION_FORMATS)
    parser.add_argument("--clip-delta-pos", type=float, default=0.025, help="m; <= 0 disables")
    parser.add_argument("--clip-delta-rot", type=float, default=0.35, help="rad; <= 0 disables")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--append-obstacle", action="store_true",
                        help="accept FurnitureSimFull-v0 demos (parts_poses without the obstacle) by appending the "
                             "obstacle's nominal pose in the AprilTag frame")
    args = parser.parse_args(argv)
    try:
        summary = convert_furniture_demos(
            args.input, args.out, args.task, randomness=args.randomness, include_images=args.images,
            valid_ratio=args.valid_ratio, seed=args.seed, only_success=args.only_success,
            action_format=args.action_format,
            clip_delta_pos=args.clip_delta_pos if args.clip_delta_pos > 0 else None,
            clip_delta_rot=args.clip_delta_rot if args.clip_delta_rot > 0 else None,
            overwrite=args.overwrite, append_obstacle=args.append_obstacle,
        )
    except DpftError as exc:
        print("error: %s" % exc, file=sys.stderr)
        return 2
    print("wrote %s: %d demos, %d samples (train %d, valid %d, skipped %d)"
          % (summary["out"], summary["num_demos"], summary["num_samples"], len(summary["train"]),
             len(summary["valid"]), len(summary["skipped"])))
    if summary["obstacle_appended"]:
        print("appended the obstacle's nominal pose %s (AprilTag frame) to parts_poses of %d episode(s) recorded "
              "without it" % (list(OBSTACLE_FRONT_NOMINAL_POSE), summary["obstacle_appended"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
