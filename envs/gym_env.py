"""gymnasium MuJoCo locomotion tasks (Hopper, Walker2d, HalfCheetah v5) behind the :class:`dpft.envs.base.Env` contract.

The observation is one key, ``"obs"``: the state vector gymnasium returns (float64; Hopper ``(11,)``, Walker2d
``(17,)``, HalfCheetah ``(17,)``). ``terminated`` / ``truncated`` are gymnasium's (plus this adapter's own time limit
``max_episode_steps``); locomotion tasks have no success criterion, so ``info["success"]`` is False unless the wrapped
env reports ``is_success``. These envs step at thousands of steps per second, so the vector env runs them in-process.

``env_args`` follow robomimic's EnvType.GYM metadata: ``{"env_name": "Hopper-v5", "type": 2, "env_kwargs": {}}``,
where ``env_kwargs`` go to ``gymnasium.make``.
"""
from __future__ import annotations

import copy
import sys
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from dpft.errors import DpftError
from dpft.envs.base import Env, ObsDict, resolve_task_name
from dpft.envs.render import setup_rendering

#: short task name -> gymnasium id
GYM_TASKS = {"hopper": "Hopper-v5", "walker2d": "Walker2d-v5", "halfcheetah": "HalfCheetah-v5"}

#: robomimic's EnvType.GYM_TYPE
GYM_TYPE = 2

#: the single observation key of a gym env
OBS_KEY = "obs"


def _import_gymnasium():
    if "mujoco" not in sys.modules:
        setup_rendering(require=False)  # MuJoCo picks its GL backend when first imported
    try:
        import gymnasium
    except ImportError as e:
        raise DpftError("gymnasium is not installed ({}). Install the gym extra: pip install 'dpft[gym]' "
                        "(gymnasium[mujoco] with mujoco==3.9.0).".format(e))
    return gymnasium


def gym_env_name(task: str) -> str:
    """gymnasium id for a short task name (``"hopper"``) or an id among :data:`GYM_TASKS` (``"Hopper-v5"``)."""
    return resolve_task_name(task, GYM_TASKS, "gym")


def default_gym_env_args(task: str) -> Dict[str, Any]:
    """robomimic-style ``env_args`` for a gymnasium MuJoCo task: ``{"env_name", "type": 2, "env_kwargs": {}}``."""
    return {"env_name": gym_env_name(task), "type": GYM_TYPE, "env_kwargs": {}}


class GymEnv(Env):
    """One gymnasium MuJoCo environment with the observation ``{"obs": state vector}``.

    Args:
        env_args: ``{"env_name": <gymnasium id>, "type": 2, "env_kwargs": {...}}`` (see :func:`default_gym_env_args`).
        obs_keys: None or ``["obs"]``.
        max_episode_steps: time limit (default: the gymnasium spec's, 1000 for the locomotion tasks).
        terminate_on_success: end the episode when the env reports ``is_success`` (never for locomotion).
        render_size: default height and width of :meth:`render` frames.
        render_camera: default camera name (None = the env's default tracking view).
        render: check the GL backend up front (frames for videos); :meth:`render` works either way.

    Attributes:
        env: the gymnasium env (with its TimeLimit wrapper); env_name, env_args, obs_keys, obs_shapes, obs_dtypes,
        action_dim, action_low, action_high, max_episode_steps, elapsed_steps.
    """

    def __init__(self, env_args: Dict[str, Any], obs_keys: Optional[List[str]] = None,
                 max_episode_steps: Optional[int] = None, terminate_on_success: bool = False,
                 render_size: int = 256, render_camera: Optional[str] = None, render: bool = False):
        self.env = None  # type: Any
        if not isinstance(env_args, dict):
            raise DpftError("env_args must be a dict, got {}.".format(type(env_args).__name__))
        if env_args.get("type", GYM_TYPE) != GYM_TYPE:
            raise DpftError("env_args['type'] is {!r}; gym environments have type 2 (robomimic's EnvType.GYM_TYPE)."
                            .format(env_args.get("type")))
        env_kwargs = env_args.get("env_kwargs") or {}
        if not isinstance(env_kwargs, dict):
            raise DpftError("env_args['env_kwargs'] must be a dict, got {}.".format(type(env_kwargs).__name__))
        if obs_keys is not None and list(obs_keys) != [OBS_KEY]:
            raise DpftError("Gym env {!r} has one observation key, 'obs' (the state vector); requested {!r}.".format(
                env_args.get("env_name"), list(obs_keys) if not isinstance(obs_keys, str) else obs_keys))
        if render:
            setup_rendering(require=True)
        gym = _import_gymnasium()
        env_name = env_args.get("env_name")
        registry = gym.envs.registry
        if not isinstance(env_name, str) or env_name not in registry:
            raise DpftError("Unknown gymnasium env_name {!r} in env_args; dpft's gym tasks: {} (any registered "
                            "gymnasium id with a vector observation also works).".format(
                                env_name, ", ".join(GYM_TASKS.values())))
        spec = registry[env_name]
        if max_episode_steps is None:
            max_episode_steps = spec.max_episode_steps or 1000
        if int(max_episode_steps) < 1:
            raise DpftError("max_episode_steps must be >= 1, got {!r}.".format(max_episode_steps))
        self.env_name = env_name
        self.env_args = copy.deepcopy(env_args)
        self.max_episode_steps = int(max_episode_steps)
        self.terminate_on_success = bool(terminate_on_success)
        self.render_size = int(render_size)
        self.render_camera = render_camera
        make_kwargs = dict(env_kwargs)
        is_mujoco = "mujoco" in str(spec.entry_point)
        if is_mujoco:
            make_kwargs.setdefault("render_mode", "rgb_array")
            make_kwargs.setdefault("width", self.render_size)
            make_kwargs.setdefault("height", self.render_size)
        try:
            self.env = gym.make(env_name, max_episode_steps=self.max_episode_steps, **make_kwargs)
        except Exception as e:
            raise DpftError("gymnasium.make({!r}, **{!r}) failed with {}: {}.".format(
                env_name, env_kwargs, type(e).__name__, e)) from e
        space = self.env.observation_space
        if not (hasattr(space, "shape") and space.shape is not None and len(space.shape) == 1):
            self.env.close()
            raise DpftError("Gym env {!r} has observation space {}; GymEnv needs a flat vector (Box of shape (D,))."
                            .format(env_name, space))
        aspace = self.env.action_space
        if not (hasattr(aspace, "shape") and aspace.shape is not None and len(aspace.shape) == 1):
            self.env.close()
            raise DpftError("Gym env {!r} has action space {}; GymEnv needs a continuous Box of shape (Da,)."
                            .format(env_name, aspace))
        self.action_dim = int(aspace.shape[0])
        self.action_low = np.asarray(aspace.low, dtype=np.float64)
        self.action_high = np.asarray(aspace.high, dtype=np.float64)
        self.obs_keys = [OBS_KEY]
        self.obs_shapes = {OBS_KEY: tuple(space.shape)}  # type: Dict[str, Tuple[int, ...]]
        self.obs_dtypes = {OBS_KEY: np.dtype(space.dtype)}  # type: Dict[str, Any]
        self.elapsed_steps = 0
        self._has_reset = False
        self._render_cfg = (self.render_size, self.render_size, None) if is_mujoco else None
        renderer = getattr(self.env.unwrapped, "mujoco_renderer", None)
        self._default_cam_id = int(getattr(renderer, "camera_id", -1))
        self._closed = False

    # -- episode ---------------------------------------------------------------------------------------------------
    def _obs(self, obs: Any) -> ObsDict:
        return {OBS_KEY: np.asarray(obs, dtype=self.obs_dtypes[OBS_KEY]).copy()}

    def reset(self, seed: Optional[int] = None) -> ObsDict:
        """New episode (gymnasium ``reset(seed=...)``; ``seed=None`` continues the env's random stream)."""
        if seed is not None and (isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer))
                                 or int(seed) < 0):
            raise DpftError("reset(seed=...) needs a non-negative integer seed, got {!r}.".format(seed))
        obs, _ = self.env.reset(seed=None if seed is None else int(seed))
        self.elapsed_steps = 0
        self._has_reset = True
        return self._obs(obs)

    def step(self, action: np.ndarray) -> Tuple[ObsDict, float, bool, bool, Dict[str, Any]]:
        """Apply one action ``(Da,)``; returns ``(obs, reward, terminated, truncated, info)``."""
        a = self._checked_action(action)
        obs, reward, terminated, truncated, info = self.env.step(a.astype(self.env.action_space.dtype))
        self.elapsed_steps += 1
        info = dict(info or {})
        success = bool(info.get("is_success", False))
        info["success"] = success
        terminated = bool(terminated) or (self.terminate_on_success and success)
        truncated = bool(truncated) or self.elapsed_steps >= self.max_episode_steps
        return self._obs(obs), float(reward), terminated, truncated, info

    def is_success(self) -> bool:
        return False

    # -- simulator state -------------------------------------------------------------------------------------------
    def _mujoco(self) -> Any:
        u = self.env.unwrapped
        return u if hasattr(u, "data") and hasattr(u, "model") and hasattr(u, "set_state") else None

    def get_state(self) -> Optional[np.ndarray]:
        """Flattened MuJoCo state ``(1 + nq + nv,)`` = (time, qpos, qvel), like robomimic's ``states``."""
        u = self._mujoco()
        if u is None:
            return None
        return np.concatenate([[u.data.time], u.data.qpos, u.data.qvel]).astype(np.float64)

    def reset_to(self, state: Any) -> ObsDict:
        """Start an episode from a state returned by :meth:`get_state`; returns the observation."""
        u = self._mujoco()
        if u is None:
            raise DpftError("{} is not a MuJoCo env; reset_to() is unavailable.".format(self.env_name))
        if not self._has_reset:
            self.reset()
        flat = np.asarray(state, dtype=np.float64).reshape(-1)
        nq, nv = u.model.nq, u.model.nv
        if flat.shape[0] != 1 + nq + nv:
            raise DpftError("reset_to(): state has {} values but {} needs {} (time, qpos {}, qvel {}).".format(
                flat.shape[0], self.env_name, 1 + nq + nv, nq, nv))
        u.set_state(flat[1:1 + nq], flat[1 + nq:])
        u.data.time = flat[0]
        self.elapsed_steps = 0
        return self._obs(u._get_obs())

    # -- rendering -------------------------------------------------------------------------------------------------
    def render(self, height: Optional[int] = None, width: Optional[int] = None,
               camera: Optional[str] = None) -> np.ndarray:
        """RGB frame ``(height, width, 3)`` uint8, upright (gymnasium's ``rgb_array`` renderer)."""
        u = self._mujoco()
        if u is None or self._render_cfg is None:
            raise DpftError("{} is not a MuJoCo env; GymEnv.render() is unavailable.".format(self.env_name))
        h = int(height if height is not None else self.render_size)
        w = int(width if width is not None else self.render_size)
        cam = camera if camera is not None else self.render_camera
        if h < 1 or w < 1:
            raise DpftError("render(): height and width must be positive, got {}x{}.".format(h, w))
        import mujoco

        if cam is not None and mujoco.mj_name2id(u.model, mujoco.mjtObj.mjOBJ_CAMERA, cam) < 0:
            names = [mujoco.mj_id2name(u.model, mujoco.mjtObj.mjOBJ_CAMERA, i) for i in range(u.model.ncam)]
            raise DpftError("render(): {} has no camera {!r}; cameras: {} (or None for the default view).".format(
                self.env_name, cam, ", ".join(names) or "none"))
        setup_rendering(require=True)
        if (h, w, cam) != self._render_cfg:
            self._rebuild_renderer(u, h, w, cam)
        frame = u.mujoco_renderer.render("rgb_array")
        return np.ascontiguousarray(frame, dtype=np.uint8)

    def _rebuild_renderer(self, u: Any, h: int, w: int, cam: Optional[str]) -> None:
        from gymnasium.envs.mujoco.mujoco_rendering import MujocoRenderer

        old = u.mujoco_renderer
        old.close()
        u.model.vis.global_.offwidth = max(int(u.model.vis.global_.offwidth), w)
        u.model.vis.global_.offheight = max(int(u.model.vis.global_.offheight), h)
        u.width, u.height = w, h
        u.mujoco_renderer = MujocoRenderer(
            u.model, u.data, old.default_cam_config, w, h, old.max_geom,
            None if cam is not None else self._default_cam_id, cam, dict(old._vopt),
        )
        self._render_cfg = (h, w, cam)

    def close(self) -> None:
        if getattr(self, "_closed", False) or self.env is None:
            return
        self._closed = True
        try:
            self.env.close()
        except Exception:  # pragma: no cover - best effort at shutdown
            pass
