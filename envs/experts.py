"""Scripted experts for robosuite manipulation tasks (a free source of demonstrations).

Each expert is a small phase machine over privileged simulator state (object body positions, the end-effector
site, bin / peg placements) that emits robosuite OSC_POSE delta actions ``(7,)`` in ``[-1, 1]``:

* ``a[0:3]``: translation, ``clip(gain * (target - eef_pos), -1, 1)`` (gain 10) expressed in the robot base
  frame (the controller scales 1.0 to 5 cm per control step); Square adds a small integral term near contact,
  against the steady-state error that joint friction leaves;
* ``a[3:6]``: axis-angle rotation delta in the base frame (1.0 = 0.5 rad per step): zero for Lift and Can (the
  platform-validated experts), a turn about the vertical axis for Square (holding the full orientation fights
  the position task near the workspace edge);
* ``a[6]``: gripper, -1 opens and +1 closes.

Experts (measured success with robosuite 1.5.2 in :class:`dpft.envs.robosuite_env.RobosuiteEnv`, 20 seeds each:
100% at noise 0 and at noise 0.5 for all three):

* :class:`LiftExpert` (robosuite ``Lift``): above the cube (+10 cm) -> descend -> close (~10 steps) -> lift
  +15 cm.
* :class:`CanExpert` (``PickPlaceCan``): above the can -> descend -> close -> lift -> carry above the can's
  target bin placement (``target_bin_placements[object_to_id["can"]]``) -> lower -> open -> retreat up.
* :class:`SquareExpert` (``NutAssemblySquare``): turn the fingers across the nut's handle -> above the handle ->
  descend (and settle) -> close -> lift -> carry the nut centre above the square peg while turning the nut square
  with it -> lower until it is engaged on the peg -> open -> retreat up.

A grasp that closes on nothing (or drops the object) is retried from the approach, at most twice.

``noise`` > 0 makes imperfect, human-like demonstrations (all randomness from the ``numpy.random.Generator``
given to :meth:`Expert.reset`, so an episode is a function of its seed):

* temporally correlated (Ornstein-Uhlenbeck) perturbations of the translation action, damped to a quarter in
  the precision phases (grasp, place) the way people slow down near contact;
* occasional hesitations: pauses of 2-7 steps with the arm held still;
* per-episode randomized gains, approach heights, grasp offsets, carry heights, drop points and gripper timing.

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
    """The raw robosuite env behind ``env`` (a :class:`dpft.envs.robosuite_env.RobosuiteEnv` or a robosuite env)."""
    raw = env
    for _ in range(4):
        if hasattr(raw, "sim") and hasattr(raw, "robots"):
            return raw
        raw = getattr(raw, "env", None)
        if raw is None:
            break
    raise DpftError(
        "A scripted expert needs a robosuite environment (an dpft.envs.robosuite_env.RobosuiteEnv or a raw robosuite "
        "env with .sim and .robots); got {!r}.".format(type(env).__name__)
    )


class OrnsteinUhlenbeck:
    """Discrete Ornstein-Uhlenbeck process ``x <- (1 - theta) x + std * sqrt(1 - (1 - theta)^2) * eps``.

    Started at 0; its stationary standard deviation is ``std`` and its lag-k autocorrelation ``(1 - theta)^k``
    (temporally correlated noise, like a hand drifting rather than shaking).

    Args:
        dim: dimension of ``x``.
        std: stationary standard deviation (>= 0).
        theta: mean-reversion rate per step, in (0, 1].
    """

    def __init__(self, dim: int, std: float, theta: float) -> None:
        if not 0.0 < theta <= 1.0:
            raise DpftError("OrnsteinUhlenbeck theta must be in (0, 1], got {}.".format(theta))
        if std < 0.0:
            raise DpftError("OrnsteinUhlenbeck std must be >= 0, got {}.".format(std))
        self.std = float(std)
        self.theta = float(theta)
        self.x = np.zeros(int(dim))

    def reset(self) -> None:
        self.x = np.zeros_like(self.x)

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        """Advance one step and return ``x`` ``(dim,)``."""
        keep = 1.0 - self.theta
        self.x = keep * self.x + self.std * np.sqrt(1.0 - keep * keep) * rng.standard_normal(self.x.shape[0])
        return self.x.copy()


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

    # Ornstein-Uhlenbeck noise on the translation action at noise=1: stationary std (action units; 1 = 5 cm per
    # step) and mean-reversion rate per step (correlation time about 1 / theta = 7 steps)
    trans_noise_std = 0.35
    ou_theta = 0.15
    pause_prob = 0.04  # per-step probability of starting a hesitation, at noise=1
    integral_gain = 0.0  # integral action (per metre-step of accumulated error) in precision phases
    integral_limit = 0.15  # cap on the accumulated error (m * steps)
    holding_phases: Tuple[str, ...] = ()  # phases where the object must be in the closed gripper
    lost_width = 0.006  # finger opening (m) below which the gripper holds nothing
    max_retries = 2  # re-grasps after a missed or dropped object

    def __init__(self, noise: float = 0.0) -> None:
        try:
            value = float(noise)
        except (TypeError, ValueError):
            value = float("nan")
        if not np.isfinite(value) or value < 0.0:
            raise DpftError(
                "Expert noise must be a finite number >= 0 (0 = clean demonstrations); got {!r}.".format(noise)
            )
        self.noise = value
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
        self._ou = OrnsteinUhlenbeck(3, self.trans_noise_std * self.noise, self.ou_theta)
        self._integ = np.zeros(3)
        self._retries = 0
        robot = raw.robots[0]
        sid = robot.eef_site_id
        self._eef_site = int(sid["right"] if isinstance(sid, dict) else sid)
        self._base_body = raw.sim.model.body_name2id(robot.robot_model.root_body)
        self._prev_eef = self._eef_pos()
        self._speed = 0.0
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
        eef = self._eef_pos()
        self._speed = float(np.linalg.norm(eef - self._prev_eef))
        self._prev_eef = eef
        if (
            self.phase in self.holding_phases
            and self._phase_steps > 3
            and self._retries < self.max_retries
            and self._finger_opening() < self.lost_width
        ):
            # the fingers closed on nothing (missed or dropped object): open and try again from above
            self._retries += 1
            self._set_phase(self._first_phase())
        phase = self.phase
        target, grip, rot = self._plan()
        if self.phase != phase:
            self._integ = np.zeros(3)
        err = target - self._eef_pos()
        a = np.zeros(ACTION_DIM)
        a[:3] = self._params["gain"] * err
        if self.integral_gain > 0.0 and self._precision():
            # integral action against the steady-state error left by joint friction near contact
            self._integ = self._integ + err
            norm = np.linalg.norm(self._integ)
            if norm > self.integral_limit:
                self._integ *= self.integral_limit / norm
            a[:3] += self.integral_gain * self._integ
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
        """Uniform draw from ``[lo, hi] * min(noise, 1)``; 0 when ``noise == 0`` (nothing is drawn)."""
        if self.noise == 0.0 or self._rng is None:
            return 0.0
        s = min(self.noise, 1.0)
        return float(self._rng.uniform(lo * s, hi * s))

    def _int_jitter(self, hi: int) -> int:
        """Integer in ``[0, round(hi * min(noise, 1))]``; 0 when ``noise == 0``."""
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

    def _finger_opening(self) -> float:
        """Finger opening (m): the sum of the two finger joint positions' magnitudes."""
        robot = self._env.robots[0]
        idx = robot._ref_gripper_joint_pos_indexes
        if isinstance(idx, dict):
            idx = idx["right"]
        q = np.array(self._env.sim.data.qpos[idx])
        return float(np.sum(np.abs(q)))

    def _reached(self, target: np.ndarray, tol: float) -> bool:
        return bool(np.linalg.norm(target - self._eef_pos()) < tol)

    def _settled(self, target: np.ndarray, tol: float, speed_tol: float = 0.003) -> bool:
        """Within ``tol`` of ``target`` and moving less than ``speed_tol`` metres per step."""
        return self._reached(target, tol) and self._speed < speed_tol

    def _grasp_sequence(self, grasp: np.ndarray, rot: Optional[np.ndarray] = None, approach_timeout: int = 80,
                        aligned: bool = True, settle: bool = False,
                        lift_offset: float = 0.0) -> Optional[Tuple[np.ndarray, float, np.ndarray]]:
        """The pick phases every expert shares: ``approach`` (hover above ``grasp``) -> ``descend`` -> ``grasp``
        (close for ``close_steps``). Returns this step's ``(target, gripper, rot)``, or None once the gripper has
        closed: the phase is then ``lift`` with ``self._anchor`` = eef position + ``lift_offset`` up.

        ``aligned`` gates leaving the approach (e.g. the gripper's yaw is aligned), ``settle`` makes the descent
        wait until the arm is at rest, not only within tolerance; each phase also ends on a step timeout."""
        p = self._params
        rot = np.zeros(3) if rot is None else rot
        if self.phase == "approach":
            target = grasp + np.array([0.0, 0.0, p["hover"]])
            if (self._reached(target, 0.02) and aligned) or self._phase_steps > approach_timeout:
                self._set_phase("descend")
            else:
                return target, GRIPPER_OPEN, rot
        if self.phase == "descend":
            at_grasp = self._settled(grasp, p["tol"]) if settle else self._reached(grasp, p["tol"])
            if at_grasp or self._phase_steps > 40:
                self._set_phase("grasp")
                self._anchor = grasp.copy()
            else:
                return grasp, GRIPPER_OPEN, rot
        if self.phase == "grasp":
            if self._phase_steps >= p["close_steps"]:
                self._set_phase("lift")
                self._anchor = self._eef_pos() + np.array([0.0, 0.0, lift_offset])
            else:
                return self._anchor, GRIPPER_CLOSE, np.zeros(3)
        return None

    def _perturb(self, a: np.ndarray) -> np.ndarray:
        """Add OU noise and hesitations (noise > 0 only)."""
        rng = self._rng
        drift = self._ou.sample(rng)
        damp = 0.25 if self._precision() else 1.0
        out = a.copy()
        out[:3] = out[:3] + damp * drift
        if self._pause_left > 0:
            self._pause_left -= 1
            out[:3] = damp * drift * 0.3  # hold still (with a little tremor); the gripper follows the plan
        elif not self._precision() and rng.random() < self.pause_prob * min(self.noise, 1.0):
            self._pause_left = int(rng.integers(2, 8))
        return out


class LiftExpert(Expert):
    """Lift: above the cube (+10 cm) -> descend -> close ~10 steps -> lift +15 cm (then ``done``)."""

    task = "lift"
    robosuite_env_name = "Lift"
    holding_phases = ("lift",)

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
        self._anchor = None

    def _plan(self) -> Tuple[np.ndarray, float, np.ndarray]:
        p = self._params
        grasp = self._cube() + np.array([p["dx"], p["dy"], p["dz"]])
        rot = np.zeros(3)
        step = self._grasp_sequence(grasp, approach_timeout=60, lift_offset=p["lift"])
        if step is not None:
            return step
        # lift / done: hold the cube up
        if self.phase == "lift" and (self._reached(self._anchor, 0.02) or self._phase_steps > 60):
            self._set_phase("done")
            self.done = True
        return self._anchor, GRIPPER_CLOSE, rot


class CanExpert(Expert):
    """PickPlaceCan: above the can -> descend -> close -> lift -> carry to the target bin -> lower -> open ->
    retreat up (then ``done``)."""

    task = "can"
    robosuite_env_name = "PickPlaceCan"
    holding_phases = ("lift", "carry", "lower")

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
        rot = np.zeros(3)
        grasp = can + np.array([p["dx"], p["dy"], p["dz"]])
        drop_xy = self._bin_target[:2] + np.array([p["place_dx"], p["place_dy"]])
        step = self._grasp_sequence(grasp)
        if step is not None:
            return step
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


class SquareExpert(Expert):
    """NutAssemblySquare: turn the fingers across the nut's handle -> above the handle -> descend -> close ->
    lift -> turn the nut square with the peg and carry its centre above the peg -> lower onto the peg -> open ->
    retreat up (then ``done``).

    The fingers close along the gripper's x axis; the square peg is axis-aligned, so the nut needs a yaw that
    is a multiple of 90 degrees (the hole's half-width is 22.75 mm against the peg's 16 mm).
    """

    task = "square"
    robosuite_env_name = "NutAssemblySquare"
    holding_phases = ("lift", "carry", "align", "insert")

    carry_clearance = 0.06  # nut centre above the peg top while carrying (m)
    yaw_gain = 1.0
    integral_gain = 2.0
    release_depth = 0.03  # open once the nut centre is this far below the peg top (it slides down) (m)
    grasp_along = 0.006  # grasp this far beyond the handle centre, away from the nut ring (m)

    def _sample_params(self) -> Dict[str, float]:
        return {
            "gain": 10.0 * float(np.exp(self._uniform(-0.2, 0.2))),
            "hover": 0.10 + self._uniform(-0.03, 0.03),
            "d_along": self._uniform(-0.004, 0.006),
            "dz": 0.008 + self._uniform(-0.002, 0.004),
            "close_steps": 10 + self._int_jitter(6),
            "lift_z": 1.05 + self._uniform(-0.01, 0.03),
            "open_steps": 6 + self._int_jitter(6),
            "tol": 0.008 + self._uniform(0.0, 0.004),
        }

    def _first_phase(self) -> str:
        return "approach"

    def _precision(self) -> bool:
        return self.phase in ("descend", "grasp", "align", "insert", "release")

    def _on_reset(self) -> None:
        env = self._env
        nut = env.nuts[env.nut_to_id["square"]]
        self._nut_body = env.obj_body_id[nut.name]
        self._handle_site = env.sim.model.site_name2id(nut.important_sites["handle"])
        self._peg_body = env.peg1_body_id
        self._anchor = None
        self._stable = 0

    def _nut_yaw(self) -> float:
        return _quat_yaw(np.array(self._env.sim.data.body_xquat[self._nut_body]))

    def _gripper_yaw(self) -> float:
        x_axis = self._eef_mat()[:, 0]  # finger closing direction
        return float(np.arctan2(x_axis[1], x_axis[0]))

    def _yaw_action(self, err: float) -> np.ndarray:
        """Rotation action turning the gripper by ``err`` rad about the vertical (tilt left free: holding the
        full orientation fights the position task near the workspace edge)."""
        return np.array([0.0, 0.0, float(np.clip(self.yaw_gain * err, -1.0, 1.0))])

    def _plan(self) -> Tuple[np.ndarray, float, np.ndarray]:
        p = self._params
        data = self._env.sim.data
        nut = self._body_pos(self._nut_body)
        handle = np.array(data.site_xpos[self._handle_site])
        nut_yaw = self._nut_yaw()
        along = np.array([np.cos(nut_yaw), np.sin(nut_yaw), 0.0])  # handle axis (nut local x)
        grasp = handle + (self.grasp_along + p["d_along"]) * along + np.array([0.0, 0.0, p["dz"]])
        # fingers across the handle: gripper x axis along the nut's local y (mod 180 degrees)
        grasp_yaw_err = _wrap(nut_yaw + np.pi / 2.0 - self._gripper_yaw(), np.pi)
        peg = self._body_pos(self._peg_body)
        peg_top = peg[2] + 0.1
        step = self._grasp_sequence(grasp, rot=self._yaw_action(grasp_yaw_err), aligned=abs(grasp_yaw_err) < 0.05,
                                    settle=True)
        if step is not None:
            return step
        # after the grasp the nut moves with the hand: steer the eef so that the nut centre reaches the target
        nut_square_err = _wrap(-nut_yaw, np.pi / 2.0)
        eef = self._eef_pos()
        if self.phase == "lift":
            target = np.array([self._anchor[0], self._anchor[1], p["lift_z"]])
            if eef[2] > p["lift_z"] - 0.03 or self._phase_steps > 60:
                self._set_phase("carry")
            else:
                return target, GRIPPER_CLOSE, np.zeros(3)
        carry_z_eef = eef[2] + (peg_top + self.carry_clearance - nut[2])
        if self.phase == "carry":
            target = np.array([eef[0] + peg[0] - nut[0], eef[1] + peg[1] - nut[1], max(carry_z_eef, p["lift_z"])])
            rot = self._yaw_action(nut_square_err)
            if (np.linalg.norm(nut[:2] - peg[:2]) < 0.01 and abs(nut_square_err) < 0.05) or self._phase_steps > 150:
                self._set_phase("align")
                self._stable = 0
            else:
                return target, GRIPPER_CLOSE, rot
        if self.phase == "align":
            # settle right above the peg: fine xy alignment of the nut centre, no descent yet
            target = np.array([eef[0] + peg[0] - nut[0], eef[1] + peg[1] - nut[1], carry_z_eef])
            rot = self._yaw_action(nut_square_err)
            xy_err = np.linalg.norm(nut[:2] - peg[:2])
            self._stable = self._stable + 1 if (xy_err < 0.004 and abs(nut_square_err) < 0.03) else 0
            if self._stable >= 3 or self._phase_steps > 60:
                self._set_phase("insert")
            else:
                return target, GRIPPER_CLOSE, rot
        if self.phase == "insert":
            # lower the nut over the peg while keeping it centred; let go once it is engaged on the peg
            target = np.array([eef[0] + peg[0] - nut[0], eef[1] + peg[1] - nut[1], eef[2] - 0.04])
            rot = self._yaw_action(nut_square_err)
            engaged = nut[2] < peg_top - self.release_depth
            if engaged or nut[2] < self._env.table_offset[2] + 0.035 or self._phase_steps > 60:
                self._set_phase("release")
                self._anchor = eef
            else:
                return target, GRIPPER_CLOSE, rot
        if self.phase == "release":
            if self._phase_steps >= p["open_steps"]:
                self._set_phase("retreat")
                self._anchor = self._eef_pos() + np.array([0.0, 0.0, 0.12])
            else:
                return self._anchor, GRIPPER_OPEN, np.zeros(3)
        target = self._anchor
        if self.phase == "retreat" and (self._reached(target, 0.02) or self._phase_steps > 40):
            self._set_phase("done")
            self.done = True
        return target, GRIPPER_OPEN, np.zeros(3)


EXPERTS: Dict[str, Type[Expert]] = {
    "lift": LiftExpert,
    "can": CanExpert,
    "square": SquareExpert,
}


def make_expert(task: str, noise: float = 0.0) -> Expert:
    """The scripted expert of ``task`` (a key of :data:`EXPERTS`)."""
    if task not in EXPERTS:
        raise DpftError(
            "No scripted expert for task {!r}; tasks with experts: {}.".format(task, ", ".join(sorted(EXPERTS)))
        )
    return EXPERTS[task](noise=noise)
