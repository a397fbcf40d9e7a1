"""robosuite 1.5 tasks (Lift, PickPlaceCan, NutAssemblySquare, TwoArmTransport, ...) behind the :class:`dpft.envs.base.Env`
contract, with robomimic's observation names and robomimic ``env_args`` as the description of an environment.

* :func:`default_env_args` builds the robomimic ``env_args`` dict (``{"env_name", "env_version", "type": 1,
  "env_kwargs"}``) for one of the four DPPO tasks, with robosuite 1.5's composite Panda controller (OSC_POSE delta
  arm + gripper, 7-dim actions per arm).
* :func:`convert_legacy_env_args` turns ``env_args`` stored in published robomimic datasets (robosuite 1.2 / 1.4:
  ``controller_configs = {"type": "OSC_POSE", "damping": 1, "control_delta": true, ...}``) into arguments robosuite
  1.5 accepts, keeping their behaviour (world-frame deltas, non-"lite" physics stepping).
* :class:`RobosuiteEnv` is one simulator instance. Observations are exactly what a robomimic HDF5 stores:
  ``robot0_eef_pos`` (3,), ``robot0_eef_quat`` (4,) xyzw, ``robot0_gripper_qpos`` (2,), ``robot0_joint_pos`` (7,),
  ... (every ``robot<i>_*`` observable except ``proprio-state``), ``object`` (robosuite's ``object-state``) and
  images ``<camera>_image`` uint8 ``(H, W, 3)`` upright. Low-dim values are float64 as robosuite makes them.

robosuite is imported lazily (inside functions), after :func:`dpft.envs.render.setup_rendering` picked the GL backend.
"""
from __future__ import annotations

import copy
import inspect
import os
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from dpft.errors import DpftError
from dpft.envs.base import Env, ObsDict, resolve_task_name
from dpft.envs.render import setup_rendering

logger = logging.getLogger(__name__)

#: short task name -> robosuite env name (the four robomimic tasks DPPO fine-tunes on)
TASKS = {"lift": "Lift", "can": "PickPlaceCan", "square": "NutAssemblySquare", "transport": "TwoArmTransport"}

#: DPPO's episode lengths (env steps at control_freq 20)
DEFAULT_MAX_EPISODE_STEPS = {"Lift": 300, "PickPlaceCan": 300, "NutAssemblySquare": 400, "TwoArmTransport": 800}

#: robomimic's EnvType.ROBOSUITE_TYPE
ROBOSUITE_TYPE = 1

#: controller types of robosuite <= 1.4 (one config for each arm; robosuite 1.5 calls them "part" controllers)
LEGACY_CONTROLLER_TYPES = ("OSC_POSE", "OSC_POSITION", "IK_POSE", "JOINT_POSITION", "JOINT_VELOCITY", "JOINT_TORQUE")

#: renamed controller keys between robosuite 1.2 / 1.4 configs and robosuite 1.5's part controllers
_LEGACY_CONTROLLER_KEYS = {"damping": "damping_ratio", "damping_limits": "damping_ratio_limits"}

#: env_configuration values of robosuite <= 1.4 and their robosuite 1.5 names
_LEGACY_ENV_CONFIGURATIONS = {"single-arm-opposed": "opposed", "single-arm-parallel": "parallel"}

#: env_kwargs the adapter always sets itself (robosuite's own done flag and hard resets are never used)
_FORCED_KWARGS = {"has_renderer": False, "ignore_done": True, "hard_reset": False, "use_object_obs": True}


# ------------------------------------------------------------------------------------------------------------------
# robosuite import and registries
# ------------------------------------------------------------------------------------------------------------------


#: robosuite log lines that are harmless here and repeat in every worker process (platform.md): the private macro
#: file, the optional robosuite_models package, the GR1 whole-body IK, and per-env controller-config chatter.
_QUIET_ROBOSUITE = ("private macro file", "setup_macros.py", "robosuite_models", "mink-based whole-body IK",
                    "Loading controller configuration")


class _QuietRobosuite(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in _QUIET_ROBOSUITE)


def _import_robosuite():
    """Import robosuite, choosing the GL backend first (robosuite sets ``MUJOCO_GL=egl`` itself on import).

    Known-harmless robosuite log lines are filtered (set ``DPFT_ROBOSUITE_VERBOSE=1`` to see everything)."""
    import sys

    if "robosuite" not in sys.modules:
        setup_rendering(require=False)
        if not os.environ.get("DPFT_ROBOSUITE_VERBOSE"):
            logging.getLogger("robosuite_logs").addFilter(_QuietRobosuite())
    try:
        import robosuite
    except ImportError as e:
        raise DpftError(
            "robosuite is not installed ({}). Install the robomimic extra: pip install 'dpft[robomimic]' "
            "(robosuite==1.5.2 with mujoco==3.9.0).".format(e)
        )
    return robosuite


def _registered_envs() -> Dict[str, Any]:
    _import_robosuite()
    from robosuite.environments.base import REGISTERED_ENVS

    return REGISTERED_ENVS


def _registered_robots() -> Dict[str, Any]:
    _import_robosuite()
    from robosuite.models.robots.robot_model import REGISTERED_ROBOTS

    return REGISTERED_ROBOTS


def _robot_arms(robot: str) -> List[str]:
    """Arm names of a robot type: ``["right"]`` for single-arm robots, ``["right", "left"]`` for bimanual ones."""
    robots = _registered_robots()
    if robot not in robots:
        raise DpftError(
            "Unknown robot {!r} in env_args['env_kwargs']['robots']; robosuite {} knows: {}.".format(
                robot, _import_robosuite().__version__, ", ".join(sorted(robots)))
        )
    prop = getattr(robots[robot], "arm_type", None)
    try:  # arm_type is a constant property on every robosuite robot model
        arm_type = prop.fget(None) if isinstance(prop, property) else prop
    except Exception:
        arm_type = "single"
    return ["right", "left"] if arm_type == "bimanual" else ["right"]


def _accepted_env_kwargs(env_cls: Any) -> List[str]:
    """Keyword arguments an env class's ``__init__`` accepts, following ``**kwargs`` up the class hierarchy."""
    names = []  # type: List[str]
    for klass in env_cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters
        for name, p in params.items():
            if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            if name not in names:
                names.append(name)
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            break
    return names


def _version_tuple(version: Any) -> Tuple[int, ...]:
    out = []
    for part in str(version or "").split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


# ------------------------------------------------------------------------------------------------------------------
# env_args
# ------------------------------------------------------------------------------------------------------------------


def task_env_name(task: str) -> str:
    """robosuite env name for a short task name (``"lift"``) or a robosuite name among :data:`TASKS`."""
    return resolve_task_name(task, TASKS, "robosuite")


def default_env_args(task: str, image_obs: bool = False,
                     camera_names: Sequence[str] = ("agentview", "robot0_eye_in_hand"),
                     camera_size: int = 84) -> Dict[str, Any]:
    """robomimic ``env_args`` for a DPPO robosuite task with robosuite 1.5's default Panda controller.

    Args:
        task: ``"lift"``, ``"can"``, ``"square"``, ``"transport"`` (or the robosuite names in :data:`TASKS`).
        image_obs: render ``<camera>_image`` observations for ``camera_names`` at ``camera_size`` squared.
        camera_names: cameras for image observations (robomimic's image datasets use agentview + eye-in-hand;
            TwoArmTransport's robomimic datasets use shouldercamera0/1 and robot0/1_eye_in_hand).
        camera_size: image height and width.

    Returns:
        ``{"env_name", "env_version", "type": 1, "env_kwargs": {...}}`` (JSON-serializable), as stored in
        ``data.attrs["env_args"]`` of a robomimic HDF5.
    """
    env_name = task_env_name(task)
    robosuite = _import_robosuite()
    from robosuite.controllers import load_composite_controller_config

    if isinstance(camera_names, str):
        camera_names = [camera_names]
    camera_names = list(camera_names)
    if image_obs and not camera_names:
        raise DpftError("default_env_args({!r}, image_obs=True) needs at least one camera name.".format(task))
    size = int(camera_size)
    if size < 1:
        raise DpftError("camera_size must be a positive integer, got {!r}.".format(camera_size))
    two_arm = env_name == "TwoArmTransport"
    env_kwargs = {
        "robots": ["Panda", "Panda"] if two_arm else ["Panda"],
        "controller_configs": load_composite_controller_config(robot="Panda"),
        "control_freq": 20,
        "has_renderer": False,
        "has_offscreen_renderer": bool(image_obs),
        "use_camera_obs": bool(image_obs),
        "use_object_obs": True,
        "camera_names": camera_names,
        "camera_heights": size,
        "camera_widths": size,
        "camera_depths": False,
        "reward_shaping": False,
        "ignore_done": True,
        "hard_reset": False,
        "lite_physics": True,
    }  # type: Dict[str, Any]
    if two_arm:
        # robomimic's "single-arm-opposed" (robosuite 1.5 name): one arm on each side of the table
        env_kwargs["env_configuration"] = "opposed"
    return {"env_name": env_name, "env_version": robosuite.__version__, "type": ROBOSUITE_TYPE,
            "env_kwargs": env_kwargs}


def _convert_part_config(cfg: Dict[str, Any], robot: str, where: str) -> Dict[str, Any]:
    """One robosuite <= 1.4 controller config (for every arm of ``robot``) -> a robosuite 1.5 composite config."""
    from robosuite.controllers import load_part_controller_config
    from robosuite.controllers.composite.composite_controller_factory import refactor_composite_controller_config

    ctype = cfg.get("type")
    part = copy.deepcopy(load_part_controller_config(default_controller=ctype))
    legacy = copy.deepcopy(cfg)
    for old, new in _LEGACY_CONTROLLER_KEYS.items():
        if old in legacy:
            value = legacy.pop(old)
            legacy.setdefault(new, value)
    if "control_delta" in legacy:
        legacy.setdefault("input_type", "delta" if legacy.pop("control_delta") else "absolute")
    # robosuite <= 1.4 applied OSC / IK commands in the world frame; robosuite 1.5 defaults to the robot base frame
    # (different for TwoArmTransport, whose arms are rotated by +-90 degrees)
    if ctype in ("OSC_POSE", "OSC_POSITION"):
        legacy.setdefault("input_ref_frame", "world")
    part.update(legacy)
    if "input_type" in part and part["input_type"] not in ("delta", "absolute"):
        raise DpftError("{}: input_type must be 'delta' or 'absolute', got {!r}.".format(where, part.get("input_type")))
    return refactor_composite_controller_config(part, robot, _robot_arms(robot))


def _convert_controller_config(cfg: Any, robot: str, where: str) -> Dict[str, Any]:
    from robosuite.controllers.composite.composite_controller import REGISTERED_COMPOSITE_CONTROLLERS_DICT

    if not isinstance(cfg, dict):
        raise DpftError("{} must be a dict (a controller config), got {}.".format(where, type(cfg).__name__))
    ctype = cfg.get("type")
    if "body_parts" in cfg:
        if ctype not in REGISTERED_COMPOSITE_CONTROLLERS_DICT:
            raise DpftError(
                "{}: unknown composite controller type {!r}; accepted composite types: {} (or a robosuite <= 1.4 "
                "controller type: {}).".format(where, ctype, ", ".join(sorted(REGISTERED_COMPOSITE_CONTROLLERS_DICT)),
                                               ", ".join(LEGACY_CONTROLLER_TYPES))
            )
        cfg = copy.deepcopy(cfg)
        parts = cfg.get("body_parts")
        if not isinstance(parts, dict):
            raise DpftError("{}['body_parts'] must be a dict of part configs, got {!r}.".format(where, parts))
        if isinstance(parts.get("arms"), dict):  # the JSON-file layout; robosuite's loader flattens it the same way
            arms = parts.pop("arms")
            parts.update(arms)
        for arm in ("right", "left"):
            part = parts.get(arm)
            if part is None:
                continue
            missing = [k for k in ("type", "interpolation", "gripper") if not isinstance(part, dict) or k not in part]
            if missing:
                raise DpftError(
                    "{}['body_parts']['{}'] lacks {} that robosuite 1.5 needs; write complete configs with "
                    "robosuite.controllers.load_composite_controller_config(robot='Panda') (as default_env_args() "
                    "does) and edit them.".format(where, arm, ", ".join(repr(k) for k in missing))
                )
        return cfg
    if ctype in LEGACY_CONTROLLER_TYPES:
        return _convert_part_config(cfg, robot, where)
    raise DpftError(
        "{}: unknown controller type {!r}; accepted: robosuite <= 1.4 controller types {} or robosuite 1.5 composite "
        "configs (with 'body_parts') of type {}.".format(
            where, ctype, ", ".join(LEGACY_CONTROLLER_TYPES), ", ".join(sorted(REGISTERED_COMPOSITE_CONTROLLERS_DICT)))
    )


def convert_legacy_env_args(env_args: Dict[str, Any]) -> Dict[str, Any]:
    """Make robomimic ``env_args`` from any robosuite version since 1.2 constructible with robosuite 1.5.

    Changes (a deep copy is returned; robosuite 1.5 ``env_args`` come back unchanged apart from validation):

    * ``controller_configs`` of robosuite <= 1.4 (``{"type": "OSC_POSE", ...}``, one dict or one per robot) become
      robosuite 1.5 composite configs via ``refactor_composite_controller_config(cfg, robot, arms)`` for every
      robot; ``damping``/``damping_limits`` become ``damping_ratio``/``damping_ratio_limits``, ``control_delta``
      becomes ``input_type``, missing keys take robosuite's defaults, and ``input_ref_frame`` is ``"world"`` (how
      robosuite <= 1.4 interpreted deltas);
    * ``env_version`` < 1.5 without ``lite_physics`` gets ``lite_physics=False`` (robosuite <= 1.4 stepping);
    * ``env_configuration`` ``single-arm-opposed`` / ``single-arm-parallel`` become ``opposed`` / ``parallel``;
    * ``render_gpu_device_id`` (a property of the recording machine) is dropped; a ``renderer`` robosuite 1.5 no
      longer has (``nvisii``, ``igibson``) becomes ``mujoco``;
    * every remaining key is checked against the env class's constructor.

    Raises:
        DpftError: unknown ``env_name``, robot, controller type or env kwarg (the message lists the accepted ones).
    """
    if not isinstance(env_args, dict):
        raise DpftError("env_args must be a dict (robomimic env metadata), got {}.".format(type(env_args).__name__))
    if env_args.get("type", ROBOSUITE_TYPE) != ROBOSUITE_TYPE:
        raise DpftError("env_args['type'] is {!r}; robosuite environments have type 1 (robomimic's "
                        "EnvType.ROBOSUITE_TYPE).".format(env_args.get("type")))
    env_name = env_args.get("env_name")
    envs = _registered_envs()
    if env_name not in envs:
        raise DpftError(
            "Unknown robosuite env_name {!r} in env_args; robosuite {} has: {}.".format(
                env_name, _import_robosuite().__version__, ", ".join(sorted(envs)))
        )
    kwargs = env_args.get("env_kwargs", {})
    if not isinstance(kwargs, dict):
        raise DpftError("env_args['env_kwargs'] must be a dict, got {}.".format(type(kwargs).__name__))
    out = copy.deepcopy(env_args)
    out.setdefault("type", ROBOSUITE_TYPE)
    kw = copy.deepcopy(kwargs)
    out["env_kwargs"] = kw

    robots = kw.get("robots")
    if isinstance(robots, str):
        robots = [robots]
    if not robots or not isinstance(robots, (list, tuple)) or not all(isinstance(r, str) for r in robots):
        raise DpftError("env_args['env_kwargs']['robots'] must name the robot(s), e.g. ['Panda'] (TwoArmTransport: "
                        "['Panda', 'Panda']); got {!r}.".format(kw.get("robots")))
    robots = list(robots)
    for robot in robots:
        _robot_arms(robot)  # validates the name
    kw["robots"] = robots

    cc = kw.get("controller_configs")
    where = "env_args['env_kwargs']['controller_configs']"
    if isinstance(cc, (list, tuple)):
        if len(cc) != len(robots):
            raise DpftError("{} is a list of {} configs but there are {} robots ({}).".format(
                where, len(cc), len(robots), robots))
        kw["controller_configs"] = [
            _convert_controller_config(c, r, "{}[{}]".format(where, i)) for i, (c, r) in enumerate(zip(cc, robots))
        ]
    elif cc is not None:
        is_legacy = isinstance(cc, dict) and "body_parts" not in cc
        if is_legacy and len(set(robots)) > 1:
            kw["controller_configs"] = [_convert_controller_config(cc, r, where) for r in robots]
        else:
            kw["controller_configs"] = _convert_controller_config(cc, robots[0], where)

    version = _version_tuple(out.get("env_version"))
    legacy_controller = isinstance(cc, dict) and "body_parts" not in cc
    if (version and version < (1, 5)) or (not version and legacy_controller):
        # robosuite <= 1.4 stepped full physics (robomimic v0.1 datasets carry no env_version at all)
        kw.setdefault("lite_physics", False)
    conf = kw.get("env_configuration")
    if isinstance(conf, str) and conf in _LEGACY_ENV_CONFIGURATIONS:
        kw["env_configuration"] = _LEGACY_ENV_CONFIGURATIONS[conf]
    kw.pop("render_gpu_device_id", None)
    kw.pop("backend", None)  # dpft's choice of physics backend (dpft.envs.mujoco_backend), not a robosuite kwarg
    if "renderer" in kw and kw["renderer"] not in ("mujoco", "mjviewer"):
        kw["renderer"] = "mujoco"
        kw.pop("renderer_config", None)

    accepted = _accepted_env_kwargs(envs[env_name])
    unknown = [k for k in kw if k not in accepted]
    if unknown:
        raise DpftError(
            "env_args['env_kwargs'] has {} that robosuite {} {} does not accept; accepted keys: {}.".format(
                ", ".join(repr(k) for k in unknown), _import_robosuite().__version__, env_name, ", ".join(accepted))
        )
    return out


# ------------------------------------------------------------------------------------------------------------------
# the environment
# ------------------------------------------------------------------------------------------------------------------


def _image_key_camera(key: str) -> Optional[str]:
    return key[: -len("_image")] if key.endswith("_image") else None


def _per_camera(value: Any, cameras: List[str], camera: str, default: int) -> int:
    """A per-camera setting (``camera_heights``) that may be one int or a list aligned with ``cameras``."""
    if value is None:
        return default
    if isinstance(value, (list, tuple)):
        if camera in cameras and len(value) == len(cameras):
            return int(value[cameras.index(camera)])
        return int(value[0]) if value else default
    return int(value)


def _task_success(rs_env: Any) -> bool:
    succ = rs_env._check_success()
    if isinstance(succ, dict):
        succ = succ.get("task", False)
    return bool(succ)


def refreshed_reward_and_success(rs_env: Any, action: Any) -> Tuple[float, bool]:
    """THE reward rule of dpft's robosuite tasks: ``(reward, success)`` of one step, both of the state it ended in.

    Call it after ``rs_env.sim.forward()`` has refreshed the kinematics of the step's final physics state (robosuite's
    own ``env.step`` computes its reward before that refresh, from positions that lag the joint state by one physics
    sub-step, so near a threshold it could report success with reward 0 or the reverse). Both values are then read
    from the same refreshed state:

    * ``success``: robosuite's ``_check_success()`` (its ``"task"`` entry when it returns a dict);
    * ``reward``: robosuite's ``reward(action)`` of that state: with ``reward_shaping=False`` (the robomimic and DPPO
      setting) exactly ``reward_scale`` (1.0) at a successful step and 0 otherwise for Lift, PickPlaceCan,
      NutAssemblySquare and TwoArmTransport; with ``reward_shaping=True`` robosuite's shaped reward of that state.

    Any other backend of these tasks (e.g. a batched MuJoCo one) must give the same two values for the same state.
    """
    success = _task_success(rs_env)
    reward = float(rs_env.reward(action))
    return reward, success


class RobosuiteEnv(Env):
    """One robosuite environment with robomimic observation names (see the module docstring).

    Args:
        env_args: robomimic env metadata (``data.attrs["env_args"]`` of a dataset or :func:`default_env_args`);
            robosuite <= 1.4 configs are converted with :func:`convert_legacy_env_args`.
        obs_keys: observation keys to return, in this order (None = all). Image keys ``<camera>_image`` switch camera
            observations on for exactly those cameras; without image keys cameras are off (10x faster).
        max_episode_steps: time limit (default :data:`DEFAULT_MAX_EPISODE_STEPS` of the task).
        terminate_on_success: end the episode (``terminated=True``) when the task is solved.
        render_size: default height and width of :meth:`render` frames.
        render_camera: default camera of :meth:`render`.
        render: create the offscreen renderer up front (for videos); :meth:`render` also works without it.

    Attributes:
        env: the robosuite environment (scripted experts read it).
        env_name, env_args (after conversion), obs_keys, obs_shapes, obs_dtypes, action_dim, action_low,
        action_high, max_episode_steps, elapsed_steps.
    """

    def __init__(self, env_args: Dict[str, Any], obs_keys: Optional[List[str]] = None,
                 max_episode_steps: Optional[int] = None, terminate_on_success: bool = False,
                 render_size: int = 256, render_camera: str = "agentview", render: bool = False):
        self.env = None  # type: Any
        args = convert_legacy_env_args(env_args)
        self.env_name = args["env_name"]
        kw = copy.deepcopy(args["env_kwargs"])
        if obs_keys is not None:
            if isinstance(obs_keys, str) or not all(isinstance(k, str) for k in obs_keys):
                raise DpftError("obs_keys must be a list of observation names, got {!r}.".format(obs_keys))
            obs_keys = list(obs_keys)
            cameras = [c for c in (_image_key_camera(k) for k in obs_keys) if c]
            if cameras:
                old = kw.get("camera_names", ["agentview"])
                old = [old] if isinstance(old, str) else list(old or [])
                kw["camera_heights"] = [_per_camera(kw.get("camera_heights"), old, c, 84) for c in cameras]
                kw["camera_widths"] = [_per_camera(kw.get("camera_widths"), old, c, 84) for c in cameras]
                kw["camera_names"] = cameras
                kw["use_camera_obs"] = True
            else:
                kw["use_camera_obs"] = False
        use_camera = bool(kw.get("use_camera_obs", False))
        if use_camera and kw.get("camera_depths"):
            kw["camera_depths"] = False  # depth maps are not robomimic image observations
        needs_gl = use_camera or bool(render)
        setup_rendering(require=needs_gl)
        robosuite = _import_robosuite()
        from robosuite import macros

        kw.update(_FORCED_KWARGS)
        kw["has_offscreen_renderer"] = needs_gl
        kw["use_camera_obs"] = use_camera
        # robosuite draws construction-time randomness (e.g. Lift's cube size) from env.rng: seed it so every
        # instance built from the same env_args is the same task (reset(seed) reseeds episodes afterwards).
        kw.setdefault("seed", 0)
        self.env_args = args
        if max_episode_steps is None:
            if self.env_name not in DEFAULT_MAX_EPISODE_STEPS:
                raise DpftError(
                    "No default episode length for robosuite env {!r} (known: {}); pass max_episode_steps.".format(
                        self.env_name, ", ".join(sorted(DEFAULT_MAX_EPISODE_STEPS)))
                )
            max_episode_steps = DEFAULT_MAX_EPISODE_STEPS[self.env_name]
        if int(max_episode_steps) < 1:
            raise DpftError("max_episode_steps must be >= 1, got {!r}.".format(max_episode_steps))
        self.max_episode_steps = int(max_episode_steps)
        self.terminate_on_success = bool(terminate_on_success)
        self.render_size = int(render_size)
        self.render_camera = render_camera
        self._flip_images = getattr(macros, "IMAGE_CONVENTION", "opengl") == "opengl"
        try:
            self.env = robosuite.make(self.env_name, **kw)
        except DpftError:
            raise
        except Exception as e:
            raise DpftError(
                "robosuite.make({!r}, ...) failed with {}: {}. Check env_args['env_kwargs'] (camera names, robots, "
                "controller_configs).".format(self.env_name, type(e).__name__, e)
            ) from e
        self._use_camera = use_camera
        self.env.hard_reset = False  # robosuite hard resets leak memory (DPPO, diffusion_policy)
        self._robot_prefixes = [r.robot_model.naming_prefix for r in self.env.robots]
        low, high = self.env.action_spec
        self.action_low = np.asarray(low, dtype=np.float64)
        self.action_high = np.asarray(high, dtype=np.float64)
        self.action_dim = int(self.action_low.shape[0])

        first = self._all_obs(self._fresh_raw_obs())
        if obs_keys is None:
            obs_keys = list(first)
        missing = [k for k in obs_keys if k not in first]
        if missing:
            self.close()
            raise DpftError(
                "Observation key(s) {} are not produced by robosuite {} ({}); available keys: {}.".format(
                    ", ".join(repr(k) for k in missing), robosuite.__version__, self.env_name, ", ".join(first))
            )
        self.obs_keys = list(obs_keys)
        self.obs_shapes = {k: tuple(first[k].shape) for k in self.obs_keys}  # type: Dict[str, Tuple[int, ...]]
        self.obs_dtypes = {k: first[k].dtype for k in self.obs_keys}  # type: Dict[str, Any]
        self.elapsed_steps = 0
        self._has_reset = False
        self._closed = False

    # -- observations ----------------------------------------------------------------------------------------------
    def _all_obs(self, raw: Dict[str, Any]) -> ObsDict:
        """robosuite's observation dict -> robomimic's names (images upright, ``object``, robot keys)."""
        out = {}  # type: ObsDict
        for k, v in raw.items():
            if k.endswith("_image"):
                img = np.asarray(v)
                out[k] = np.ascontiguousarray(img[::-1] if self._flip_images else img)
        if "object-state" in raw:
            out["object"] = np.array(raw["object-state"])
        for pf in self._robot_prefixes:
            for k, v in raw.items():
                if k.startswith(pf) and k not in out and not k.endswith("proprio-state"):
                    out[k] = np.array(v)
        return out

    def _obs(self, raw: Dict[str, Any]) -> ObsDict:
        full = self._all_obs(raw)
        return {k: full[k] for k in self.obs_keys}

    def _make_gl_current(self) -> None:
        """Make this env's GL context current: robosuite only does so when creating it, so another renderer in the
        process (a second env, a mujoco.Renderer, gymnasium) would otherwise receive this env's camera renders."""
        ctx = getattr(self.env.sim, "_render_context_offscreen", None)
        make_current = getattr(getattr(ctx, "gl_ctx", None), "make_current", None)
        if make_current is not None:
            make_current()

    def _fresh_raw_obs(self) -> Dict[str, Any]:
        """robosuite observations recomputed for the current state, without disturbing robosuite's sampling clocks.

        Relative sensors (e.g. PickPlace's ``Can_to_robot0_eef_pos`` inside ``object-state``) read the gripper pose
        from robosuite's observation cache, which one forced update leaves empty (zeros) after a reset and stale after
        ``reset_to``; so non-image observables are updated once before the final pass (cameras render once). Every
        forced update also advances each observable's sampling timer by one physics step, which would shift at which
        sub-step later observations are sampled; the timers are restored so that reading an observation is a pure
        peek and trajectories do not depend on how often it was called.
        """
        env = self.env
        self._make_gl_current()
        clocks = [(ob, ob._time_since_last_sample, ob._sampled) for ob in env._observables.values()]
        try:
            for observable, _, _ in clocks:
                if observable.modality != "image":
                    observable.update(timestep=env.model_timestep, obs_cache=env._obs_cache, force=True)
            return env._get_observations(force_update=True)
        finally:
            for observable, since, sampled in clocks:
                observable._time_since_last_sample = since
                observable._sampled = sampled

    def get_observation(self) -> ObsDict:
        """The current observation (without stepping)."""
        return self._obs(self._fresh_raw_obs())

    # -- episode ---------------------------------------------------------------------------------------------------
    def reset(self, seed: Optional[int] = None) -> ObsDict:
        """New episode; with ``seed`` the initial state (object placement, robot joint noise) is a function of it.

        robosuite draws every reset from ``env.rng`` (shared with its placement samplers), so the seed is applied by
        resetting that generator's state in place. ``seed=None`` continues the current random stream.
        """
        if seed is not None:
            if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or int(seed) < 0:
                raise DpftError("reset(seed=...) needs a non-negative integer seed, got {!r}.".format(seed))
            self.env.rng.bit_generator.state = np.random.default_rng(int(seed)).bit_generator.state
        self._make_gl_current()
        self.env.reset()
        self.elapsed_steps = 0
        self._has_reset = True
        return self.get_observation()

    def step(self, action: np.ndarray) -> Tuple[ObsDict, float, bool, bool, Dict[str, Any]]:
        """Apply one action ``(Da,)`` in [-1, 1]; returns ``(obs, reward, terminated, truncated, info)``."""
        a = self._checked_action(action)
        if self._use_camera:
            self._make_gl_current()
        raw, _, _, info = self.env.step(a)  # robosuite's reward is of the un-refreshed kinematics: not used
        self.elapsed_steps += 1
        # robosuite computes its reward and samples observations before the kinematics of the last physics sub-step
        # are recomputed (positions lag the joint state by ~0.5 mm); robomimic datasets (and `dpft demos`) hold
        # observations of each stored state. Refresh (mj_forward changes no state) so that reward, success and the
        # low-dim observations all describe the state the step ended in.
        self.env.sim.forward()
        if not self._use_camera:
            raw = self._fresh_raw_obs()
        reward, success = refreshed_reward_and_success(self.env, a)
        info = dict(info or {})
        info["success"] = success
        terminated = bool(self.terminate_on_success and success)
        truncated = self.elapsed_steps >= self.max_episode_steps
        return self._obs(raw), float(reward), terminated, truncated, info

    def is_success(self) -> bool:
        """Task success in the current state (robosuite's ``_check_success``)."""
        return _task_success(self.env)

    # -- simulator state -------------------------------------------------------------------------------------------
    def get_state(self) -> np.ndarray:
        """Flattened MuJoCo state ``(1 + nq + nv,)`` = (time, qpos, qvel), as robomimic's ``states``."""
        return np.array(self.env.sim.get_state().flatten())

    def reset_to(self, state: Any, model_xml: Optional[str] = None) -> ObsDict:
        """Start an episode from a stored state: a row of a dataset's ``states`` (or robomimic's ``{"states",
        "model"}`` dict); ``model_xml`` (a demo's ``model_file``) rebuilds the scene first. Returns the observation.

        Everything outside the MuJoCo state is reset as robosuite's own reset does (controller goals, gripper command
        ramps, solver warm start, observation sampling timers), so what follows is a function of ``state`` alone, not
        of the steps before.
        """
        if isinstance(state, dict):
            model_xml = state.get("model", model_xml)
            state = state.get("states")
        if state is None:
            raise DpftError("reset_to() needs a state array (robomimic 'states'), got None.")
        flat = np.asarray(state, dtype=np.float64).reshape(-1)
        if not self._has_reset:
            self.reset()
        if model_xml is not None:
            self._make_gl_current()
            self.env.reset_from_xml_string(self.env.edit_model_xml(model_xml))
        expected = self.env.sim.get_state().flatten().shape[0]
        if flat.shape[0] != expected:
            raise DpftError(
                "reset_to(): state has {} values but {} needs {} (time, qpos, qvel); is it from another task or "
                "robosuite version?".format(flat.shape[0], self.env_name, expected)
            )
        sim = self.env.sim
        sim.reset()  # zero controls, warm start and contact buffers, as at the start of an episode
        sim.set_state_from_flattened(flat)
        sim.forward()
        self._reset_controllers()
        # observation sampling clocks exactly as robosuite's reset leaves them (reset, then one forced update)
        self.env._obs_cache = {}
        for observable in self.env._observables.values():
            observable.reset()
        self.env._update_observables(force=True)
        self.elapsed_steps = 0
        self._has_reset = True
        return self.get_observation()

    def _reset_controllers(self) -> None:
        """Controller goals to the current pose and gripper command ramps to zero (robosuite's Robot.reset)."""
        for robot in self.env.robots:
            for arm in robot.arms:
                if robot.has_gripper.get(arm, False):
                    robot.gripper[arm].current_action = np.zeros(robot.gripper[arm].dof)
            cc = robot.composite_controller
            cc.update_state()
            for controller in cc.part_controllers.values():
                controller.update(force=True)
            cc.reset()

    # -- rendering -------------------------------------------------------------------------------------------------
    def camera_names(self) -> List[str]:
        """Cameras of the scene (valid ``camera`` values of :meth:`render`)."""
        model = self.env.sim.model
        return [model.camera_id2name(i) for i in range(model.ncam)]

    def render(self, height: Optional[int] = None, width: Optional[int] = None,
               camera: Optional[str] = None) -> np.ndarray:
        """RGB frame ``(height, width, 3)`` uint8, upright (default size ``render_size``, camera ``render_camera``)."""
        h = int(height if height is not None else self.render_size)
        w = int(width if width is not None else self.render_size)
        cam = camera if camera is not None else self.render_camera
        if h < 1 or w < 1:
            raise DpftError("render(): height and width must be positive, got {}x{}.".format(h, w))
        names = self.camera_names()
        if cam not in names:
            raise DpftError("render(): {} has no camera {!r}; cameras: {}.".format(self.env_name, cam, ", ".join(names)))
        sim = self.env.sim
        if sim._render_context_offscreen is None:
            setup_rendering(require=True)
            from robosuite.utils.binding_utils import MjRenderContextOffscreen

            ctx = MjRenderContextOffscreen(sim, device_id=getattr(self.env, "render_gpu_device_id", -1))
            ctx.vopt.geomgroup[0] = 0  # hide collision geoms, as robosuite's own offscreen renderer does
            ctx.vopt.geomgroup[1] = 1
        self._make_gl_current()
        img = sim.render(width=w, height=h, camera_name=cam)
        return np.ascontiguousarray(img[::-1])

    def close(self) -> None:
        """Free the simulator and its GL contexts (avoids EGL errors from ``__del__`` at exit)."""
        if getattr(self, "_closed", False) or self.env is None:
            return
        self._closed = True
        try:
            self.env.close()
        except Exception as e:  # pragma: no cover - best effort at shutdown
            logger.debug("closing robosuite env failed: %s", e)
