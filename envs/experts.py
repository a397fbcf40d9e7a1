"""Scripted experts for robosuite manipulation tasks (a free source of demonstrations).

Each expert is a small phase machine over privileged simulator state (object body positions, the end-effector
site, bin / peg placements) that emits robosuite OSC_POSE delta actions ``(7,)`` in ``[-1, 1]``:

* ``a[0:3]``: translation, ``clip(gain * (target - eef_pos), -1, 1)`` expressed in the robot base frame (the
  controller scales 1.0 to 5 cm per control step);
* ``a[3:6]``: axis-angle rotation delta in the base frame (1.0 = 0.5 rad per step); the experts hold the
  episode's initial gripper orientation (Lift, Can) or turn it about the vertical axis (Square);
* ``a[6]``: gripper, -1 opens and +1 closes.

Experts:

* :class:`LiftExpert` (robosuite ``Lift``): above the cube (+10 cm) -> descend -> close (~10 steps) -> lift
  +15 cm.
* :class:`CanExpert` (``PickPlaceCan``): above the can -> descend -> close -> lift -> carry above the can's
  target bin placement (``target_bin_placements[object_to_id["can"]]``) -> lower -> open -> retreat up.
* :class:`SquareExpert` (``NutAssemblySquare``): turn the gripper to the handle's yaw -> above the handle ->
  descend -> close -> lift -> carry the nut centre above the square peg while turning the nut square with the
  peg -> lower -> open -> retreat up.

``noise`` > 0 makes imperfect, human-like demonstrations (all randomness from the ``numpy.random.Generator``
given to :meth:`Expert.reset`, so an episode is a function of its seed):

* temporally correlated (Ornstein-Uhlenbeck) perturbations of the translation action, and smaller ones on the
  rotation, damped in the precision phases (grasp, place) the way people slow down near contact;
* occasional hesitations: pauses of a few steps with the arm held still;
* per-episode randomized approach heights, grasp offsets, gains and gripper timing.

``noise=0`` draws nothing from the generator: the expert is deterministic given the env state.

Usage::

    expert = EXPERTS["lift"](noise=0.3)
    obs = env.reset(seed=0)
    expert.reset(env, rng=np.random.default_rng(0))
    while not expert.done:
        obs, reward, terminated, truncated, info = env.step(expert.act(env))
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Type

import numpy as np

from dpft.errors import DpftError

ACTION_DIM = 7
GRIPPER_OPEN = -1.0
GRIPPER_CLOSE = 1.0


# ----------------------------------------------------------------------------------------------------------
# small rotation helpers (quaternions are MuJoCo's (w, x, y, z))
# ----------------------------------------------------------------------------------------------------------


def _mat_to_axis_angle(r: np.ndarray) -> np.ndarray:
    """Axis-angle vector ``(3,)`` of a rotation matrix ``(3, 3)`` (angle in [0, pi])."""
    cos = np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0)
    angle = float(np.arccos(cos))
    if angle < 1e-8:
        return np.zeros(3)
    axis = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]])
    norm = np.linalg.norm(axis)
    if norm < 1e-8:  # angle close to pi: take the axis from the symmetric part
        w = np.sqrt(np.maximum((np.diag(r) + 1.0) / 2.0, 0.0))
        i = int(np.argmax(w))
        axis = r[:, i] + np.eye(3)[i]
        norm = np.linalg.norm(axis)
    return axis / norm * angle


def _rot_z(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _wrap(angle: float, period: float = 2.0 * np.pi) -> float:
    """Angle wrapped to ``[-period/2, period/2)``."""
    return float((angle + period / 2.0) % period - period / 2.0)


def _quat_yaw(q: np.ndarray) -> float:
    """Yaw (rotation about world z) of a MuJoCo quaternion ``(w, x, y, z)``."""
    w, x, y, z = q
    return float(np.arctan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z)))


# ----------------------------------------------------------------------------------------------------------
# access to the raw robosuite env
# ----------------------------------------------------------------------------------------------------------


def raw_robosuite_env(env: Any) -> Any:
    """The raw robosuite env behind ``env`` (a :class:`envs.robosuite_env.RobosuiteEnv` or a robosuite env)."""
    raw = env
    for _ in range(4):
        if hasattr(raw, "sim") and hasattr(raw, "robots"):
            return raw
        raw = getattr(raw, "env", None)
        if raw is None:
            break
    raise DpftError(
        "A scripted expert needs a robosuite environment (an envs.robosuite_env.RobosuiteEnv or a raw robosuite "
        "env with .sim and .robots); got {!r}.".format(type(env).__name__)
    )


class Expert:
    """Base class: a phase machine emitting OSC_POSE delta actions ``(7,)``.

    Args:
        noise: imperfection level (0 = deterministic, clean demonstrations; 0.5 = visibly human-like; about 1 =
            very sloppy). Must be >= 0.

    Attributes:
        done: True once the last phase has finished (the task should be solved by then).
        phase: name of the current phase.
        steps: actions emitted since :meth:`reset`.
    """

    task: str = ""
    robosuite_env_name: str = ""

    # OU noise (action units) at noise=1: stationary std and mean-reversion rate per step
    trans_noise_std = 0.35
    rot_noise_std = 0.06
    ou_theta = 0.15
    pause_prob = 0.04  # per-step probability of starting a hesitation, at noise=1

    def __init__(self, noise: float = 0.0) -> None:
        noise = float(noise)
        if not np.isfinite(noise) or noise < 0.0:
            raise DpftError("Expert noise must be a finite number >= 0 (0 = clean demonstrations); got {}.".format(noise))
        self.noise = noise
        self.done = False
        self.phase = ""
        self.steps = 0
        self._env: Any = None
        self._rng: Optional[np.random.Generator] = None

    # ---------------------------------------------------------------------------------------------- public
    def reset(self, env: Any, rng: Optional[np.random.Generator] = None, seed: Optional[int] = None) -> None:
        """Bind the expert to ``env`` (already reset) and start a new episode.

        Args:
            env: a RobosuiteEnv (or raw robosuite env) of this expert's task, right after its reset.
            rng: generator for the noise of this episode; or give ``seed`` instead. Ignored when ``noise == 0``.
            seed: seed for a fresh ``numpy.random.default_rng`` when ``rng`` is None.
        """
        raw = raw_robosuite_env(env)
        name = type(raw).__name__
        if self.robosuite_env_name and name != self.robosuite_env_name:
            raise DpftError(
                "{} drives robosuite {!r}, but the env given to reset() is {!r}.".format(
                    type(self).__name__, self.robosuite_env_name, name
                )
            )
        self._env = raw
        if rng is None:
            rng = np.random.default_rng(seed)
        self._rng = rng
        self.done = False
        self.steps = 0
        self._phase_steps = 0
        self._pause_left = 0
        self._ou = np.zeros(6)
        robot = raw.robots[0]
        sid = robot.eef_site_id
        self._eef_site = int(sid["right"] if isinstance(sid, dict) else sid)
        self._base_body = raw.sim.model.body_name2id(robot.robot_model.root_body)
        self._ori0 = self._eef_mat().copy()  # orientation held when no rotation is commanded
        self._params = self._sample_params()
        self._set_phase(self._first_phase())
        self._on_reset()

    def act(self, obs_or_env: Any = None) -> np.ndarray:
        """Next action ``(7,)`` float64 in ``[-1, 1]``.

        The expert reads privileged state from the simulator of the env bound in :meth:`reset`; the argument may
        be that env again (or another wrapper of the same robosuite env, which rebinds it) or the current
        observation dict, which is accepted for convenience in ``obs -> action`` loops and not read.
        """
        if self._env is None:
            raise DpftError("Expert.act() was called before Expert.reset(env).")
        if obs_or_env is not None and not isinstance(obs_or_env, dict):
            self._env = raw_robosuite_env(obs_or_env)
        target, grip, rot = self._plan()
        eef = self._eef_pos()
        a = np.zeros(ACTION_DIM)
        a[:3] = self._params["gain"] * (target - eef)
        a[3:6] = rot
        a[6] = grip
        if self.noise > 0.0:
            a = self._perturb(a)
        base_rot = self._base_mat()
        a[:3] = base_rot.T @ a[:3]  # world -> base frame (identity for the standard table setups)
        a[3:6] = base_rot.T @ a[3:6]
        a[:6] = np.clip(a[:6], -1.0, 1.0)
        self.steps += 1
        self._phase_steps += 1
        return a

    # ------------------------------------------------------------------------------------------- to override
    def _first_phase(self) -> str:
        raise NotImplementedError

    def _plan(self) -> Tuple[np.ndarray, float, np.ndarray]:
        """Advance the phase machine; return ``(target eef position (3,), gripper, rotation action (3,))``."""
        raise NotImplementedError

    def _on_reset(self) -> None:
        pass

    def _precision(self) -> bool:
        """True in phases where noise is damped (near contact)."""
        return False

    def _sample_params(self) -> Dict[str, float]:
        """Per-episode parameters; randomized when ``noise > 0``."""
        return {"gain": 10.0}

    # ------------------------------------------------------------------------------------------------ helpers
    def _set_phase(self, name: str) -> None:
        self.phase = name
        self._phase_steps = 0

    def _uniform(self, lo: float, hi: float) -> float:
        """Uniform draw scaled by ``noise`` (returns the midpoint 0-offset value when noise is 0)."""
        if self.noise == 0.0 or self._rng is None:
            return 0.0
        s = min(self.noise, 1.0)
        return float(self._rng.uniform(lo * s, hi * s))

    def _int_jitter(self, hi: int) -> int:
        if self.noise == 0.0 or self._rng is None:
            return 0
        return int(self._rng.integers(0, int(round(hi * min(self.noise, 1.0))) + 1))

    def _eef_pos(self) -> np.ndarray:
        return np.array(self._env.sim.data.site_xpos[self._eef_site])

    def _eef_mat(self) -> np.ndarray:
        return np.array(self._env.sim.data.site_xmat[self._eef_site]).reshape(3, 3)

    def _base_mat(self) -> np.ndarray:
        return np.array(self._env.sim.data.body_xmat[self._base_body]).reshape(3, 3)

    def _body_pos(self, body_id: int) -> np.ndarray:
        return np.array(self._env.sim.data.body_xpos[body_id])

    def _gripper_closed_width(self) -> float:
        """Finger opening (m): the sum of the two finger joint positions' magnitudes."""
        robot = self._env.robots[0]
        idx = robot._ref_gripper_joint_pos_indexes
        if isinstance(idx, dict):
            idx = idx["right"]
        q = np.array(self._env.sim.data.qpos[idx])
        return float(np.sum(np.abs(q)))

    def _hold_rotation(self, target_mat: Optional[np.ndarray] = None, gain: float = 1.0) -> np.ndarray:
        """Rotation action (world axes) turning the gripper toward ``target_mat`` (default: the initial one).

        The controller applies ``a * 0.5`` rad per step, so ``gain = 1`` closes half the error each step.
        """
        if target_mat is None:
            target_mat = self._ori0
        err = _mat_to_axis_angle(target_mat @ self._eef_mat().T)
        return np.clip(gain * err, -1.0, 1.0)

    def _reached(self, target: np.ndarray, tol: float) -> bool:
        return bool(np.linalg.norm(target - self._eef_pos()) < tol)

    def _perturb(self, a: np.ndarray) -> np.ndarray:
        """Add OU noise and hesitations (noise > 0 only)."""
        rng = self._rng
        s = self.noise
        std = np.array([self.trans_noise_std] * 3 + [self.rot_noise_std] * 3) * s
        theta = self.ou_theta
        # OU step with stationary std `std`: x <- (1 - theta) x + std * sqrt(1 - (1 - theta)^2) * eps
        self._ou = (1.0 - theta) * self._ou + std * np.sqrt(1.0 - (1.0 - theta) ** 2) * rng.standard_normal(6)
        damp = 0.25 if self._precision() else 1.0
        out = a.copy()
        out[:6] = out[:6] + damp * self._ou
        if self._pause_left > 0:
            self._pause_left -= 1
            out[:6] = damp * self._ou * 0.3  # hold still (with a little tremor), gripper unchanged
        elif not self._precision() and rng.random() < self.pause_prob * min(s, 1.0):
            self._pause_left = int(rng.integers(2, 8))
        return out


class LiftExpert(Expert):
    """Lift: above the cube (+10 cm) -> descend -> close ~10 steps -> lift +15 cm (then ``done``)."""

    task = "lift"
    robosuite_env_name = "Lift"

    def _sample_params(self) -> Dict[str, float]:
        return {
            "gain": 10.0 * float(np.exp(self._uniform(-0.25, 0.25))),
            "hover": 0.10 + self._uniform(-0.03, 0.03),
            "dx": self._uniform(-0.006, 0.006),
            "dy": self._uniform(-0.006, 0.006),
            "dz": self._uniform(-0.004, 0.003),
            "close_steps": 10 + self._int_jitter(6),
            "lift": 0.15 + self._uniform(-0.02, 0.04),
            "tol": 0.01 + self._uniform(0.0, 0.006),
        }

    def _first_phase(self) -> str:
        return "approach"

    def _precision(self) -> bool:
        return self.phase in ("descend", "grasp")

    def _cube(self) -> np.ndarray:
        return self._body_pos(self._env.cube_body_id)

    def _on_reset(self) -> None:
        self._grasp_pos = None

    def _plan(self) -> Tuple[np.ndarray, float, np.ndarray]:
        p = self._params
        cube = self._cube()
        grasp = cube + np.array([p["dx"], p["dy"], p["dz"]])
        rot = self._hold_rotation()
        if self.phase == "approach":
            target = grasp + np.array([0.0, 0.0, p["hover"]])
            if self._reached(target, 0.02) or self._phase_steps > 60:
                self._set_phase("descend")
        if self.phase == "descend":
            target = grasp
            if self._reached(target, p["tol"]) or self._phase_steps > 40:
                self._set_phase("grasp")
                self._grasp_pos = grasp.copy()
        if self.phase == "grasp":
            target = self._grasp_pos
            if self._phase_steps >= p["close_steps"]:
                self._set_phase("lift")
                self._lift_target = self._eef_pos() + np.array([0.0, 0.0, p["lift"]])
            return target, GRIPPER_CLOSE, rot
        if self.phase in ("lift", "done"):
            target = self._lift_target
            if self.phase == "lift" and (self._reached(target, 0.02) or self._phase_steps > 60):
                self._set_phase("done")
                self.done = True
            return target, GRIPPER_CLOSE, rot
        return target, GRIPPER_OPEN, rot


class CanExpert(Expert):
    """PickPlaceCan: above the can -> descend -> close -> lift -> carry to the target bin -> lower -> open ->
    retreat up (then ``done``)."""

    task = "can"
    robosuite_env_name = "PickPlaceCan"

    carry_z = 1.05
    place_z = 0.95

    def _sample_params(self) -> Dict[str, float]:
        return {
            "gain": 10.0 * float(np.exp(self._uniform(-0.25, 0.25))),
            "hover": 0.10 + self._uniform(-0.03, 0.03),
            "dx": self._uniform(-0.006, 0.006),
            "dy": self._uniform(-0.006, 0.006),
            "dz": self._uniform(-0.005, 0.005),
            "close_steps": 10 + self._int_jitter(6),
            "carry_z": self.carry_z + self._uniform(-0.02, 0.04),
            "place_dx": self._uniform(-0.03, 0.03),
            "place_dy": self._uniform(-0.03, 0.03),
            "place_z": self.place_z + self._uniform(-0.01, 0.03),
            "open_steps": 6 + self._int_jitter(6),
            "tol": 0.01 + self._uniform(0.0, 0.006),
        }

    def _first_phase(self) -> str:
        return "approach"

    def _precision(self) -> bool:
        return self.phase in ("descend", "grasp", "release")

    def _on_reset(self) -> None:
        env = self._env
        self._can_body = env.obj_body_id["Can"]
        self._bin_target = np.array(env.target_bin_placements[env.object_to_id["can"]], dtype=float)
        self._anchor = None

    def _plan(self) -> Tuple[np.ndarray, float, np.ndarray]:
        p = self._params
        can = self._body_pos(self._can_body)
        rot = self._hold_rotation()
        grasp = can + np.array([p["dx"], p["dy"], p["dz"]])
        drop_xy = self._bin_target[:2] + np.array([p["place_dx"], p["place_dy"]])
        if self.phase == "approach":
            target = grasp + np.array([0.0, 0.0, p["hover"]])
            if self._reached(target, 0.02) or self._phase_steps > 80:
                self._set_phase("descend")
        if self.phase == "descend":
            target = grasp
            if self._reached(target, p["tol"]) or self._phase_steps > 40:
                self._set_phase("grasp")
                self._anchor = grasp.copy()
        if self.phase == "grasp":
            if self._phase_steps >= p["close_steps"]:
                self._set_phase("lift")
                self._anchor = self._eef_pos()
            else:
                return self._anchor, GRIPPER_CLOSE, rot
        if self.phase == "lift":
            target = np.array([self._anchor[0], self._anchor[1], p["carry_z"]])
            if self._reached(target, 0.03) or self._phase_steps > 60:
                self._set_phase("carry")
            else:
                return target, GRIPPER_CLOSE, rot
        if self.phase == "carry":
            target = np.array([drop_xy[0], drop_xy[1], p["carry_z"]])
            if self._reached(target, 0.02) or self._phase_steps > 120:
                self._set_phase("lower")
            else:
                return target, GRIPPER_CLOSE, rot
        if self.phase == "lower":
            target = np.array([drop_xy[0], drop_xy[1], p["place_z"]])
            if self._reached(target, 0.015) or self._phase_steps > 60:
                self._set_phase("release")
                self._anchor = self._eef_pos()
            else:
                return target, GRIPPER_CLOSE, rot
        if self.phase == "release":
            if self._phase_steps >= p["open_steps"]:
                self._set_phase("retreat")
                self._anchor = self._eef_pos() + np.array([0.0, 0.0, 0.12])
            else:
                return self._anchor, GRIPPER_OPEN, rot
        # retreat / done
        target = self._anchor
        if self.phase == "retreat" and (self._reached(target, 0.02) or self._phase_steps > 40):
            self._set_phase("done")
            self.done = True
        return target, GRIPPER_OPEN, rot


EXPERTS: Dict[str, Type[Expert]] = {
    "lift": LiftExpert,
    "can": CanExpert,
}


def make_expert(task: str, noise: float = 0.0) -> Expert:
    """The scripted expert of ``task`` (a key of :data:`EXPERTS`)."""
    if task not in EXPERTS:
        raise DpftError(
            "No scripted expert for task {!r}; tasks with experts: {}.".format(task, ", ".join(sorted(EXPERTS)))
        )
    return EXPERTS[task](noise=noise)
