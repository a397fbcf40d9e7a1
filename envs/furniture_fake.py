"""A CPU stand-in for ankile's ``FurnitureRLSimEnv`` (no Isaac Gym): same constructor, same output types.

Use it to dry-run FurnitureBench configs and in tests::

    from dpft.envs.furniture import make_furniture_env
    from dpft.envs.furniture_fake import FakeFurnitureRLSimEnv
    env = make_furniture_env("one_leg", num_envs=4, device="cpu", env_cls=FakeFurnitureRLSimEnv)

What matches the fork (ankile/furniture-bench 52e7c68, ``furniture_bench/envs/furniture_rl_sim_env.py``):

* constructor: ``FurnitureRLSimEnv.__init__(self, randomness, randomize_obstacle=True, *args, **kwargs)``
  (L1692) forwarding to ``FurnitureSimEnv.__init__`` (L54-81: ``furniture, num_envs=1, resize_img=True,
  obs_keys=None, ..., act_rot_repr="rot_6d", action_type="delta", ctrl_mode="diffik", ee_laser=False,
  april_tags=False, parts_poses_in_robot_frame=False, **kwargs``) plus the four names it reads from
  ``**kwargs`` (L116-119: ``pos_scalar``, ``rot_scalar``, ``stiffness``, ``damping``). The same checks:
  ``ctrl_mode == "diffik"`` (AssertionError, L112-114), ``act_rot_repr`` in quat/axis/rot_6d (ValueError,
  L245), randomness low/med/high (ValueError, L1713 and ``initialization_mode.str_to_enum``), known
  furniture (ValueError, ``furniture_factory``).
* ``reset(env_idxs=None)`` (L1920): resets the given envs (``torch.int32`` indices; all when None), then
  calls ``refresh()`` (L1947: one ``simulate()`` call of 1/60 s) on *every* env, so envs that were not reset
  move on by 1/6 of an env step (``lamp``: eleven calls, L1936-1947); returns the observation of *all* envs.
* ``step(action, sample_perturbations=False)`` (L2044) -> ``(obs, reward, done, info)``: ``action``
  ``(num_envs, 10)`` for rot_6d (8 quat, 7 axis; L2046-2052), clamped to [-1, 1] (L912); ``reward``
  float32 ``(num_envs, 1)`` = 1.0 where any pair became assembled on this step (``_reward`` L1972-2034);
  ``done`` bool ``(num_envs, 1)`` = all pairs assembled (``_done`` L2036-2042; zeros with manual_done);
  ``info == {"obs_success": True, "action_success": True}`` (L2075); ``env_steps`` (int32, ``(N,)``) is
  incremented after the reward (L2063). Episodes never time out inside the env.
* observations (``get_observation`` L1307-1334, ``_read_robot_state`` L1173-1199): ``robot_state`` is a
  dict ``{key: (N, dim)}`` in ``obs_keys`` order, or one ``(N, sum dims)`` tensor when
  ``concat_robot_state`` (14 for DEFAULT_STATE_OBS); ``ee_quat`` xyzw with a non-negative real part;
  ``gripper_width`` ``(N, 1)``; ``parts_poses`` ``(N, (num_parts + 1) * 7)``: every part's
  ``[pos 3, quat xyzw 4]`` then the front obstacle's. All float32 torch tensors.
* the gripper command logic of ``simulate_step`` (L946-958): the sign of ``action[:, -1]`` toggles
  open (< 0) / closed (> 0) only when it changed and ``|grasp| > grasp_margin = 0.019``; ``last_grasp`` is
  stored on every step (L957), so a sign change with ``|grasp| <= 0.019`` does not toggle on its own step
  but is the remembered command on the next one (a second small command of that sign then acts). ``reset``
  leaves ``last_grasp`` alone.

What is fake (deliberately cheap and deterministic):

* device: CPU always (the real env uses ``cuda:<compute_device_id>``);
* dynamics: the end effector moves half-way to the commanded pose each step (position linearly,
  orientation by normalized quaternion interpolation); velocities are finite differences at 10 Hz; a
  ``refresh()`` (inside ``reset``) moves every end effector 1/6 of that way towards its last commanded
  position (a reset env's command is its reset pose), velocities unchanged;
* assembly: pair ``(a, b)`` becomes assembled when the end effector comes within
  :data:`REACH_THRESHOLD` of part ``b``'s position; part ``b`` then snaps onto part ``a`` (+ 3 cm in z);
* frames: parts and end effector share one frame (the fork reports parts in the AprilTag frame); the
  obstacle starts at the fork's nominal AprilTag-frame pose (``OBSTACLE_FRONT_NOMINAL_POSE``) plus the offset;
* no cameras: image observation keys and ``record=True`` raise ValueError;
* stricter observation keys: an unknown key raises ValueError at construction; the fork does not call
  ``observation_space`` in ``__init__`` and its ``get_observation`` ignores unknown keys;
* unknown constructor keywords raise TypeError (the real env silently swallows them through
  ``**kwargs``, e.g. DPPO's ``gpu_id=`` and ``observation_space=``; the fake catches misspellings);
* ``action_type`` is validated at construction (the real env would fail later, inside ``step``);
* randomization draws from torch's global generator like the fork, so ``torch.manual_seed`` reproduces it.

NaN faults: :meth:`FakeFurnitureRLSimEnv.inject_nan` corrupts chosen envs' state at a chosen step; the
corruption sticks (like a blown-up PhysX state) until that env has been reset ``resets_to_clear`` times.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from dpft.envs.furniture import DEFAULT_STATE_OBS, OBSTACLE_FRONT_NOMINAL_POSE, TASKS
from dpft.envs.rotation import (
    axis_angle_to_quat_xyzw,
    quat_conjugate,
    quat_multiply,
    quat_xyzw_to_axis_angle,
    rot6d_to_quat_xyzw,
    standardize_quat_xyzw,
)

__all__ = ["FakeFurnitureRLSimEnv", "REACH_THRESHOLD", "MAX_GRIPPER_WIDTH", "FORK_ROBOT_STATE_DIMS"]

REACH_THRESHOLD = 0.02  # m: end effector to part distance that assembles a pair in the fake
ASSEMBLED_OFFSET = (0.0, 0.0, 0.03)
HZ = 10.0  # config["robot"]["hz"]
TRACKING_GAIN = 0.5
GRASP_MARGIN = 0.02 - 0.001  # furniture_rl_sim_env.py L191
# config.py config["robot"]["max_gripper_width"]
MAX_GRIPPER_WIDTH = {
    "square_table": 0.065, "one_leg": 0.065, "round_table": 0.065, "lamp": 0.07, "mug_rack": 0.07,
    "factory_peg_hole": 0.07, "factory_nut_bolt": 0.07,
}
# furniture_bench/robot/robot_state.py ROBOT_STATE_DIMS
FORK_ROBOT_STATE_DIMS = {
    "ee_pos": 3, "ee_quat": 4, "ee_pos_vel": 3, "ee_ori_vel": 3, "joint_positions": 7,
    "joint_velocities": 7, "joint_torques": 7, "gripper_width": 1, "gripper_finger_1_pos": 1,
    "gripper_finger_2_pos": 1,
}
# FurnitureRLSimEnv.__init__ L1697-1713 (force, torque, obstacle offset); the fake uses the obstacle offset
# and scales its part-position noise and perturbations with the force.
_RANDOMNESS = {"low": (0.2, 0.007, 0.02), "med": (0.5, 0.01, 0.04), "high": (0.75, 0.015, 0.06)}
_PART_POS_NOISE = {"low": 0.015, "med": 0.03, "high": 0.045}
_EE_HOME = (0.45, 0.0, 0.25)
_EE_HOME_QUAT = (1.0, 0.0, 0.0, 0.0)  # xyzw: gripper pointing down (pi about x)
_OBSTACLE_HOME = OBSTACLE_FRONT_NOMINAL_POSE  # the fork's nominal pose in the AprilTag frame (before the offset)


def _base_env_arguments(
    furniture: str,
    num_envs: int = 1,
    resize_img: bool = True,
    obs_keys: Optional[List[str]] = None,
    concat_robot_state: bool = False,
    manual_label: bool = False,
    manual_done: bool = False,
    headless: bool = False,
    compute_device_id: int = 0,
    graphics_device_id: int = 0,
    init_assembled: bool = False,
    np_step_out: bool = False,
    channel_first: bool = False,
    randomness: Any = "low",
    high_random_idx: int = 0,
    save_camera_input: bool = False,
    record: bool = False,
    max_env_steps: int = 3000,
    act_rot_repr: str = "rot_6d",
    action_type: str = "delta",
    ctrl_mode: str = "diffik",
    ee_laser: bool = False,
    april_tags: bool = False,
    parts_poses_in_robot_frame: bool = False,
    pos_scalar: float = 1.0,
    rot_scalar: float = 1.0,
    stiffness: float = 1000.0,
    damping: float = 200.0,
) -> Dict[str, Any]:
    """``FurnitureSimEnv.__init__``'s parameters (fork L54-81) and the kwargs it reads (L116-119)."""
    return dict(locals())


_KNOWN_KWARGS = tuple(_base_env_arguments.__code__.co_varnames[: _base_env_arguments.__code__.co_argcount])


class FakeFurnitureRLSimEnv:
    """CPU fake of ``FurnitureRLSimEnv`` (see the module docstring for what matches and what is fake)."""

    def __init__(self, randomness: Any, randomize_obstacle: bool = True, *args: Any, **kwargs: Any) -> None:
        unknown = sorted(k for k in kwargs if k not in _KNOWN_KWARGS)
        if unknown:
            raise TypeError(
                "FakeFurnitureRLSimEnv got unknown keyword argument(s) %s. The real FurnitureRLSimEnv "
                "accepts %s and silently ignores anything else through **kwargs; the fake rejects them so a "
                "misspelled option is caught." % (unknown, ", ".join(_KNOWN_KWARGS))
            )
        a = _base_env_arguments(*args, **kwargs)
        if a["ctrl_mode"] != "diffik":
            raise AssertionError("Only 'diffik' controller is supported for now (parallization).")
        if a["furniture"] not in TASKS:
            raise ValueError("Unknown furniture type: %s" % (a["furniture"],))
        if a["act_rot_repr"] not in ("quat", "axis", "rot_6d"):
            raise ValueError("Invalid rotation representation: %s" % (a["act_rot_repr"],))
        if a["action_type"] not in ("delta", "pos"):
            raise ValueError("Invalid action type: %s (expected 'delta' or 'pos')" % (a["action_type"],))
        randomness = getattr(randomness, "name", randomness)
        randomness = {"LOW": "low", "MEDIUM": "med", "HIGH": "high"}.get(randomness, randomness)
        if randomness not in _RANDOMNESS:
            if randomness in ("med_collect", "high_collect", "skill_fixed", "skill_random"):
                raise ValueError("Invalid randomness level")
            raise ValueError("Unknown initialization mode: %s" % (randomness,))
        obs_keys = list(a["obs_keys"]) if a["obs_keys"] is not None else [
            "robot_state/ee_pos", "robot_state/ee_quat", "robot_state/ee_pos_vel", "robot_state/ee_ori_vel",
            "robot_state/gripper_width", "color_image1", "color_image2",
        ]  # DEFAULT_VISUAL_OBS
        if a["record"]:
            raise ValueError("FakeFurnitureRLSimEnv renders no cameras: record=True is not supported.")
        for key in obs_keys:
            if key.startswith("robot_state/"):
                if key.split("/", 1)[1] not in FORK_ROBOT_STATE_DIMS:
                    raise ValueError("FurnitureSim does not support observation (%s)." % key)
            elif key.startswith("color") or key.startswith("depth"):
                raise ValueError(
                    "FakeFurnitureRLSimEnv renders no cameras: observation %r is not available (use "
                    "obs_keys=DEFAULT_STATE_OBS = %s)." % (key, list(DEFAULT_STATE_OBS))
                )
            elif key != "parts_poses":
                raise ValueError("FurnitureSim does not support observation (%s)." % key)

        self.device = torch.device("cpu")
        self.furniture_name = a["furniture"]
        self.task_name = a["furniture"]
        self.num_envs = int(a["num_envs"])
        self.obs_keys = obs_keys
        self.robot_state_keys = [k.split("/")[1] for k in obs_keys if k.startswith("robot_state")]
        self.include_parts_poses = "parts_poses" in obs_keys
        self.concat_robot_state = bool(a["concat_robot_state"])
        self.manual_done = bool(a["manual_done"])
        self.headless = bool(a["headless"])
        self.max_env_steps = int(a["max_env_steps"])
        self.act_rot_repr = a["act_rot_repr"]
        self.action_type = a["action_type"]
        self.ctrl_mode = a["ctrl_mode"]
        self.pos_scalar = a["pos_scalar"]
        self.rot_scalar = a["rot_scalar"]
        self.stiffness = a["stiffness"]
        self.damping = a["damping"]
        self.randomness = randomness
        self.constructor_kwargs = dict(a, randomness=randomness, randomize_obstacle=randomize_obstacle)
        force, torque, obstacle = _RANDOMNESS[randomness]
        self.max_force_magnitude = force
        self.max_torque_magnitude = torque
        self.max_obstacle_offset = obstacle * int(bool(randomize_obstacle))
        self.pose_dim = 7
        spec = TASKS[self.furniture_name]
        self.num_parts = spec.num_parts
        self.pairs_to_assemble = list(spec.pairs)
        self.max_gripper_width = MAX_GRIPPER_WIDTH[self.furniture_name]
        self.grasp_margin = GRASP_MARGIN
        n, p = self.num_envs, self.num_parts
        self.env_steps = torch.zeros(n, dtype=torch.int32)
        self.already_assembled = torch.zeros((n, len(self.pairs_to_assemble)), dtype=torch.bool)
        self.last_grasp = torch.full((n,), -1.0)
        self.ee_pos = torch.tensor(_EE_HOME).repeat(n, 1)
        self.ee_quat = torch.tensor(_EE_HOME_QUAT).repeat(n, 1)
        self.ee_pos_vel = torch.zeros(n, 3)
        self.ee_ori_vel = torch.zeros(n, 3)
        self.gripper = torch.full((n, 1), self.max_gripper_width)
        self.parts_home = torch.tensor(
            [[0.5 + 0.08 * (j % 3), -0.12 + 0.12 * (j // 3), 0.02] for j in range(p)], dtype=torch.float32
        )
        self.parts_pos = self.parts_home.repeat(n, 1, 1)
        self.parts_quat = torch.tensor([0.0, 0.0, 0.0, 1.0]).repeat(n, p, 1)
        self.obstacle_pose = torch.tensor(_OBSTACLE_HOME).repeat(n, 1)
        self.goal_pos = self.ee_pos.clone()  # the last commanded position (refresh() keeps moving towards it)
        self.refresh_calls = 0  # refresh() calls since construction (each one simulate() in the fork)
        self.total_steps = 0  # step() calls since construction
        self._nan_schedule: Dict[int, List[Tuple[int, int]]] = {}
        self._nan_resets_left = torch.zeros(n, dtype=torch.long)  # > 0: state is corrupted (NaN)

    # ------------------------------------------------------------------ fork-like properties
    @property
    def n_parts_assemble(self) -> int:
        return len(self.pairs_to_assemble)

    @property
    def action_dimension(self) -> int:
        return {"quat": 8, "rot_6d": 10, "axis": 7}[self.act_rot_repr]

    def increment_randomness(self) -> None:
        """The fork's curriculum step (L1957-1970): larger perturbation forces, capped."""
        self.max_force_magnitude = min(self.max_force_magnitude + 0.01, 1.0)
        self.max_torque_magnitude = min(self.max_torque_magnitude + 0.0005, 0.05)

    # ------------------------------------------------------------------ fault injection
    def inject_nan(self, env_idxs: Sequence[int], at_step: int, resets_to_clear: int = 1) -> None:
        """Corrupt envs ``env_idxs`` with NaN at the ``at_step``-th call of :meth:`step` (1-based, counted
        since construction); the observation that call returns is already NaN, and each corrupted env
        stays NaN until it has been reset ``resets_to_clear`` times (>= 1)."""
        if int(resets_to_clear) < 1:
            raise ValueError("resets_to_clear must be >= 1")
        for i in env_idxs:
            if not 0 <= int(i) < self.num_envs:
                raise ValueError("env index %d out of range for %d envs" % (int(i), self.num_envs))
        self._nan_schedule.setdefault(int(at_step), []).extend((int(i), int(resets_to_clear)) for i in env_idxs)

    # ------------------------------------------------------------------ observation
    def _robot_state_dict(self) -> Dict[str, torch.Tensor]:
        n = self.num_envs
        quat = standardize_quat_xyzw(self.ee_quat.clone())
        half = self.gripper / 2
        values = {
            "ee_pos": self.ee_pos.clone(),
            "ee_quat": quat,
            "ee_pos_vel": self.ee_pos_vel.clone(),
            "ee_ori_vel": self.ee_ori_vel.clone(),
            "gripper_width": self.gripper.clone(),
            "joint_positions": torch.zeros(n, 7),
            "joint_velocities": torch.zeros(n, 7),
            "joint_torques": torch.zeros(n, 7),
            "gripper_finger_1_pos": half.clone(),
            "gripper_finger_2_pos": half.clone(),
        }
        return {k: values[k] for k in self.robot_state_keys}

    def get_observation(self) -> Dict[str, Any]:
        obs: Dict[str, Any] = {}
        robot_state = self._robot_state_dict()
        if self.concat_robot_state:
            obs["robot_state"] = torch.cat(list(robot_state.values()), dim=-1)
        else:
            obs["robot_state"] = robot_state
        if self.include_parts_poses:
            parts = torch.cat([self.parts_pos, self.parts_quat], dim=-1).reshape(self.num_envs, -1)
            obs["parts_poses"] = torch.cat([parts, self.obstacle_pose], dim=1)
        return obs

    def _apply_nan(self, rows: torch.Tensor) -> None:
        nan = float("nan")
        self.ee_pos[rows] = nan
        self.ee_pos_vel[rows] = nan
        self.parts_pos[rows] = nan

    # ------------------------------------------------------------------ reset / step
    def reset(self, env_idxs: Optional[torch.Tensor] = None) -> Dict[str, Any]:
        if env_idxs is None:
            env_idxs = torch.arange(self.num_envs, dtype=torch.int32)
        assert env_idxs.numel() > 0
        idx = env_idxs.long().flatten()
        k = idx.numel()
        self.already_assembled[idx] = False
        self.env_steps[idx] = 0
        noise = _PART_POS_NOISE[self.randomness]
        self.ee_pos[idx] = torch.tensor(_EE_HOME) + (torch.rand(k, 3) * 2 - 1) * 0.01
        self.ee_quat[idx] = torch.tensor(_EE_HOME_QUAT)
        self.ee_pos_vel[idx] = 0.0
        self.ee_ori_vel[idx] = 0.0
        self.gripper[idx] = self.max_gripper_width
        offsets = (torch.rand(k, self.num_parts, 3) * 2 - 1) * noise
        offsets[..., 2] = 0.0
        self.parts_pos[idx] = self.parts_home + offsets
        self.parts_quat[idx] = torch.tensor([0.0, 0.0, 0.0, 1.0])
        obstacle = torch.tensor(_OBSTACLE_HOME).repeat(k, 1)
        obstacle_offsets = (torch.rand(k, 3) * 2 - 1) * self.max_obstacle_offset
        obstacle[:, :2] += obstacle_offsets[:, :2]
        self.obstacle_pose[idx] = obstacle
        self.goal_pos[idx] = self.ee_pos[idx]
        corrupted = idx[self._nan_resets_left[idx] > 0]
        if corrupted.numel():
            self._nan_resets_left[corrupted] -= 1
            still = corrupted[self._nan_resets_left[corrupted] > 0]
            if still.numel():
                self._apply_nan(still)
        for _ in range(11 if self.furniture_name == "lamp" else 1):  # the fork: 10 lamp refreshes, then one
            self.refresh()
        return self.get_observation()

    def refresh(self) -> None:
        """The fork's ``refresh()``: one ``simulate()`` call (1/60 s) for every env; here each end effector moves
        ``TRACKING_GAIN / 6`` of the way to its last commanded position (1/6 of a fake env step)."""
        self.ee_pos = self.ee_pos + (TRACKING_GAIN / 6.0) * (self.goal_pos - self.ee_pos)
        self.refresh_calls += 1

    def _decode_goal_quat(self, action: torch.Tensor) -> torch.Tensor:
        if self.act_rot_repr == "quat":
            return action[:, 3:7]
        if self.act_rot_repr == "rot_6d":
            return rot6d_to_quat_xyzw(action[:, 3:9])
        return axis_angle_to_quat_xyzw(action[:, 3:6])

    @torch.no_grad()
    def step(self, action: torch.Tensor, sample_perturbations: bool = False):
        action = torch.as_tensor(action, dtype=torch.float32)
        if action.shape != (self.num_envs, self.action_dimension):
            raise ValueError(
                "action must have shape (%d, %d), got %s" % (self.num_envs, self.action_dimension, tuple(action.shape))
            )
        action = torch.clamp(action, -1.0, 1.0)
        action_quat = self._decode_goal_quat(action)
        if self.action_type == "delta":
            goal_pos = self.ee_pos + action[:, :3]
            goal_quat = quat_multiply(self.ee_quat, action_quat)
        else:
            goal_pos = action[:, :3]
            goal_quat = action_quat
        goal_quat = goal_quat / goal_quat.norm(dim=-1, keepdim=True)

        self.goal_pos = goal_pos.clone()
        old_pos, old_quat = self.ee_pos.clone(), self.ee_quat.clone()
        self.ee_pos = old_pos + TRACKING_GAIN * (goal_pos - old_pos)
        aligned = torch.where((goal_quat * old_quat).sum(-1, keepdim=True) < 0, -goal_quat, goal_quat)
        new_quat = old_quat + TRACKING_GAIN * (aligned - old_quat)
        self.ee_quat = new_quat / new_quat.norm(dim=-1, keepdim=True)
        self.ee_pos_vel = (self.ee_pos - old_pos) * HZ
        self.ee_ori_vel = quat_xyzw_to_axis_angle(quat_multiply(self.ee_quat, quat_conjugate(old_quat))) * HZ

        # gripper: the fork's toggle rule (simulate_step L946-958)
        grasp = action[:, -1]
        max_w = torch.full_like(grasp, self.max_gripper_width)
        zero = torch.zeros_like(grasp)
        toggle = (torch.sign(grasp) != torch.sign(self.last_grasp)) & (torch.abs(grasp) > self.grasp_margin)
        target = torch.where(toggle, torch.where(grasp < 0, max_w, zero), torch.where(self.last_grasp < 0, max_w, zero))
        self.last_grasp = grasp.clone()  # the fork stores the command on every step (L957)
        self.gripper = self.gripper + TRACKING_GAIN * (target[:, None] - self.gripper)

        self.total_steps += 1
        for i, left in self._nan_schedule.pop(self.total_steps, []):
            self._nan_resets_left[i] = max(int(self._nan_resets_left[i]), left)
        corrupted = torch.nonzero(self._nan_resets_left > 0).flatten()
        if corrupted.numel():
            self._apply_nan(corrupted)

        obs = self.get_observation()
        reward = self._reward()
        done = self._done()
        self.env_steps += 1
        if sample_perturbations:
            push = (torch.rand(self.num_envs, self.num_parts, 2) * 2 - 1) * 1e-3 * self.max_force_magnitude
            self.parts_pos[..., :2] += push
        return obs, reward, done, {"obs_success": True, "action_success": True}

    def _reward(self) -> torch.Tensor:
        """(N, 1) float32: 1.0 where a pair got assembled on this step (the fork's ``_reward`` semantics)."""
        newly = torch.zeros_like(self.already_assembled)
        offset = torch.tensor(ASSEMBLED_OFFSET)
        for i, (a, b) in enumerate(self.pairs_to_assemble):
            dist = (self.ee_pos - self.parts_pos[:, b]).norm(dim=-1)
            reached = dist < REACH_THRESHOLD  # False for NaN states
            newly[:, i] = reached & ~self.already_assembled[:, i]
            if bool(newly[:, i].any()):
                rows = newly[:, i]
                self.parts_pos[rows, b] = self.parts_pos[rows, a] + offset
                self.parts_quat[rows, b] = self.parts_quat[rows, a]
            self.already_assembled[:, i] |= newly[:, i]
        return newly.any(dim=1).float().unsqueeze(-1)

    def _done(self) -> torch.Tensor:
        if self.manual_done:
            return torch.zeros((self.num_envs, 1), dtype=torch.bool)
        return (self.already_assembled.sum(dim=1) == len(self.pairs_to_assemble)).unsqueeze(1)

    def part_positions(self) -> np.ndarray:
        """Current part positions ``(N, num_parts, 3)`` (a convenience for scripted test policies)."""
        return self.parts_pos.clone().numpy()
