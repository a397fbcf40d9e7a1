"""FurnitureBench backend: ankile's GPU-batched ``FurnitureRLSimEnv`` behind dpft's :class:`BatchedEnv`.

**Import order.** Isaac Gym refuses to load once PyTorch is imported ("PyTorch was imported before isaacgym
modules"), and dpft's policy/model modules (like most of its dependencies) import torch. This module tries
``from isaacgym import gymapi`` as its *first* statement, before it imports anything that pulls in torch.
Users of this backend must import :mod:`dpft.envs.furniture` (or call :func:`import_isaacgym_first`, which
the CLI does first thing) before ``import torch`` / ``import dpft`` / anything torch-based. Keep
``envs/__init__.py`` free of torch imports for the same reason. Without Isaac Gym this module still imports
(the fake env and the data converter need only torch); :func:`make_furniture_env` then raises a
:class:`~dpft.errors.DpftError` with install instructions.

**From a checkpoint's env_args** (``dpft finetune``, ``dpft rollout``): :func:`furniture_env_from_args` reads
``env_args["env_kwargs"]`` (``furniture``, ``randomness``, ``max_episode_steps``, ``simulator``: ``"isaacgym"``
by default, or ``"fake"`` for :class:`dpft.envs.furniture_fake.FakeFurnitureRLSimEnv` on the CPU).

**Install** (not possible on Python > 3.8 or from PyPI): a Python 3.8 environment; Isaac Gym Preview 4,
downloaded from NVIDIA (developer account) and installed with ``pip install -e isaacgym/python``; ankile's
fork of furniture-bench (``git clone https://github.com/ankile/furniture-bench && pip install -e
furniture-bench``; clvrai's original lacks ``furniture_rl_sim_env``); ``pip install ipdb==0.13.13`` (the fork
imports ``ipdb`` at module level in its RL env, controllers, furniture and robot-state modules but does not list
it; DPPO and ResiP install this version); an NVIDIA GPU. ``numpy<1.24`` is needed only by code that imports
``isaacgym.torch_utils`` (Isaac Gym Preview 4 uses ``np.float`` there, removed in numpy 1.24); the fork does not
import it and ResiP runs numpy 1.24.4, so dpft does not require it (``tools/furniture_check.py`` reports both).

**What the env does** (``FurnitureRLSimEnv`` constructed as DPPO and ResiP do): state observations,
``act_rot_repr="rot_6d"``, ``action_type="pos"``, ``ctrl_mode="diffik"``, 10 Hz.

* Observation keys ``robot_state`` (16: ee_pos 3, ee rot6d 6, ee_pos_vel 3, ee_ori_vel 3, gripper_width 1;
  the fork's 14-D state with its xyzw quaternion converted as in ``proprioceptive_quat_to_6d_rotation``)
  and ``parts_poses`` ((num_parts + 1 obstacle) * 7: 42 one_leg, 28 lamp / round_table, 21 mug_rack /
  factory_peg_hole). Concatenated in that order they are DPPO's 58-D / 44-D state. Values are raw (the
  policy normalizes with its checkpoint's normalizer); arrays are float32 numpy ``(N, To, D)`` unless
  ``return_torch=True`` (then torch tensors on the simulator's device; no GPU->CPU copy).
* Action ``(N, act_steps, 10)``: absolute end-effector pose in the robot base frame ``[x, y, z, rot6d,
  gripper]`` (gripper < 0 opens, > 0 closes); the simulator clips every entry to [-1, 1].
* Reward: the fork's sparse reward (1.0 on a step where one or more required part pairs first become
  assembled: at most 1.0 per step, two pairs assembled in the same step give 1.0) summed over the executed steps of the chunk; ``sparse_reward=False``
  gives DPPO's dense variant (each step earns the number of pairs assembled so far in the episode).
* ``success``: every pair assembled (the fork's ``done``). Episodes end at ``max_episode_steps``
  (truncation; per-task defaults in :data:`TASKS`), and also at success when ``terminate_on_success``.
  The default (False) follows DPPO: episodes run to the time limit and success is recorded.
* Auto-reset: envs whose episode ended are reset after the chunk through the fork's partial reset
  ``reset(env_idxs)``; ``final_obs`` keeps their last history. An episode that ends inside a chunk
  ignores the remaining actions of that chunk (they are executed by the batched simulator but neither
  their reward nor their observations count). ``truncate_at_chunk_end=True`` checks the time limit only after
  the chunk, as DPPO's furniture wrapper does (``env_steps >= max_env_steps`` after the chunk), so every
  step of the last chunk runs and is rewarded: one_leg's 700-step limit then ends episodes at 704 steps with
  ``act_steps=8``. Caveat (fork behaviour): a partial reset calls ``refresh()``, one ``simulate()`` call of
  1/60 s (2 PhysX substeps; an env step is 6 such calls), on *every* env (``lamp``: eleven calls, and the
  bulb hold is re-armed for all envs); the observation returned for running envs is their state after that,
  and it replaces the newest entry of their history.
* ``record=True``: every partial reset restarts the fork's video recording (``reset`` calls
  ``recorder.restart_recording()``), so with auto-reset a video holds only the time since the last reset of
  any env.
* ``max_env_steps`` (the fork's constructor argument; None = ``max_episode_steps``, as DPPO passes it)
  matters only for ``lamp``: the fork holds every bulb at rest until some env passes ``max_env_steps / 2``
  steps, then releases all of them. ResiP passes 100,000,000 (bulbs are held for the whole episode).
* NaN/Inf observations (an Isaac Gym fault; DPPO's README lists it as unhandled): detected per env after
  every inner step; that episode ends as truncated and unsuccessful, its reward from that step on is
  dropped, its history keeps the last finite observation, and it is reset (``info["nan_resets"]`` and
  ``info["failed"]`` mark it, as in :mod:`dpft.envs.vector`; :attr:`FurnitureEnv.nan_resets_total` counts
  them). A reset that still yields non-finite values is retried (``max_nan_reset_attempts``); after that
  the values are replaced by 0 (``info["nan_unrecovered"]``), so NaN never reaches the caller.

* Gripper command on reset: every reset episode starts with the fork's initial "open" gripper command
  (``last_grasp = -1``); the fork itself keeps the previous episode's command across resets.

Randomness: FurnitureSim draws its reset randomization from torch's global generator for all envs at once,
so per-env seeds cannot be honoured: ``reset(seeds)`` seeds torch and numpy globally with ``seeds[0]``.
PhysX on the GPU is not bit-reproducible anyway.
"""
from __future__ import annotations

# --- Isaac Gym must be imported before torch: keep this block first. ---------------------------------
try:
    from isaacgym import gymapi as _gymapi  # noqa: F401
except (ImportError, OSError):  # not installed, wrong Python, or torch already imported:
    pass  # import_isaacgym_first() retries and explains
# -------------------------------------------------------------------------------------------------------

import re  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any, Dict, List, Optional, Tuple  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dpft.errors import DpftError  # noqa: E402
from dpft.envs.base import BatchedEnv, StepResult  # noqa: E402
from dpft.envs.rotation import robot_state_quat_to_rot6d  # noqa: E402

__all__ = [
    "TASKS",
    "TaskSpec",
    "DEFAULT_STATE_OBS",
    "ROBOT_STATE_KEYS",
    "OBS_KEYS",
    "ACTION_DIM",
    "import_isaacgym_first",
    "isaacgym_install_message",
    "make_furniture_env",
    "furniture_env_from_args",
    "SIMULATORS",
    "FurnitureEnv",
    "robot_state_to_16d",
    "recipe_batch_size",
    "OBSTACLE_FRONT_NOMINAL_POSE",
]


@dataclass(frozen=True)
class TaskSpec:
    """One FurnitureSim task as ankile's fork defines it.

    Attributes:
        num_parts: furniture parts (``Furniture.num_parts``); ``parts_poses`` has ``(num_parts + 1) * 7``
            values because the fork appends the front obstacle's pose.
        pairs: part index pairs to assemble (``FurnitureRLSimEnv.pairs_to_assemble``).
        max_episode_steps: default episode length (ResiP README / DPPO configs), None if none is published.
    """

    num_parts: int
    pairs: Tuple[Tuple[int, int], ...]
    max_episode_steps: Optional[int]

    @property
    def parts_poses_dim(self) -> int:
        return (self.num_parts + 1) * 7


# Sources (ankile/furniture-bench 52e7c68): num_parts from furniture_bench/furniture/{square_table,lamp,
# round_table}.py and furniture/scans/{mug_rack,factory_peg_hole,factory_nut_bolt}.py (one_leg subclasses
# square_table); pairs from furniture_rl_sim_env.py FurnitureRLSimEnv.__init__ ("pairs_to_assemble").
# Episode lengths: ResiP README (one_leg 700, lamp 1000, round_table 1000, mug_rack 400, peg_hole 200),
# identical to DPPO's furniture configs where both exist.
TASKS: Dict[str, TaskSpec] = {
    "one_leg": TaskSpec(5, ((0, 4),), 700),
    "lamp": TaskSpec(3, ((0, 1), (0, 2)), 1000),
    "round_table": TaskSpec(3, ((0, 1), (1, 2)), 1000),
    "square_table": TaskSpec(5, ((0, 1), (0, 2), (0, 3), (0, 4)), None),
    "mug_rack": TaskSpec(2, ((0, 1),), 400),
    "factory_peg_hole": TaskSpec(2, ((0, 1),), 200),
    "factory_nut_bolt": TaskSpec(2, ((0, 1),), None),
}

# furniture_bench/envs/observation.py DEFAULT_STATE_OBS (the order the fork concatenates robot_state in).
DEFAULT_STATE_OBS: Tuple[str, ...] = (
    "robot_state/ee_pos",
    "robot_state/ee_quat",
    "robot_state/ee_pos_vel",
    "robot_state/ee_ori_vel",
    "robot_state/gripper_width",
    "parts_poses",
)
# furniture_bench/robot/robot_state.py ROBOT_STATES with ROBOT_STATE_DIMS.
ROBOT_STATE_KEYS: Tuple[Tuple[str, int], ...] = (
    ("ee_pos", 3), ("ee_quat", 4), ("ee_pos_vel", 3), ("ee_ori_vel", 3), ("gripper_width", 1),
)
OBS_KEYS: Tuple[str, ...] = ("robot_state", "parts_poses")
ROBOT_STATE_DIM = 16
ACTION_DIM = 10

_FORK_URL = "https://github.com/ankile/furniture-bench"

# The front obstacle's nominal pose [pos 3, quat xyzw 4] in the AprilTag frame, before FurnitureRLSimEnv's random
# offset (+-0.02 / 0.04 / 0.06 m at low / med / high). Derived from the fork (52e7c68): create_envs places it in the
# simulator frame at (base_tag.x + 0.38, 0, table_surface_z + 0.015) rotated 90 degrees about z, with
# table_surface_z = 0.415, franka base at (-0.3, 0, 0.415) and base_tag = franka + (0.3015, 0, 0)
# (furniture_sim_env.py:307-313, furniture_rl_sim_env.py:280-320); parts_poses maps it to the AprilTag frame with
# sim_to_april_mat = inv(tag_base_from_robot_base) @ inv(franka_from_origin), tag_base_from_robot_base =
# get_mat((0.3015, 0, 0), (pi, 0, pi/2)) (config.py:33-36). That gives position (0, 0.38, -0.015) and the rotation
# diag(1, -1, -1) (pi about x): quaternion xyzw (1, 0, 0, 0), whose sign is +1 by matrix_to_quaternion_xyzw's
# copysign rule for exact values (the simulator's float state may flip it; q and -q are the same rotation).
# tools/furniture_check.py compares it with a live FurnitureRLSimEnv observation (randomize_obstacle=False).
OBSTACLE_FRONT_NOMINAL_POSE: Tuple[float, ...] = (0.0, 0.38, -0.015, 1.0, 0.0, 0.0, 0.0)


def isaacgym_install_message(cause: Optional[BaseException] = None) -> str:
    """One paragraph explaining how to install the FurnitureBench backend (and why it failed)."""
    reason = ""
    if cause is not None:
        text = str(cause)
        lower = text.lower()
        if "imported before isaacgym" in lower or ("torch" in lower and "before" in lower):
            reason = (
                "Isaac Gym refused to load because PyTorch was imported first: import dpft.envs.furniture (or "
                "call dpft.envs.furniture.import_isaacgym_first()) before anything that imports torch, "
                "including `import dpft`. "
            )
        else:
            reason = "Importing Isaac Gym failed (%s: %s). " % (type(cause).__name__, text)
    py = "%d.%d" % sys.version_info[:2]
    return (
        "The FurnitureBench backend needs NVIDIA Isaac Gym, which is not on PyPI. %s"
        "Install it in a Python 3.8 environment (Isaac Gym supports Python 3.6-3.8; this interpreter is "
        "Python %s): download Isaac Gym Preview 4 from NVIDIA (https://developer.nvidia.com/isaac-gym), "
        "run `pip install -e isaacgym/python`, then install ankile's furniture-bench fork with "
        "`git clone %s && pip install -e furniture-bench` (clvrai's original lacks furniture_rl_sim_env), "
        "then `pip install ipdb==0.13.13` (the fork imports ipdb at module level but does not install it), "
        "and if libpython3.8.so is not found set LD_LIBRARY_PATH to your environment's lib directory. "
        "`python tools/furniture_check.py` then checks the installation on the GPU. To dry-run configs without a simulator use dpft.envs.furniture_fake.FakeFurnitureRLSimEnv."
        % (reason, py, _FORK_URL)
    )


def import_isaacgym_first() -> Any:
    """Import Isaac Gym (``isaacgym.gymapi``) now, before torch-dependent code; return the module.

    Raises:
        DpftError: Isaac Gym is missing, the Python version is unsupported, or torch was imported first;
            the message says how to fix it (Python 3.8, Isaac Gym Preview 4, ankile's fork).
    """
    try:
        from isaacgym import gymapi  # noqa: F401
    except (ImportError, OSError) as exc:
        raise DpftError(isaacgym_install_message(exc)) from None
    return gymapi


def _load_fork_env_class() -> Any:
    import_isaacgym_first()
    try:
        from furniture_bench.envs.furniture_rl_sim_env import FurnitureRLSimEnv
    except ImportError as exc:
        missing = _missing_dependency(exc)
        if missing is not None:
            hint = _MISSING_HINTS.get(missing, "pip install %s" % missing)
            raise DpftError(
                "Isaac Gym loads, but importing ankile's furniture-bench fork (furniture_bench.envs."
                "furniture_rl_sim_env) failed because the module %r is missing (%s: %s): the fork imports it but "
                "does not install it. Install it with `%s` in this environment, then retry."
                % (missing, type(exc).__name__, exc, hint)
            ) from None
        raise DpftError(
            "Isaac Gym loads, but furniture_bench.envs.furniture_rl_sim_env.FurnitureRLSimEnv could not be "
            "imported (%s: %s). Install ankile's fork of furniture-bench (`git clone %s && pip install -e "
            "furniture-bench`); clvrai's original package has no furniture_rl_sim_env module (DPPO issue "
            "#28)." % (type(exc).__name__, exc, _FORK_URL)
        ) from None
    return FurnitureRLSimEnv


# modules the fork imports without listing them in its setup.py, and how DPPO / ResiP install them
_MISSING_HINTS = {"ipdb": "pip install ipdb==0.13.13"}


def _missing_dependency(exc: BaseException) -> Optional[str]:
    """The top-level module a ``ModuleNotFoundError`` names when it is not the fork itself (None otherwise)."""
    if not isinstance(exc, ModuleNotFoundError):
        return None
    name = getattr(exc, "name", None)
    if not name:  # raised by hand (``ModuleNotFoundError('ipdb')``) or by a loader that sets no name
        text = str(exc)
        quoted = re.search(r"No module named '([^']+)'", text)
        name = quoted.group(1) if quoted else text.strip().strip("'\"")
    top = name.split(".")[0] if name else ""
    if not top or top == "furniture_bench" or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", top):
        return None
    return top


# DPPO's furniture fine-tuning minibatch (cfg/furniture/finetune/<task>_<randomness>/ft_ppo_*.yaml, irom-princeton/dppo
# cc7234a): (env step, denoising step) pairs for the diffusion policies, env steps for the Gaussian one.
_DPPO_BATCH = {
    "diffusion_mlp": {("one_leg", "low"): 17600, None: 8800},
    "diffusion_unet": {("one_leg", "low"): 30000, ("one_leg", "med"): 30000, None: 40000},
    "gaussian_mlp": {None: 8800},
}


def recipe_batch_size(agent: str, kind: Optional[str], env_kwargs: Dict[str, Any], policy: str, n_steps: int,
                      envs: int) -> int:
    """``agent.batch_size=null``: the published recipe's minibatch for this run.

    ``residual_ppo``: ``n_steps * envs``, the whole iteration in one minibatch (ResiP ``num_minibatches: 1``).
    ``dppo`` / ``ppo`` on FurnitureBench: DPPO's value for the task and randomness (``_DPPO_BATCH``: diffusion MLP
    17,600 for one_leg low, 8,800 otherwise; UNet 30,000 one_leg, 40,000 lamp / round_table; Gaussian MLP 8,800).

    Raises:
        DpftError: no recipe is known (another agent, env family or policy network): set ``agent.batch_size``.
    """
    if agent == "residual_ppo":
        return int(n_steps) * int(envs)
    if kind == "furniture" and agent in ("dppo", "ppo") and policy in _DPPO_BATCH:
        table = _DPPO_BATCH[policy]
        key = (env_kwargs.get("furniture", "one_leg"), env_kwargs.get("randomness", "low"))
        return int(table.get(key, table[None]))
    raise DpftError(
        "agent.batch_size=null takes the published recipe's minibatch, which dpft knows for agent=residual_ppo (one "
        "minibatch per iteration) and for agent=dppo / ppo on FurnitureBench with a diffusion_mlp, diffusion_unet or "
        "gaussian_mlp policy; this run is agent=%s on %s with policy %r. Set agent.batch_size=N." % (agent, kind, policy))


def _resolve_task(task: str) -> TaskSpec:
    if task not in TASKS:
        hint = ""
        if task in ("peg_hole", "nut_bolt"):
            hint = " (the fork calls it 'factory_%s')" % task
        raise DpftError(
            "Unknown FurnitureBench task %r%s: expected one of %s." % (task, hint, ", ".join(sorted(TASKS)))
        )
    return TASKS[task]


def robot_state_to_16d(robot_state: Any) -> torch.Tensor:
    """The fork's robot state (dict of ``(N, k)`` tensors, or concatenated ``(N, 14)``) -> ``(N, 16)``.

    A dict is concatenated in ``ROBOT_STATE_KEYS`` order (the fork's ``filter_and_concat_robot_state``);
    the xyzw quaternion is replaced by its 6-D rotation.
    """
    if isinstance(robot_state, dict):
        missing = [k for k, _ in ROBOT_STATE_KEYS if k not in robot_state]
        if missing:
            raise DpftError(
                "The FurnitureSim observation's robot_state dict lacks %s; expected keys %s (obs_keys must "
                "include DEFAULT_STATE_OBS)." % (missing, [k for k, _ in ROBOT_STATE_KEYS])
            )
        parts = []
        for key, dim in ROBOT_STATE_KEYS:
            value = torch.as_tensor(robot_state[key])
            parts.append(value.reshape(-1, dim))  # (N, dim); a single env's (dim,) or 0-d value -> (1, dim)
        flat = torch.cat(parts, dim=-1)
    else:
        flat = torch.as_tensor(robot_state)
    if flat.shape[-1] != 14:
        raise DpftError(
            "FurnitureSim robot_state has %d values per env; expected 14 (ee_pos 3, ee_quat 4, ee_pos_vel 3, "
            "ee_ori_vel 3, gripper_width 1 from DEFAULT_STATE_OBS)." % flat.shape[-1]
        )
    return robot_state_quat_to_rot6d(flat.float())


def make_furniture_env(
    task: str = "one_leg",
    randomness: str = "low",
    num_envs: int = 1,
    act_steps: int = 8,
    cond_steps: int = 1,
    max_episode_steps: Optional[int] = None,
    headless: bool = True,
    device: str = "cuda",
    sparse_reward: bool = True,
    terminate_on_success: bool = False,
    sample_perturbations: bool = False,
    record: bool = False,
    return_torch: bool = False,
    max_nan_reset_attempts: int = 3,
    env_cls: Any = None,
    max_env_steps: Optional[int] = None,
    truncate_at_chunk_end: bool = False,
) -> "FurnitureEnv":
    """Build ankile's ``FurnitureRLSimEnv`` (or ``env_cls``, e.g. the fake) and wrap it as a BatchedEnv.

    Args:
        task: ``one_leg``, ``lamp``, ``round_table``, ``square_table``, ``mug_rack``, ``factory_peg_hole``,
            ``factory_nut_bolt`` (the fork's furniture names).
        randomness: ``low`` / ``med`` / ``high`` (initial-pose noise and perturbation forces).
        num_envs: parallel envs on one GPU.
        act_steps: actions executed per :meth:`FurnitureEnv.step` call.
        cond_steps: observation history length To.
        max_episode_steps: episode length in env steps; None takes the task default from :data:`TASKS`.
        headless: no viewer window.
        device: ``cuda`` or ``cuda:<id>`` (Isaac Gym simulates on that GPU); a fake may use ``cpu``.
        sparse_reward: the fork's +1 events (True) or DPPO's dense "pairs assembled so far" (False).
        terminate_on_success: end an episode when every pair is assembled (default: run to the time limit).
        sample_perturbations: random part pushes during steps (ResiP's ``sample_perturbations``).
        record: the fork's video recording of the first env (adds camera rendering; slow).
        return_torch: return torch tensors on the simulator's device instead of numpy arrays.
        max_nan_reset_attempts: resets tried on an env whose reset still yields NaN before zero-filling.
        env_cls: class to construct instead of the fork's ``FurnitureRLSimEnv`` (same constructor).
        max_env_steps: the fork's ``max_env_steps`` (lamp only: bulbs are held at rest until an env passes half of
            it); None = ``max_episode_steps`` (DPPO); ResiP passes 100,000,000.
        truncate_at_chunk_end: check the time limit after the chunk (DPPO's wrapper) instead of at the exact step.

    Returns:
        :class:`FurnitureEnv`; call ``reset()`` before ``step()``.
    """
    spec = _resolve_task(task)
    if randomness not in ("low", "med", "high"):
        raise DpftError("randomness=%r is not supported by FurnitureRLSimEnv: expected low, med or high."
                        % (randomness,))
    if max_episode_steps is None:
        if spec.max_episode_steps is None:
            raise DpftError(
                "Task %r has no published default episode length: pass max_episode_steps (env steps at 10 Hz)."
                % task
            )
        max_episode_steps = spec.max_episode_steps
    _check_positive_int("num_envs", num_envs)
    _check_positive_int("act_steps", act_steps)
    _check_positive_int("cond_steps", cond_steps)
    _check_positive_int("max_episode_steps", max_episode_steps)
    if max_env_steps is None:
        max_env_steps = max_episode_steps
    _check_positive_int("max_env_steps", max_env_steps)
    dev = torch.device(device)
    if env_cls is None:
        if dev.type != "cuda":
            raise DpftError(
                "device=%r: FurnitureSim (Isaac Gym) simulates on an NVIDIA GPU; use 'cuda' or 'cuda:<id>'."
                % (device,)
            )
        env_cls = _load_fork_env_class()
    gpu_id = dev.index if dev.index is not None else 0
    # The fork's real constructor keywords (furniture_rl_sim_env.py FurnitureSimEnv.__init__ and the four
    # names read from **kwargs). DPPO also passes gpu_id= and observation_space=, which the fork silently
    # swallows through **kwargs; they are omitted here (compute_device_id / obs_keys do those jobs).
    # max_env_steps only matters to the fork for lamp (bulbs are held at rest for the first half of
    # max_env_steps): the episode length by default as in DPPO, or ResiP's 1e8; episode ends are decided by
    # FurnitureEnv.
    sim_env = env_cls(
        furniture=task,
        num_envs=num_envs,
        resize_img=True,
        obs_keys=list(DEFAULT_STATE_OBS),  # a fresh list: the fork appends image keys to it when record=True
        concat_robot_state=True,
        manual_label=False,
        manual_done=False,
        headless=headless,
        compute_device_id=gpu_id,
        graphics_device_id=gpu_id,
        init_assembled=False,
        np_step_out=False,
        channel_first=False,
        randomness=randomness,
        randomize_obstacle=True,
        high_random_idx=0,
        save_camera_input=False,
        record=record,
        max_env_steps=int(max_env_steps),
        act_rot_repr="rot_6d",
        action_type="pos",
        ctrl_mode="diffik",
        ee_laser=False,
        april_tags=False,
        parts_poses_in_robot_frame=False,
        pos_scalar=1.0,
        rot_scalar=1.0,
        stiffness=1000.0,
        damping=200.0,
    )
    return FurnitureEnv(
        sim_env,
        task=task,
        act_steps=act_steps,
        cond_steps=cond_steps,
        max_episode_steps=max_episode_steps,
        sparse_reward=sparse_reward,
        terminate_on_success=terminate_on_success,
        sample_perturbations=sample_perturbations,
        return_torch=return_torch,
        max_nan_reset_attempts=max_nan_reset_attempts,
        env_args={"randomness": randomness},
        truncate_at_chunk_end=truncate_at_chunk_end,
    )


#: values of ``env_args["env_kwargs"]["simulator"]``: the real fork on Isaac Gym, or the CPU fake
SIMULATORS: Tuple[str, ...] = ("isaacgym", "fake")
# env_kwargs the converter records whose value this backend fixes (make_furniture_env builds exactly these)
_FIXED_ENV_KWARGS = {"act_rot_repr": "rot_6d", "action_type": "pos", "ctrl_mode": "diffik"}


def furniture_env_from_args(
    env_args: Dict[str, Any],
    num_envs: int,
    act_steps: int,
    cond_steps: int,
    device: Any = "cuda",
    max_episode_steps: Optional[int] = None,
    terminate_on_success: bool = False,
    return_torch: bool = False,
) -> "FurnitureEnv":
    """Build the FurnitureEnv a checkpoint's ``env_args`` (kind ``"furniture"``) describe.

    ``env_args["env_kwargs"]`` gives ``furniture`` (task, default ``one_leg``), ``randomness`` (default ``low``),
    ``max_episode_steps`` (the converter records the task default; ``max_episode_steps=`` here wins),
    optionally ``sparse_reward``, ``sample_perturbations``, ``max_env_steps`` (the fork's lamp bulb hold; None =
    the episode length) and ``truncate_at_chunk_end`` (DPPO's time-limit check after the chunk), and ``simulator``: ``"isaacgym"`` (the default:
    ankile's ``FurnitureRLSimEnv`` on the GPU ``device``, ``"cuda"`` when ``device`` is not a CUDA device) or
    ``"fake"`` (:class:`dpft.envs.furniture_fake.FakeFurnitureRLSimEnv` on the CPU, for dry runs and tests).
    ``act_rot_repr`` / ``action_type`` / ``ctrl_mode``, when recorded, must be the values this backend uses.

    Raises:
        DpftError: an unknown simulator (naming the key and the allowed values), a recorded action format this
            backend does not produce, or Isaac Gym / the fork missing (with install instructions).
    """
    kw = dict(env_args.get("env_kwargs") or {})
    sim = kw.get("simulator", "isaacgym")
    if sim is None:
        sim = "isaacgym"
    if not isinstance(sim, str) or sim.lower() not in SIMULATORS:
        raise DpftError("env_args['env_kwargs']['simulator']=%r is not known; expected one of %s ('isaacgym' = "
                        "ankile's FurnitureRLSimEnv on Isaac Gym, 'fake' = dpft.envs.furniture_fake on the CPU)."
                        % (sim, ", ".join(repr(s) for s in SIMULATORS)))
    for key, want in _FIXED_ENV_KWARGS.items():
        if key in kw and kw[key] is not None and kw[key] != want:
            raise DpftError("env_args['env_kwargs']['%s']=%r: the FurnitureBench backend drives FurnitureRLSimEnv "
                            "with %s=%r only (absolute 10-D actions); the checkpoint was trained for another "
                            "action format." % (key, kw[key], key, want))
    if max_episode_steps is None and kw.get("max_episode_steps") is not None:
        max_episode_steps = int(kw["max_episode_steps"])
    options = dict(task=kw.get("furniture", "one_leg"), randomness=kw.get("randomness", "low"),
                   num_envs=int(num_envs), act_steps=int(act_steps), cond_steps=int(cond_steps),
                   max_episode_steps=max_episode_steps, terminate_on_success=bool(terminate_on_success),
                   sparse_reward=bool(kw.get("sparse_reward", True)),
                   sample_perturbations=bool(kw.get("sample_perturbations", False)), return_torch=bool(return_torch),
                   max_env_steps=None if kw.get("max_env_steps") is None else int(kw["max_env_steps"]),
                   truncate_at_chunk_end=bool(kw.get("truncate_at_chunk_end", False)))
    if sim.lower() == "fake":
        from dpft.envs.furniture_fake import FakeFurnitureRLSimEnv

        env = make_furniture_env(device="cpu", env_cls=FakeFurnitureRLSimEnv, **options)
    else:
        dev = torch.device(device) if device is not None else torch.device("cuda")
        env = make_furniture_env(device=str(dev) if dev.type == "cuda" else "cuda", **options)
    env.env_args["env_kwargs"]["simulator"] = sim.lower()
    return env


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise DpftError("%s=%r: expected a positive integer." % (name, value))


class FurnitureEnv(BatchedEnv):
    """A constructed ``FurnitureRLSimEnv`` (real or fake) as a :class:`~dpft.envs.base.BatchedEnv`.

    See the module docstring for observation, action, reward, reset and NaN semantics.

    Attributes:
        num_envs, cond_steps (To), act_steps, max_episode_steps, action_dim (10).
        obs_keys: ``("robot_state", "parts_poses")``; obs_shapes ``{"robot_state": (16,),
            "parts_poses": (P,)}``; obs_dtypes float32.
        nan_resets_total: episodes cut by non-finite observations since construction.
    """

    def __init__(
        self,
        sim_env: Any,
        task: str,
        act_steps: int = 8,
        cond_steps: int = 1,
        max_episode_steps: Optional[int] = None,
        sparse_reward: bool = True,
        terminate_on_success: bool = False,
        sample_perturbations: bool = False,
        return_torch: bool = False,
        max_nan_reset_attempts: int = 3,
        env_args: Optional[Dict[str, Any]] = None,
        truncate_at_chunk_end: bool = False,
    ) -> None:
        spec = _resolve_task(task)
        if max_episode_steps is None:
            max_episode_steps = spec.max_episode_steps
        _check_positive_int("act_steps", act_steps)
        _check_positive_int("cond_steps", cond_steps)
        _check_positive_int("max_episode_steps", max_episode_steps)
        if isinstance(max_nan_reset_attempts, bool) or int(max_nan_reset_attempts) < 0:
            raise DpftError("max_nan_reset_attempts=%r: expected an integer >= 0." % (max_nan_reset_attempts,))
        self.sim_env = sim_env
        self.task = task
        self.spec = spec
        self.num_envs = int(sim_env.num_envs)
        self.device = torch.device(getattr(sim_env, "device", "cpu"))
        self.act_steps = int(act_steps)
        self.cond_steps = int(cond_steps)
        self.max_episode_steps = int(max_episode_steps)
        self.sparse_reward = bool(sparse_reward)
        self.terminate_on_success = bool(terminate_on_success)
        self.truncate_at_chunk_end = bool(truncate_at_chunk_end)
        self.sample_perturbations = bool(sample_perturbations)
        self.return_torch = bool(return_torch)
        self.max_nan_reset_attempts = int(max_nan_reset_attempts)
        self.obs_keys: List[str] = list(OBS_KEYS)
        self.obs_shapes: Dict[str, Tuple[int, ...]] = {
            "robot_state": (ROBOT_STATE_DIM,),
            "parts_poses": (spec.parts_poses_dim,),
        }
        self.obs_dtypes: Dict[str, Any] = {k: np.float32 for k in self.obs_keys}
        self.action_dim = ACTION_DIM
        self.env_args: Dict[str, Any] = {
            "env_name": "FurnitureRLSim-%s" % task,
            "type": "furniture",
            "env_kwargs": dict({"furniture": task}, **(env_args or {})),
        }
        self.nan_resets_total = 0
        self.nan_unrecovered_total = 0
        n = self.num_envs
        self._hist: Dict[str, torch.Tensor] = {
            k: torch.zeros((n, self.cond_steps) + self.obs_shapes[k], device=self.device) for k in self.obs_keys
        }
        self._ep_steps = torch.zeros(n, dtype=torch.long, device=self.device)
        self._ep_return = torch.zeros(n, dtype=torch.float32, device=self.device)
        self._ep_pairs = torch.zeros(n, dtype=torch.float32, device=self.device)  # sparse events so far
        self._ep_success = torch.zeros(n, dtype=torch.bool, device=self.device)
        self._ready = False

    # ------------------------------------------------------------------ observation processing
    def _process(self, raw: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """The fork's obs dict -> ``{"robot_state": (N, 16), "parts_poses": (N, P)}`` float32 on device."""
        if not isinstance(raw, dict) or "robot_state" not in raw or "parts_poses" not in raw:
            keys = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
            raise DpftError(
                "FurnitureSim returned an observation with keys %s; expected 'robot_state' and 'parts_poses' "
                "(obs_keys=DEFAULT_STATE_OBS)." % (keys,)
            )
        robot = robot_state_to_16d(raw["robot_state"]).to(self.device)
        parts = torch.as_tensor(raw["parts_poses"]).to(self.device).float()
        n = self.num_envs
        if robot.shape != (n, ROBOT_STATE_DIM):
            raise DpftError("FurnitureSim robot_state has %d rows; expected one per env (num_envs=%d)."
                            % (robot.shape[0], n))
        if parts.shape != (n, self.spec.parts_poses_dim):
            raise DpftError(
                "FurnitureSim parts_poses for task %r has shape %s; expected (%d, %d) = (num_envs, (%d parts + 1 "
                "obstacle) * 7). An older furniture-bench without the obstacle pose gives %d: install ankile's "
                "fork (%s)." % (self.task, tuple(parts.shape), n, self.spec.parts_poses_dim,
                                self.spec.num_parts, self.spec.num_parts * 7, _FORK_URL)
            )
        return {"robot_state": robot, "parts_poses": parts}

    @staticmethod
    def _nonfinite(obs: Dict[str, torch.Tensor]) -> torch.Tensor:
        bad = None
        for value in obs.values():
            b = ~torch.isfinite(value).all(dim=-1)
            bad = b if bad is None else bad | b
        return bad

    def _reset_rows(self, idx: torch.Tensor) -> Tuple[Dict[str, torch.Tensor], int, int]:
        """Reset envs ``idx`` (long, on device); retry NaN ones; return (obs of all envs, retries, unrecovered)."""
        raw = self.sim_env.reset(idx.to(torch.int32))
        self._open_gripper_command(idx)
        obs = self._process(raw)
        retries = 0
        for _ in range(self.max_nan_reset_attempts):
            bad_rows = idx[self._nonfinite(obs)[idx]]
            if bad_rows.numel() == 0:
                break
            retries += int(bad_rows.numel())
            obs = self._process(self.sim_env.reset(bad_rows.to(torch.int32)))
        bad = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
        bad[idx] = self._nonfinite(obs)[idx]
        unrecovered = int(bad.sum())
        if unrecovered:
            warnings.warn(
                "FurnitureSim: %d env(s) still had non-finite observations after %d reset attempt(s); their "
                "non-finite values were replaced by 0." % (unrecovered, self.max_nan_reset_attempts + 1)
            )
            for key in obs:
                obs[key] = torch.where(bad[:, None], torch.nan_to_num(obs[key], nan=0.0, posinf=0.0, neginf=0.0),
                                       obs[key])
        return obs, retries, unrecovered

    def _open_gripper_command(self, idx: Optional[torch.Tensor]) -> None:
        """The fork's reset opens the gripper but keeps its remembered command ``last_grasp`` (stored by every
        ``step``; ``reset`` leaves it alone), so the first step of a new episode with ``|grasp| <= grasp_margin`` would re-close it
        as the previous episode left it. Every episode starts with the "open" command (-1, the fork's initial
        value) instead: an episode's dynamics then depend only on its own reset and actions (exact resume)."""
        last = getattr(self.sim_env, "last_grasp", None)
        if isinstance(last, torch.Tensor):
            if idx is None:
                last.fill_(-1.0)
            else:
                last[idx.to(last.device).long()] = -1.0

    def _out(self, x: torch.Tensor) -> Any:
        return x if self.return_torch else x.detach().cpu().numpy()

    def _out_obs(self, hist: Dict[str, torch.Tensor]) -> Dict[str, Any]:
        return {k: self._out(v.clone()) for k, v in hist.items()}

    # ------------------------------------------------------------------ BatchedEnv API
    def reset(self, seeds: Optional[List[int]] = None) -> Dict[str, Any]:
        """Reset every env; return raw observation histories ``{key: (N, To, D)}`` (first obs repeated).

        Args:
            seeds: optional list of ``num_envs`` ints; FurnitureSim randomizes all envs from torch's global
                generator, so ``seeds[0]`` seeds torch and numpy globally (per-env seeds are impossible).
        """
        if self.sim_env is None:
            raise DpftError("FurnitureEnv.reset() was called after close().")
        if seeds is not None:
            seeds = list(seeds)
            if len(seeds) != self.num_envs:
                raise DpftError("reset(seeds=...) got %d seeds for %d envs." % (len(seeds), self.num_envs))
            torch.manual_seed(int(seeds[0]))
            np.random.seed(int(seeds[0]) % (2 ** 32))
        raw = self.sim_env.reset()
        self._open_gripper_command(None)
        obs = self._process(raw)
        nan_rows = torch.nonzero(self._nonfinite(obs)).flatten()
        if nan_rows.numel():
            self.nan_resets_total += int(nan_rows.numel())
            obs, _, unrecovered = self._reset_rows(nan_rows)
            self.nan_unrecovered_total += unrecovered
        for key in self.obs_keys:
            self._hist[key] = obs[key][:, None].repeat(1, self.cond_steps, 1)
        self._ep_steps.zero_()
        self._ep_return.zero_()
        self._ep_pairs.zero_()
        self._ep_success.zero_()
        self._ready = True
        return self._out_obs(self._hist)

    def step(self, action_chunk: Any) -> StepResult:
        """Execute ``action_chunk`` ``(N, act_steps, 10)`` raw absolute-pose actions; auto-reset ended envs.

        Returns:
            :class:`~dpft.envs.base.StepResult` (numpy, or torch when ``return_torch``). ``info`` (numpy and
            Python values, the keys :class:`dpft.envs.vector.VectorEnv` uses): ``steps`` (N,) env steps counted
            in this chunk; ``nan_resets`` and ``failed`` (N,) bool, the episode was cut by a non-finite
            observation; ``fail_reason`` list of str/None; ``episode_return`` (N,) float64 and
            ``episode_length`` (N,) int64 of episodes that ended (NaN / -1 elsewhere); ``episodes``: one
            dict per ended episode (``env, seed (None), return, length, success, terminated, truncated,
            failed, reason``); ``nan_resets_total`` (cumulative int), ``nan_reset_retries`` and
            ``nan_unrecovered`` (ints, this chunk).
        """
        if self.sim_env is None:
            raise DpftError("FurnitureEnv.step() was called after close().")
        if not self._ready:
            raise DpftError("FurnitureEnv.step() was called before reset().")
        n, ta = self.num_envs, self.act_steps
        actions = torch.as_tensor(action_chunk).to(self.device).float()
        if actions.shape != (n, ta, ACTION_DIM):
            raise DpftError(
                "FurnitureEnv.step expected an action chunk of shape (num_envs=%d, act_steps=%d, %d) "
                "[pos 3, rot6d 6, gripper 1]; got %s." % (n, ta, ACTION_DIM, tuple(actions.shape))
            )
        if not torch.isfinite(actions).all():
            rows = torch.nonzero(~torch.isfinite(actions).reshape(n, -1).all(dim=1)).flatten().tolist()
            raise DpftError("FurnitureEnv.step got non-finite actions for env(s) %s; the policy output is broken."
                            % rows)

        dev = self.device
        active = torch.ones(n, dtype=torch.bool, device=dev)
        terminated = torch.zeros(n, dtype=torch.bool, device=dev)
        truncated = torch.zeros(n, dtype=torch.bool, device=dev)
        nan_cut = torch.zeros(n, dtype=torch.bool, device=dev)
        reward = torch.zeros(n, dtype=torch.float32, device=dev)
        steps = torch.zeros(n, dtype=torch.long, device=dev)
        for i in range(ta):
            if self.sample_perturbations:
                raw, r, done, _ = self.sim_env.step(actions[:, i], sample_perturbations=True)
            else:
                raw, r, done, _ = self.sim_env.step(actions[:, i])
            obs = self._process(raw)
            r = torch.as_tensor(r).to(dev).float().reshape(n)
            done = torch.as_tensor(done).to(dev).bool().reshape(n)
            bad = self._nonfinite(obs) | ~torch.isfinite(r)
            ok = active & ~bad
            newly_nan = active & bad
            r = torch.where(ok, r, torch.zeros_like(r))
            self._ep_pairs += r
            step_r = r if self.sparse_reward else self._ep_pairs
            reward += torch.where(ok, step_r, torch.zeros_like(step_r))
            steps += active.long()
            self._ep_steps += active.long()
            for key in self.obs_keys:  # append to the history of envs still in their episode
                rolled = torch.cat([self._hist[key][:, 1:], obs[key][:, None]], dim=1)
                self._hist[key] = torch.where(ok[:, None, None], rolled, self._hist[key])
            self._ep_success |= ok & done
            end_term = ok & done & self.terminate_on_success
            at_limit = self._ep_steps >= self.max_episode_steps
            if self.truncate_at_chunk_end and i < ta - 1:
                at_limit = torch.zeros_like(at_limit)  # DPPO: the limit is checked after the chunk
            end_trunc = ok & ~end_term & at_limit
            nan_cut |= newly_nan
            terminated |= end_term
            truncated |= end_trunc | newly_nan
            active &= ~(end_term | end_trunc | newly_nan)
            if not bool(active.any()):
                break  # every episode ended: the rest of the chunk would be ignored anyway

        self._ep_success &= ~nan_cut
        self._ep_return += reward
        ended = ~active
        success = self._ep_success.clone()
        final_hist = {k: v.clone() for k, v in self._hist.items()}
        n_nan = int(nan_cut.sum())
        self.nan_resets_total += n_nan
        ended_np = ended.cpu().numpy()
        episode_return = np.where(ended_np, self._ep_return.cpu().numpy().astype(np.float64), np.nan)
        episode_length = np.where(ended_np, self._ep_steps.cpu().numpy(), -1).astype(np.int64)
        nan_np = nan_cut.cpu().numpy()
        term_np, trunc_np, success_np = terminated.cpu().numpy(), truncated.cpu().numpy(), success.cpu().numpy()
        fail_reason: List[Optional[str]] = [None] * n
        episodes: List[Dict[str, Any]] = []
        for i in np.flatnonzero(ended_np):
            if nan_np[i]:
                fail_reason[i] = ("env %d returned a non-finite observation at env step %d of its episode"
                                  % (i, int(episode_length[i])))
            episodes.append({
                "env": int(i), "seed": None, "return": float(episode_return[i]), "length": int(episode_length[i]),
                "success": bool(success_np[i]), "terminated": bool(term_np[i]), "truncated": bool(trunc_np[i]),
                "failed": bool(nan_np[i]), "reason": fail_reason[i],
            })
        retries = unrecovered = 0
        if bool(ended.any()):
            idx = torch.nonzero(ended).flatten()
            post, retries, unrecovered = self._reset_rows(idx)
            self.nan_unrecovered_total += unrecovered
            finite = ~self._nonfinite(post)
            for key in self.obs_keys:
                fresh = post[key][:, None].repeat(1, self.cond_steps, 1)
                # running envs: their latest entry becomes the post-refresh state (see module docstring)
                latest = torch.cat([self._hist[key][:, :-1], post[key][:, None]], dim=1)
                running = active & finite
                hist = torch.where(ended[:, None, None], fresh, self._hist[key])
                self._hist[key] = torch.where(running[:, None, None], latest, hist)
            self._ep_steps[ended] = 0
            self._ep_return[ended] = 0.0
            self._ep_pairs[ended] = 0.0
            self._ep_success[ended] = False
        final_obs = {k: torch.where(ended[:, None, None], final_hist[k], self._hist[k]) for k in self.obs_keys}
        info: Dict[str, Any] = {
            "steps": steps.cpu().numpy(),
            "failed": nan_np.copy(),
            "fail_reason": fail_reason,
            "nan_resets": nan_np.copy(),
            "episode_return": episode_return,
            "episode_length": episode_length,
            "episodes": episodes,
            "nan_resets_total": self.nan_resets_total,
            "nan_reset_retries": retries,
            "nan_unrecovered": unrecovered,
        }
        return StepResult(
            obs=self._out_obs(self._hist),
            reward=self._out(reward),
            terminated=self._out(terminated),
            truncated=self._out(truncated),
            success=self._out(success),
            final_obs={k: self._out(v) for k, v in final_obs.items()},
            info=info,
        )

    def close(self) -> None:
        """Drop the simulator (the fork destroys the Isaac Gym sim in its ``__del__``)."""
        self.sim_env = None
        self._ready = False
