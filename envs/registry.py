"""Build an :class:`dpft.envs.base.Env` from robomimic ``env_args`` (what a dataset or checkpoint stores).

``env_args["type"]`` picks the backend, as in robomimic's EnvType: ``1`` robosuite (:class:`RobosuiteEnv`; robosuite
<= 1.4 configs of published datasets are converted automatically), ``2`` gymnasium MuJoCo (:class:`GymEnv`).
FurnitureBench (``"furniture"``) is GPU-batched and has its own constructor, ``dpft.envs.furniture.make_furniture_env``.

Worker processes of the vector env receive an :class:`EnvFactory` (plain data, picklable) and call it to build
their env, so no simulator or GL context ever crosses a process boundary.

Example::

    from dpft.envs.registry import env_args_for_task, make_env, EnvFactory
    env = make_env(env_args_for_task("lift"), obs_keys=["robot0_eef_pos", "object"])
    factory = EnvFactory(env_args_for_task("hopper"), kwargs={"max_episode_steps": 1000})
    env2 = factory()
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from dpft.errors import DpftError
from dpft.envs.base import Env

#: robomimic EnvType values handled here
ENV_TYPES = {1: "robosuite", 2: "gym"}

#: keyword arguments every adapter accepts (besides env_args and obs_keys)
ENV_KWARGS = ("max_episode_steps", "terminate_on_success", "render_size", "render_camera", "render")


def _env_type(env_args: Any) -> Any:
    if not isinstance(env_args, dict):
        raise DpftError("env_args must be a dict like {{'env_name': 'Lift', 'type': 1, 'env_kwargs': {{...}}}} "
                        "(robomimic env metadata), got {}.".format(type(env_args).__name__))
    if "type" not in env_args:
        raise DpftError("env_args has no 'type' (1 = robosuite, 2 = gym, 'furniture'); keys present: {}.".format(
            ", ".join(sorted(env_args)) or "none"))
    env_type = env_args["type"]
    if isinstance(env_type, bool) or not isinstance(env_type, (int, str)):
        raise DpftError("env_args['type'] must be 1 (robosuite), 2 (gym) or 'furniture', got {!r}.".format(env_type))
    if isinstance(env_type, str):
        name = env_type.strip().lower()
        return int(name) if name.isdigit() else {"robosuite": 1, "gym": 2, "gymnasium": 2}.get(name, name)
    return env_type


def env_kind(env_args: Dict[str, Any]) -> str:
    """``"robosuite"``, ``"gym"`` or ``"furniture"`` for robomimic-style ``env_args`` (type 1 / 2 / "furniture",
    numbers as strings and names in any case accepted); DpftError for anything else."""
    kind = {1: "robosuite", 2: "gym", "furniture": "furniture"}.get(_env_type(env_args))
    if kind is None:
        raise DpftError("Unknown env_args['type'] {!r}; supported: 1 (robosuite), 2 (gym), 'furniture'.".format(
            env_args.get("type")))
    return kind


#: gymnasium MuJoCo locomotion tasks (ids without the version): returns only, no success criterion
LOCOMOTION_TASKS = frozenset(["hopper", "walker2d", "halfcheetah", "ant", "humanoid", "humanoidstandup", "swimmer"])


def has_success_signal(env_args: Any) -> bool:
    """Whether the task of ``env_args`` reports success: robosuite and FurnitureBench do; Gym locomotion tasks
    (:data:`LOCOMOTION_TASKS`) have only returns. Anything else, or missing ``env_args``, counts as having one."""
    if not isinstance(env_args, dict) or not env_args:
        return True
    try:
        kind = env_kind(env_args)
    except DpftError:
        return True
    name = str(env_args.get("env_name", "")).split("-v")[0].lower()
    return not (kind == "gym" and name in LOCOMOTION_TASKS)


def import_isaacgym_if_needed(checkpoint: str) -> None:
    """Isaac Gym must be imported before torch: if the checkpoint at ``checkpoint`` (RUN_DIR or a checkpoint
    directory) was trained for FurnitureBench on Isaac Gym (``env_kwargs.simulator`` absent or ``"isaacgym"``;
    not the ``"fake"``), import it now. Reads meta.json only (no torch import)."""
    import glob
    import json
    import os

    candidates = [os.path.join(checkpoint, "meta.json")]
    latest = os.path.join(checkpoint, "checkpoints", "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            candidates.insert(0, os.path.join(checkpoint, "checkpoints", f.read().strip(), "meta.json"))
    candidates += sorted(glob.glob(os.path.join(checkpoint, "checkpoints", "step_*", "meta.json")))[-1:]
    for path in candidates:
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    env_args = json.load(f).get("env_args") or {}
                sim = (env_args.get("env_kwargs") or {}).get("simulator") if isinstance(env_args, dict) else None
                furniture = env_kind(env_args) == "furniture" and sim in (None, "isaacgym")  # not the CPU fake
            except (OSError, ValueError, DpftError):
                return  # loading the checkpoint reports the problem properly
            if furniture:
                from dpft.envs.furniture import import_isaacgym_first

                import_isaacgym_first()
            return


def make_env(env_args: Dict[str, Any], obs_keys: Optional[List[str]] = None, **kwargs: Any) -> Env:
    """Build one environment from robomimic ``env_args``.

    Args:
        env_args: ``{"env_name", "type", "env_kwargs"}`` (from a dataset's ``data.attrs["env_args"]``, a checkpoint's
            meta, or :func:`env_args_for_task`).
        obs_keys: observation keys to return (None = all the env produces).
        **kwargs: ``max_episode_steps``, ``terminate_on_success``, ``render_size``, ``render_camera``, ``render``
            (a value of None means the adapter's default).

    Raises:
        DpftError: unknown type or env name, FurnitureBench (built elsewhere), unknown keyword.
    """
    unknown = [k for k in kwargs if k not in ENV_KWARGS]
    if unknown:
        raise DpftError("make_env(): unknown keyword(s) {}; accepted: {}.".format(
            ", ".join(repr(k) for k in unknown), ", ".join(ENV_KWARGS)))
    kwargs = {k: v for k, v in kwargs.items() if v is not None}  # None = the adapter's default
    env_type = _env_type(env_args)
    if env_type in ENV_TYPES and env_args["type"] != env_type:
        env_args = dict(env_args, type=env_type)  # "1" -> 1
    if env_type == 1:
        from dpft.envs.mujoco_backend import resolve_backend

        backend, rs_args = resolve_backend(env_args, obs_keys)
        if backend == "mujoco":
            from dpft.envs.mujoco_backend import MujocoEnv

            return MujocoEnv(rs_args, obs_keys=obs_keys, **kwargs)
        from dpft.envs.robosuite_env import RobosuiteEnv

        return RobosuiteEnv(rs_args, obs_keys=obs_keys, **kwargs)
    if env_type == 2:
        from dpft.envs.gym_env import GymEnv

        return GymEnv(env_args, obs_keys=obs_keys, **kwargs)
    if env_type == "furniture":
        raise DpftError(
            "FurnitureBench environments are GPU-batched (Isaac Gym, many envs in one process) and are built with "
            "dpft.envs.furniture.make_furniture_env(...), which returns a BatchedEnv; make_env() builds single envs only."
        )
    raise DpftError("Unknown env_args['type'] {!r}; supported: 1 (robosuite), 2 (gym), 'furniture' "
                    "(dpft.envs.furniture.make_furniture_env).".format(env_args.get("type")))


def env_args_for_task(task: str, image_obs: bool = False) -> Dict[str, Any]:
    """``env_args`` for a task name: robosuite ``lift``, ``can``, ``square``, ``transport`` or gym ``hopper``,
    ``walker2d``, ``halfcheetah`` (robosuite / gymnasium ids such as ``Lift`` or ``Hopper-v5`` work too)."""
    from dpft.envs.gym_env import GYM_TASKS, default_gym_env_args
    from dpft.envs.robosuite_env import TASKS

    if isinstance(task, str):
        low = task.lower()
        if low in TASKS or low in (v.lower() for v in TASKS.values()):
            from dpft.envs.robosuite_env import default_env_args

            return default_env_args(task, image_obs=image_obs)
        if low in GYM_TASKS or low in (v.lower() for v in GYM_TASKS.values()):
            if image_obs:
                raise DpftError("Gym task {!r} has state observations only; image_obs=True is not available.".format(
                    task))
            return default_gym_env_args(task)
    raise DpftError("Unknown task {!r}; robosuite tasks: {}; gym tasks: {}.".format(
        task, ", ".join(TASKS), ", ".join(GYM_TASKS)))


@dataclass
class EnvFactory:
    """Picklable recipe for one env: ``EnvFactory(env_args, obs_keys, kwargs)()`` calls :func:`make_env`.

    Attributes:
        env_args: robomimic env metadata.
        obs_keys: observation keys (None = all).
        kwargs: keyword arguments of :func:`make_env` (``max_episode_steps``, ``render``, ...).
    """

    env_args: Dict[str, Any]
    obs_keys: Optional[List[str]] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _env_type(self.env_args)  # fail early, in the parent process
        unknown = [k for k in self.kwargs if k not in ENV_KWARGS]
        if unknown:
            raise DpftError("EnvFactory: unknown keyword(s) {}; accepted: {}.".format(
                ", ".join(repr(k) for k in unknown), ", ".join(ENV_KWARGS)))
        self.env_args = copy.deepcopy(self.env_args)
        self.obs_keys = None if self.obs_keys is None else list(self.obs_keys)
        self.kwargs = dict(self.kwargs)

    def __call__(self) -> Env:
        return make_env(self.env_args, obs_keys=self.obs_keys, **self.kwargs)
