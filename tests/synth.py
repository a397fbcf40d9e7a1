"""Synthetic robomimic HDF5 files for tests (imported by other test modules; no pytest fixtures here).

- :func:`write_robomimic_hdf5` writes a small file exactly in robomimic's layout (robosuite Lift-like obs
  keys, optional uint8 camera images, rewards/dones/states/next_obs, ``env_args`` JSON, ``mask/train`` and
  ``mask/valid``) and returns the arrays it wrote so tests can build expected values independently.
  Broken variants are made with its knobs (``env_args`` as a raw string, ``demo_names``...) or by editing
  the file with h5py afterwards.
- :func:`write_learnable_hdf5` writes demos whose action is a fixed smooth function of the current
  observation (:func:`learnable_action`) under deterministic dynamics, so every action chunk is a
  deterministic function of the current observation: a policy that trains correctly drives its loss down.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import h5py
import numpy as np

#: robosuite Lift-like low-dim keys and their sizes, in robomimic's usual order
DEFAULT_OBS_SPEC = OrderedDict(
    [("robot0_eef_pos", 3), ("robot0_eef_quat", 4), ("robot0_gripper_qpos", 2), ("object", 10)]
)

DEFAULT_ENV_ARGS = {
    "env_name": "Lift",
    "env_version": "1.5.2",
    "type": 1,
    "env_kwargs": {
        "robots": ["Panda"],
        "has_renderer": False,
        "has_offscreen_renderer": False,
        "ignore_done": True,
        "use_object_obs": True,
        "use_camera_obs": False,
        "control_freq": 20,
        "reward_shaping": False,
        "controller_configs": {"type": "BASIC", "body_parts": {"right": {"type": "OSC_POSE"}}},
    },
}


def _write_mask(f: h5py.File, filter_keys: Mapping[str, Sequence[str]]) -> None:
    for key, names in filter_keys.items():
        # exactly as robomimic's split_train_val.py: an array of bytes demo names
        f.create_dataset("mask/%s" % key, data=np.array([n.encode("utf-8") for n in names]))


def _write_env_args(f: h5py.File, env_args: Union[None, bool, str, Dict[str, Any]]) -> None:
    if env_args is False:
        return
    if env_args is None:
        env_args = DEFAULT_ENV_ARGS
    f["data"].attrs["env_args"] = env_args if isinstance(env_args, str) else json.dumps(env_args)


def write_robomimic_hdf5(
    path: Any,
    num_demos: int = 4,
    lengths: Optional[Sequence[int]] = None,
    obs_spec: Optional[Mapping[str, int]] = None,
    action_dim: int = 7,
    images: bool = False,
    image_shape: Tuple[int, int, int] = (84, 84, 3),
    image_keys: Sequence[str] = ("agentview_image",),
    filter_keys: Union[bool, Mapping[str, Sequence[str]]] = True,
    env_args: Union[None, bool, str, Dict[str, Any]] = None,
    seed: int = 0,
    demo_names: Optional[Sequence[str]] = None,
    next_obs: bool = True,
    states: bool = True,
    total_attr: Optional[int] = None,
) -> Dict[str, Dict[str, Any]]:
    """Write a valid robomimic-layout HDF5 file and return what was written.

    Args:
        num_demos: number of demos (ignored when ``demo_names`` is given).
        lengths: steps per demo (default ``12, 15, 18, ...``).
        obs_spec: ``{low-dim key: size}`` in writing order (default :data:`DEFAULT_OBS_SPEC`); size 0 writes a
            1-D ``(T,)`` dataset.
        images: also write uint8 ``(T, *image_shape)`` datasets for ``image_keys``.
        filter_keys: True writes ``mask/train`` / ``mask/valid`` (every 4th demo, starting with the 4th, is
            valid); a mapping writes exactly those; False writes no ``mask`` group.
        env_args: None writes :data:`DEFAULT_ENV_ARGS` as JSON, a dict is JSON-encoded, a str is written raw,
            False writes no attribute.
        demo_names: explicit demo group names (written in the given order).
        total_attr: value of ``data.attrs["total"]`` (default: the true number of samples).

    Returns:
        ``{demo_name: {"obs": {key: array}, "actions": (T, Da), "rewards": (T,), "dones": (T,)}}`` in writing
        order (low-dim obs float64 as robomimic writes them).
    """
    rng = np.random.default_rng(seed)
    spec = OrderedDict(DEFAULT_OBS_SPEC if obs_spec is None else obs_spec)
    names = list(demo_names) if demo_names is not None else ["demo_%d" % i for i in range(num_demos)]
    if lengths is None:
        lengths = [12 + 3 * i for i in range(len(names))]
    if len(lengths) != len(names):
        raise ValueError("lengths has %d entries for %d demos" % (len(lengths), len(names)))
    written = OrderedDict()  # type: Dict[str, Dict[str, Any]]
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        total = 0
        for name, T in zip(names, lengths):
            T = int(T)
            grp = data.create_group(name)
            obs = {}  # type: Dict[str, np.ndarray]
            for key, size in spec.items():
                shape = (T + 1,) if size == 0 else (T + 1, size)
                obs[key] = rng.normal(size=shape)
            if images:
                for key in image_keys:
                    obs[key] = rng.integers(0, 256, size=(T + 1,) + tuple(image_shape), dtype=np.uint8)
            actions = rng.uniform(-1.0, 1.0, size=(T, action_dim))
            rewards = np.zeros(T)
            dones = np.zeros(T, dtype=np.int64)
            if T:
                rewards[-1] = 1.0
                dones[-1] = 1
            for key, value in obs.items():
                grp.create_dataset("obs/%s" % key, data=value[:T])
                if next_obs:
                    grp.create_dataset("next_obs/%s" % key, data=value[1:])
            grp.create_dataset("actions", data=actions)
            grp.create_dataset("rewards", data=rewards)
            grp.create_dataset("dones", data=dones)
            if states:
                grp.create_dataset("states", data=rng.normal(size=(T, 32)))
            grp.attrs["num_samples"] = T
            grp.attrs["model_file"] = "<mujoco model='synthetic'/>"
            total += T
            written[name] = {
                "obs": {k: v[:T] for k, v in obs.items()},
                "actions": actions,
                "rewards": rewards,
                "dones": dones,
            }
        data.attrs["total"] = total if total_attr is None else int(total_attr)
        _write_env_args(f, env_args)
        if filter_keys is True:
            valid = [n for i, n in enumerate(names) if i % 4 == 3]
            train = [n for n in names if n not in valid]
            fk = {"train": train, "valid": valid} if valid else {"train": train}
            _write_mask(f, fk)
        elif filter_keys:
            _write_mask(f, filter_keys)
    return written


def write_demos_hdf5(
    path: Any,
    demos: Mapping[str, Mapping[str, Any]],
    filter_keys: Optional[Mapping[str, Sequence[str]]] = None,
    env_args: Union[None, bool, str, Dict[str, Any]] = None,
) -> None:
    """Write given arrays in robomimic layout: ``demos = {name: {"obs": {key: (T, ...)}, "actions": (T, Da),
    optional "rewards"/"dones"/"states": ...}}`` (written in the given order, ``data.attrs["total"]`` set)."""
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        total = 0
        for name, demo in demos.items():
            grp = data.create_group(name)
            for key, value in demo["obs"].items():
                grp.create_dataset("obs/%s" % key, data=np.asarray(value))
            actions = np.asarray(demo["actions"])
            grp.create_dataset("actions", data=actions)
            for opt in ("rewards", "dones", "states"):
                if opt in demo:
                    grp.create_dataset(opt, data=np.asarray(demo[opt]))
            grp.attrs["num_samples"] = int(actions.shape[0])
            total += int(actions.shape[0])
        data.attrs["total"] = total
        _write_env_args(f, env_args)
        if filter_keys:
            _write_mask(f, filter_keys)


# ---------------------------------------------------------------------------------------------- learnable
LEARNABLE_OBS_SPEC = OrderedDict([("robot0_eef_pos", 3), ("object", 3)])


def _learnable_params(obs_dim: int, action_dim: int, seed: int) -> Tuple[np.ndarray, ...]:
    rng = np.random.default_rng(10_000 + seed)
    W = rng.normal(size=(action_dim, obs_dim)) * (1.5 / np.sqrt(obs_dim))
    b = rng.normal(size=(action_dim,)) * 0.2
    M = rng.normal(size=(obs_dim, action_dim)) / np.sqrt(action_dim)
    return W, b, M


def learnable_action(state: np.ndarray, seed: int = 0, action_dim: int = 4) -> np.ndarray:
    """The expert of :func:`write_learnable_hdf5`: ``tanh(W s + b)`` for raw states ``(..., obs_dim)``."""
    state = np.asarray(state, dtype=np.float64)
    W, b, _ = _learnable_params(state.shape[-1], action_dim, seed)
    return np.tanh(state @ W.T + b)


def learnable_step(state: np.ndarray, action: np.ndarray, seed: int = 0) -> np.ndarray:
    """The deterministic dynamics of :func:`write_learnable_hdf5`: ``0.9 s + 0.3 tanh(M a)``."""
    state = np.asarray(state, dtype=np.float64)
    action = np.asarray(action, dtype=np.float64)
    _, _, M = _learnable_params(state.shape[-1], action.shape[-1], seed)
    return 0.9 * state + 0.3 * np.tanh(action @ M.T)


def _blob_images(state: np.ndarray, image_shape: Tuple[int, int, int]) -> np.ndarray:
    """uint8 (T, H, W, C) images with a bright Gaussian blob placed by state dims 0 and 1 (in [-1, 1])."""
    H, W, C = image_shape
    cy = (np.clip(state[:, 0], -1, 1) + 1) / 2 * (H - 1)  # (T,)
    cx = (np.clip(state[:, 1], -1, 1) + 1) / 2 * (W - 1)
    yy = np.arange(H)[None, :, None]
    xx = np.arange(W)[None, None, :]
    sigma = max(H, W) / 8.0
    blob = np.exp(-((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2) / (2 * sigma ** 2))
    img = np.repeat((blob * 255).round()[..., None], C, axis=-1)
    return img.astype(np.uint8)


def write_learnable_hdf5(
    path: Any,
    num_demos: int = 8,
    length: int = 32,
    action_dim: int = 4,
    images: bool = False,
    image_shape: Tuple[int, int, int] = (16, 16, 3),
    image_key: str = "agentview_image",
    filter_keys: Union[bool, Mapping[str, Sequence[str]]] = False,
    seed: int = 0,
) -> Dict[str, Any]:
    """Write a robomimic file whose actions are a deterministic smooth function of the observation.

    State ``s`` (obs keys ``robot0_eef_pos`` (3) + ``object`` (3), obs_dim 6) starts uniform in [-1, 1]^6
    per demo; ``a_t = learnable_action(s_t)`` and ``s_{t+1} = learnable_step(s_t, a_t)``. With images, a
    uint8 ``(H, W, C)`` image shows a blob placed by ``s[0], s[1]``.

    Returns ``{"obs_keys", "low_dim_keys", "image_keys", "obs_dim", "action_dim", "num_samples", "seed"}``.
    """
    rng = np.random.default_rng(seed)
    obs_dim = sum(LEARNABLE_OBS_SPEC.values())
    names = ["demo_%d" % i for i in range(num_demos)]
    # simulate all demos together: states (E, T+1, Do), actions (E, T, Da)
    states = np.empty((num_demos, length + 1, obs_dim))
    actions = np.empty((num_demos, length, action_dim))
    states[:, 0] = rng.uniform(-1.0, 1.0, size=(num_demos, obs_dim))
    for t in range(length):
        actions[:, t] = learnable_action(states[:, t], seed=seed, action_dim=action_dim)
        states[:, t + 1] = learnable_step(states[:, t], actions[:, t], seed=seed)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        for i, name in enumerate(names):
            s, a = states[i], actions[i]
            grp = data.create_group(name)
            c = 0
            for key, size in LEARNABLE_OBS_SPEC.items():
                grp.create_dataset("obs/%s" % key, data=s[:length, c:c + size])
                grp.create_dataset("next_obs/%s" % key, data=s[1:, c:c + size])
                c += size
            if images:
                grp.create_dataset("obs/%s" % image_key, data=_blob_images(s[:length], image_shape))
            grp.create_dataset("actions", data=a)
            grp.create_dataset("rewards", data=np.zeros(length))
            grp.create_dataset("dones", data=np.zeros(length, dtype=np.int64))
            grp.attrs["num_samples"] = length
        data.attrs["total"] = num_demos * length
        data.attrs["env_args"] = json.dumps(
            {"env_name": "SyntheticLearnable", "env_version": "0", "type": 2, "env_kwargs": {"seed": seed}}
        )
        if filter_keys is True:
            valid = names[-max(1, num_demos // 8):] if num_demos > 1 else []
            fk = {"train": [n for n in names if n not in valid], "valid": valid}
            _write_mask(f, {k: v for k, v in fk.items() if v})
        elif filter_keys:
            _write_mask(f, filter_keys)
    low = list(LEARNABLE_OBS_SPEC.keys())
    imgs = [image_key] if images else []  # type: List[str]
    return {
        "obs_keys": low + imgs,
        "low_dim_keys": low,
        "image_keys": imgs,
        "obs_dim": obs_dim,
        "action_dim": action_dim,
        "num_samples": num_demos * length,
        "seed": seed,
    }
