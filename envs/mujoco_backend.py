"""A fast backend for robosuite's Lift, PickPlaceCan and NutAssemblySquare: the MjModel robosuite builds, stepped by
MuJoCo directly, with robosuite 1.5's BASIC composite controller (OSC_POSE arm + Panda gripper) re-implemented as
batched array math (:mod:`dpft.envs.osc_batch`) and observations, reward and success computed from ``MjData``.

* :class:`MujocoSim` holds one MjModel and any number of ``MjData`` (one per env) plus the controller state of each
  (the nullspace target joints and the gripper command ramp). :meth:`MujocoSim.step` advances any subset of its envs
  by one env step with one vectorized controller computation per physics substep for all of them, exactly as
  robosuite's ``step`` does (``mj_step1`` -> torques -> ``mj_step2``, ``control_freq`` substeps), then refreshes the
  state (``mj_forward``) and computes observations, reward and success from that same state.
* Resets are robosuite's own: a robosuite env in the same process (built from the same ``env_args``, seeded exactly
  like :class:`dpft.envs.robosuite_env.RobosuiteEnv`) runs its reset (placement samplers, joint noise), and its full
  MuJoCo integration state and controller state are copied into the env's ``MjData`` (cost: one robosuite reset per
  episode, ~5 ms). So for a seed the initial state is robosuite's, bit for bit.
* :class:`MujocoEnv` is one env of a :class:`MujocoSim` behind the :class:`dpft.envs.base.Env` contract. Envs built
  in one process from equal arguments share one sim (a process-wide pool), so a ``VectorEnv`` in ``inline`` mode steps
  them together: it calls :func:`prestep_group` with every env's action chunk before asking each env for its steps.

Select it with ``env_args["env_kwargs"]["backend"] = "mujoco"`` (``"robosuite"`` for robosuite itself). What is not
implemented (other robots, controllers, tasks, reward shaping, camera observations) raises :class:`DpftError` naming
what is supported and how to use robosuite instead.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from dpft.errors import DpftError
from dpft.envs.base import Env, ObsDict
from dpft.envs import osc_batch as osc

logger = logging.getLogger(__name__)

#: values of env_kwargs["backend"]
BACKENDS = ("mujoco", "robosuite")

#: robosuite tasks the fast backend implements
SUPPORTED_TASKS = ("Lift", "PickPlaceCan", "NutAssemblySquare")

#: backend used when env_kwargs has no "backend" (see README "Simulation backends"); the environment variable
#: DPFT_DEFAULT_BACKEND=robosuite changes it for a process (runs record the backend they used either way)
DEFAULT_BACKEND = os.environ.get("DPFT_DEFAULT_BACKEND", "mujoco")

_HOW_TO = ("Use robosuite instead with env_kwargs.backend=robosuite (for example `dpft finetune ... "
           "env_kwargs.backend=robosuite`, or env_args['env_kwargs']['backend'] = 'robosuite').")


def controller_cache(arm: Any) -> Optional[Dict[str, np.ndarray]]:
    """The OSC controller's cached inputs when robosuite will use them instead of fresh ones on the next substep.

    robosuite's reset ends with ``update_initial_joints`` -> ``update(force=True)``, computed before the gripper
    joints and objects get their initial positions, and leaves ``new_update`` False, so the first substep of every
    episode runs the controller on that cached mass matrix, Jacobian and reference pose (the arm's mass matrix then
    differs from the current state's by ~1e-4 because the fingers moved). Copying the cache reproduces robosuite's
    first step exactly. Returns None when the controller will refresh (``new_update`` True)."""
    if getattr(arm, "new_update", True):
        return None
    return {k: np.array(getattr(arm, k), dtype=np.float64) for k in
            ("joint_pos", "joint_vel", "ref_pos", "ref_ori_mat", "J_full", "mass_matrix")}


def split_backend(env_args: Dict[str, Any]) -> Tuple[str, Dict[str, Any]]:
    """``(backend, env_args without the backend key)``; the backend defaults to :data:`DEFAULT_BACKEND` for the
    supported tasks and to ``"robosuite"`` otherwise."""
    kw = env_args.get("env_kwargs") or {}
    backend = kw.get("backend") if isinstance(kw, dict) else None
    rest = env_args
    if isinstance(kw, dict) and "backend" in kw:
        rest = dict(env_args, env_kwargs={k: v for k, v in kw.items() if k != "backend"})
    if backend is None:
        if DEFAULT_BACKEND not in BACKENDS:
            raise DpftError("The environment variable DPFT_DEFAULT_BACKEND is {!r}; set it to one of {} or unset "
                            "it.".format(DEFAULT_BACKEND, ", ".join(BACKENDS)))
        backend = DEFAULT_BACKEND if env_args.get("env_name") in SUPPORTED_TASKS else "robosuite"
        return backend, rest
    if backend not in BACKENDS:
        raise DpftError("env_args['env_kwargs']['backend'] is {!r}; choose one of {} ('mujoco': the fast backend for "
                        "{}; 'robosuite': robosuite itself, every task).".format(
                            backend, ", ".join(BACKENDS), ", ".join(SUPPORTED_TASKS)))
    return str(backend), rest


def resolve_backend(env_args: Dict[str, Any], obs_keys: Optional[Sequence[str]] = None) -> Tuple[str, Dict[str, Any]]:
    """The backend that :func:`dpft.envs.registry.make_env` builds for ``env_args`` and ``obs_keys``, and the env_args
    without the ``backend`` key. An explicit ``env_kwargs.backend`` is used as given (``mujoco`` with something it
    does not implement is an error); without one, the default backend is used where it implements the env
    (task, robot, low-dim observations, sparse reward) and robosuite otherwise, with a log note saying why."""
    explicit = isinstance(env_args.get("env_kwargs"), dict) and "backend" in env_args["env_kwargs"]
    backend, rest = split_backend(env_args)
    if explicit or backend != "mujoco":
        return backend, rest
    kw = rest.get("env_kwargs") or {}
    why = None
    images = [k for k in (obs_keys or []) if str(k).endswith("_image")]
    if images:
        why = "camera observations ({})".format(", ".join(images))
    elif kw.get("reward_shaping"):
        why = "reward_shaping=True"
    else:
        robots = kw.get("robots")
        robots = [robots] if isinstance(robots, str) else list(robots or [])
        if robots != ["Panda"]:
            why = "robots={}".format(robots)
    if why is not None:
        logger.info("robosuite backend for %s: the mujoco backend does not implement %s.", rest.get("env_name"), why)
        return "robosuite", rest
    return backend, rest


def _unsupported(what: str) -> DpftError:
    return DpftError("The mujoco backend does not implement {}. It supports robosuite {} with one Panda robot, the "
                     "BASIC composite controller (OSC_POSE arm, delta input, fixed impedance, no interpolator; Panda "
                     "gripper), sparse reward and low-dim observations. {}".format(
                         what, ", ".join(SUPPORTED_TASKS), _HOW_TO))


def check_supported(rs: Any) -> None:
    """Raise :class:`DpftError` if the robosuite env ``rs`` uses anything the fast backend does not reproduce."""
    name = type(rs).__name__
    if name not in SUPPORTED_TASKS:
        raise _unsupported("the task {}".format(name))
    if len(rs.robots) != 1 or type(rs.robots[0].robot_model).__name__ != "Panda":
        raise _unsupported("the robot(s) {}".format([type(r.robot_model).__name__ for r in rs.robots]))
    robot = rs.robots[0]
    cc = robot.composite_controller
    if type(cc).__name__ != "CompositeController":
        raise _unsupported("the composite controller {}".format(type(cc).__name__))
    parts = sorted(robot.part_controllers)
    if parts != ["right", "right_gripper"]:
        raise _unsupported("the controller parts {}".format(parts))
    arm = robot.part_controllers["right"]
    if type(arm).__name__ != "OperationalSpaceController" or not arm.use_ori:
        raise _unsupported("the arm controller {}".format(getattr(arm, "name", type(arm).__name__)))
    if (arm.input_type != "delta" or arm.impedance_mode != "fixed" or arm.interpolator_pos is not None
            or arm.interpolator_ori is not None or arm.position_limits is not None
            or getattr(arm, "_goal_update_mode", "achieved") != "achieved"
            or (arm.orientation_limits is not None and np.array(arm.orientation_limits).any())):
        raise _unsupported("OSC_POSE with input_type={!r}, impedance_mode={!r}, interpolators or limits".format(
            arm.input_type, arm.impedance_mode))
    grip = robot.part_controllers["right_gripper"]
    if (type(grip).__name__ != "SimpleGripController" or grip.interpolator is not None or not grip.use_action_scaling
            or type(robot.gripper["right"]).__name__ != "PandaGripper"):
        raise _unsupported("the gripper {} with controller {}".format(
            type(robot.gripper["right"]).__name__, type(grip).__name__))
    if rs.reward_shaping:
        raise _unsupported("reward_shaping=True (shaped rewards)")
    if getattr(rs, "single_object_mode", 2) != 2:
        raise _unsupported("single_object_mode={} (robosuite's PickPlaceCan/NutAssemblySquare use 2)".format(
            rs.single_object_mode))


class _TaskSpec:
    """Where a task's objects, success rule and reward live in the model (read from the robosuite env)."""

    def __init__(self, rs: Any):
        import mujoco

        self.name = type(rs).__name__
        sim = rs.sim
        self.reward_scale = rs.reward_scale
        self.table_z = None  # type: Optional[float]
        if self.name == "Lift":
            self.obj_body = int(rs.cube_body_id)
            self.table_z = float(rs.model.mujoco_arena.table_offset[2])
            self.all_bodies = [self.obj_body]
        elif self.name == "PickPlaceCan":
            self.obj_body = int(rs.obj_body_id[rs.objects[rs.object_id].name])
            self.all_bodies = [int(rs.obj_body_id[o.name]) for o in rs.objects]
            self.bin2_pos = np.array(rs.bin2_pos, dtype=np.float64)
            self.bin_size = np.array(rs.bin_size, dtype=np.float64)
        else:  # NutAssemblySquare
            self.obj_body = int(rs.obj_body_id[rs.nuts[rs.nut_id].name])
            self.all_bodies = [int(rs.obj_body_id[o.name]) for o in rs.nuts]
            self.peg_bodies = [int(rs.peg1_body_id), int(rs.peg2_body_id)]
            self.table_z = float(rs.table_offset[2])
        self.single = getattr(rs, "single_object_mode", 2)
        robot = rs.robots[0]
        self.eef_site = int(robot.eef_site_id["right"])
        self.eef_body = int(sim.model.body_name2id(robot.robot_model.eef_name["right"]))
        self.base_site = int(mujoco.mj_name2id(sim.model._model, mujoco.mjtObj.mjOBJ_SITE,
                                               "{}right_center".format(robot.robot_model.naming_prefix)))
        self.arm_qpos = np.array(robot._ref_joint_pos_indexes, dtype=np.int64)
        self.arm_qvel = np.array(robot._ref_joint_vel_indexes, dtype=np.int64)
        gq = robot._ref_gripper_joint_pos_indexes
        gv = robot._ref_gripper_joint_vel_indexes
        self.grip_qpos = np.array(gq["right"] if isinstance(gq, dict) else gq, dtype=np.int64)
        self.grip_qvel = np.array(gv["right"] if isinstance(gv, dict) else gv, dtype=np.int64)
        self.arm_act = np.array(robot._ref_actuators_indexes_dict["right"], dtype=np.int64)
        self.grip_act = np.array(robot._ref_actuators_indexes_dict["right_gripper"], dtype=np.int64)
        self.ctrl_qvel = np.array(robot.part_controllers["right"].qvel_index, dtype=np.int64)
        prefix = robot.robot_model.naming_prefix
        self.prefix = prefix

    def success(self, xpos: np.ndarray, eef_pos: np.ndarray) -> np.ndarray:
        """``(B,)`` bool from body positions ``xpos (B, nbody, 3)`` and eef site positions ``(B, 3)``."""
        if self.name == "Lift":
            return xpos[:, self.obj_body, 2] > self.table_z + 0.04
        count = np.zeros(xpos.shape[0], dtype=np.int64)
        for i, body in enumerate(self.all_bodies):
            pos = xpos[:, body]
            r_reach = 1 - np.tanh(10.0 * np.linalg.norm(eef_pos - pos, axis=1))
            if self.name == "PickPlaceCan":
                lo_x, lo_y = self.bin2_pos[0], self.bin2_pos[1]
                if i == 0 or i == 2:
                    lo_x -= self.bin_size[0] / 2
                if i < 2:
                    lo_y -= self.bin_size[1] / 2
                hi_x, hi_y = lo_x + self.bin_size[0] / 2, lo_y + self.bin_size[1] / 2
                placed = ((lo_x < pos[:, 0]) & (pos[:, 0] < hi_x) & (lo_y < pos[:, 1]) & (pos[:, 1] < hi_y)
                          & (self.bin2_pos[2] < pos[:, 2]) & (pos[:, 2] < self.bin2_pos[2] + 0.1))
            else:
                peg = xpos[:, self.peg_bodies[0 if i == 0 else 1]]
                placed = ((np.abs(pos[:, 0] - peg[:, 0]) < 0.03) & (np.abs(pos[:, 1] - peg[:, 1]) < 0.03)
                          & (pos[:, 2] < self.table_z + 0.05))
            count += (placed & (r_reach < 0.6)).astype(np.int64)
        if self.single > 0:
            return count > 0
        return count == len(self.all_bodies)

    def reward(self, success: np.ndarray) -> np.ndarray:
        """Sparse reward of robosuite's ``reward()`` for the state whose success is given."""
        if self.name == "Lift":
            r = np.where(success, 2.25, 0.0)
            return r * (self.reward_scale / 2.25) if self.reward_scale is not None else r
        r = success.astype(np.float64)  # one object in single-object mode: sum(objects placed) == success
        return r * self.reward_scale if self.reward_scale is not None else r


class MujocoSim:
    """One MjModel (robosuite's, for the task of ``env_args``) and ``n`` envs stepped as a batch.

    Args:
        env_args: robomimic env_args (already converted by :func:`dpft.envs.robosuite_env.convert_legacy_env_args`,
            without the ``backend`` key).

    Attributes:
        model: the MjModel (a copy of robosuite's after its first reset).
        datas: one MjData per env.
        rs: the robosuite env that builds the model and performs resets.
        params: :class:`dpft.envs.osc_batch.OSCParams`.
        nsub: physics substeps per env step (``control_timestep / model_timestep``).
    """

    def __init__(self, env_args: Dict[str, Any]):
        import mujoco
        from dpft.envs.robosuite_env import RobosuiteEnv

        # the robosuite env only builds the model, resets and draws frames: no camera observables
        kw = dict(env_args.get("env_kwargs") or {}, use_camera_obs=False, has_offscreen_renderer=False)
        self.oracle = RobosuiteEnv(dict(env_args, env_kwargs=kw))
        rs = self.oracle.env
        check_supported(rs)
        self.rs = rs
        self.spec = _TaskSpec(rs)
        self.params = osc.OSCParams.from_robosuite(rs.robots[0])
        self.model = copy.deepcopy(rs.sim.model._model)
        self.nsub = int(rs.control_timestep / rs.model_timestep)
        self.lite = bool(rs.lite_physics)
        self.datas = []  # type: List[Any]
        self._views = []  # type: List[Tuple[Any, ...]]
        self._free = []  # type: List[int]
        #: per env: the arm controller's cached state robosuite uses on the first substep after a reset (see
        #: :meth:`copy_from_robosuite`), or None
        self.stale = []  # type: List[Optional[Dict[str, np.ndarray]]]
        self.q0 = np.zeros((0, len(self.spec.arm_qpos)))
        self.grip = np.zeros((0, 2))
        self._state_spec = mujoco.mjtState.mjSTATE_INTEGRATION
        self._state_size = mujoco.mj_stateSize(self.model, self._state_spec)
        m = self.model
        base_body = int(m.site_bodyid[self.spec.base_site])
        self._base_fixed = int(m.body_weldid[base_body]) == 0  # welded to the world: zero velocity
        self.object_dim = 10 if self.spec.name == "Lift" else 14
        #: numba-compiled torque law (CPU fast path) where numba is installed and the robot base is fixed
        self.fast = self._base_fixed and osc.numba_available()
        self.quat_ops = osc.robosuite_quat_ops()  # robosuite's float32 quaternion helpers, row by row (exact)

    # -- envs ----------------------------------------------------------------------------------------------------
    def add_env(self) -> int:
        """A new env (or a released one's slot, reset to the model's initial state); returns its index."""
        import mujoco

        if self._free:
            i = self._free.pop(0)
            mujoco.mj_resetData(self.model, self.datas[i])
            self.q0[i] = 0.0
            self.grip[i] = 0.0
            self.stale[i] = None
            return i
        d = mujoco.MjData(self.model)
        self.datas.append(d)
        # numpy views into the MjData's buffers (fixed for its lifetime): reading them costs no attribute lookups
        self._views.append((d, d.qpos, d.qvel, d.qfrc_bias, d.site_xpos, d.site_xmat, d.qM, d.ctrl))
        self.stale.append(None)
        self.q0 = np.concatenate([self.q0, np.zeros((1, self.q0.shape[1]))])
        self.grip = np.concatenate([self.grip, np.zeros((1, 2))])
        return len(self.datas) - 1

    def release(self, i: int) -> None:
        """Env ``i`` is no longer used (its slot is reused by the next :meth:`add_env`)."""
        if i not in self._free:
            self._free.append(i)
            self._free.sort()

    def reset(self, i: int, seed: Optional[int]) -> None:
        """robosuite's reset (seeded as RobosuiteEnv.reset) copied into env ``i``."""
        self.oracle.reset(seed=seed)
        self.copy_from_robosuite(i)

    def copy_from_robosuite(self, i: int) -> None:
        """Env ``i`` takes the robosuite env's current MuJoCo integration state and controller state."""
        import mujoco

        rs = self.rs
        buf = np.empty(self._state_size)
        mujoco.mj_getState(rs.sim.model._model, rs.sim.data._data, buf, self._state_spec)
        self.set_state(i, buf)
        robot = rs.robots[0]
        self.q0[i] = np.asarray(robot.part_controllers["right"].initial_joint, dtype=np.float64)
        self.grip[i] = np.asarray(robot.gripper["right"].current_action, dtype=np.float64)
        self.stale[i] = controller_cache(robot.part_controllers["right"])

    def set_state(self, i: int, state: np.ndarray) -> None:
        import mujoco

        d = self.datas[i]
        mujoco.mj_resetData(self.model, d)
        mujoco.mj_setState(self.model, d, np.asarray(state, dtype=np.float64), self._state_spec)
        mujoco.mj_forward(self.model, d)

    def get_state(self, i: int) -> np.ndarray:
        import mujoco

        buf = np.empty(self._state_size)
        mujoco.mj_getState(self.model, self.datas[i], buf, self._state_spec)
        return buf

    # -- stepping ------------------------------------------------------------------------------------------------
    def prestep(self, envs: Sequence[Any], chunks: Sequence[np.ndarray]) -> None:
        prestep_group(envs, chunks)

    #: envs stepped together through all substeps; more are stepped in consecutive groups of this size (their
    #: MjData stay in the CPU caches across the substeps: measured fastest at 8-16 envs)
    group_size = 16

    def step(self, idx: Sequence[int], actions: np.ndarray) -> Dict[str, np.ndarray]:
        """Advance envs ``idx`` by one env step with ``actions (k, 7)``; returns :meth:`observe` of them plus
        ``"reward" (k,)``, ``"success" (k,)`` and ``"finite" (k,)`` (physics state finite)."""
        idx = [int(i) for i in idx]
        a = np.asarray(actions, dtype=np.float64).reshape(len(idx), -1)
        g = int(self.group_size)
        if len(idx) <= g:
            return self._step_group(idx, a)
        parts = [self._step_group(idx[s:s + g], a[s:s + g]) for s in range(0, len(idx), g)]
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

    def _step_group(self, idx: List[int], a: np.ndarray) -> Dict[str, np.ndarray]:
        import mujoco

        m = self.model
        sp = self.spec
        p = self.params
        datas = [self.datas[i] for i in idx]
        k = len(datas)
        nv = m.nv
        qpos = np.empty((k, m.nq))
        qvel = np.empty((k, nv))
        bias = np.empty((k, nv))
        sxpos = np.empty((k, m.nsite, 3))
        sxmat = np.empty((k, m.nsite, 9))
        jac = np.empty((k, 6, nv))
        full_m = np.empty((k, nv, nv))
        ctrl = np.zeros((k, m.nu))
        q0 = self.q0[idx]
        grip, grip_ctrl = osc.gripper_command(self.grip[idx], a[:, 6], p)
        self.grip[idx] = grip
        cq, cv = sp.ctrl_qvel, sp.arm_qvel
        goal_pos = goal_ori = None
        eef, base = sp.eef_site, sp.base_site
        # MuJoCo replaces a non-finite state by the model's reference state (and counts a warning): a diverged
        # step is detected from those counters, not from NaNs
        bad = [int(mujoco.mjtWarning.mjWARN_BADQPOS), int(mujoco.mjtWarning.mjWARN_BADQVEL),
               int(mujoco.mjtWarning.mjWARN_BADQACC)]
        warn0 = [sum(d.warning[w].number for w in bad) for d in datas]
        # lite_physics (robosuite 1.5's default): step1 -> controller -> step2; otherwise robosuite calls forward,
        # the controller, then a full mj_step (same torques: both compute the controller's inputs the same way)
        first, second = (mujoco.mj_step1, mujoco.mj_step2) if self.lite else (mujoco.mj_forward, mujoco.mj_step)
        ctrl[:, sp.grip_act] = grip_ctrl
        arm_act = sp.arm_act
        views = [self._views[i] for i in idx]
        jac_site, full_mass = mujoco.mj_jacSite, mujoco.mj_fullM
        jacp = [jac[j, 0:3] for j in range(k)]
        jacr = [jac[j, 3:6] for j in range(k)]
        stale = [(j, self.stale[i]) for j, i in enumerate(idx) if self.stale[i] is not None]
        for j, i in enumerate(idx):
            self.stale[i] = None
        for sub in range(self.nsub):
            for j, (d, vq, vv, vb, vsp, vsm, vm, _) in enumerate(views):
                first(m, d)
                qpos[j] = vq
                qvel[j] = vv
                bias[j] = vb
                sxpos[j] = vsp
                sxmat[j] = vsm
                jac_site(m, d, jacp[j], jacr[j], eef)
                full_mass(m, full_m[j], vm)
            if sub == 0:
                for j, cache in stale:  # robosuite's first substep after a reset reads its controller's cache
                    qpos[j, sp.arm_qpos] = cache["joint_pos"]
                    qvel[j] = 0.0
                    qvel[j, cq] = cache["joint_vel"]
                    sxpos[j, eef] = cache["ref_pos"]
                    sxmat[j, eef] = cache["ref_ori_mat"].reshape(9)
                    jac[j] = 0.0
                    jac[j][:, cq] = cache["J_full"]
                    full_m[j][np.ix_(cq, cq)] = cache["mass_matrix"]
            eef_pos = sxpos[:, eef]
            eef_mat = sxmat[:, eef].reshape(k, 3, 3)
            base_pos = sxpos[:, base]
            base_mat = sxmat[:, base].reshape(k, 3, 3)
            if sub == 0:
                goal_pos, goal_ori = osc.osc_goal(a[:, 0:6], eef_pos, eef_mat, base_pos, base_mat, p,
                                                ops=self.quat_ops)
            if self.fast:
                tau = osc.osc_torques_fast(goal_pos, goal_ori, eef_pos, eef_mat, base_pos, base_mat, jac, qvel,
                                           full_m, bias, qpos, q0, cq, sp.arm_qpos, p)
                ctrl[:, arm_act] = tau
                for j, view in enumerate(views):
                    view[7][:] = ctrl[j]
                    second(m, view[0])
                continue
            eef_vel = np.matmul(jac, qvel[:, :, None])[:, :, 0]
            if self._base_fixed:
                base_vel = np.zeros((k, 6))
            else:
                bj = np.empty((k, 6, nv))
                for j, d in enumerate(datas):
                    mujoco.mj_jacSite(m, d, bj[j, 0:3], bj[j, 3:6], base)
                base_vel = np.matmul(bj, qvel[:, :, None])[:, :, 0]
            arm_jac = jac[:, :, cq]
            mass = full_m[:, cq][:, :, cq]
            tau = osc.osc_torques(goal_pos, goal_ori, eef_pos, eef_mat, eef_vel, base_pos, base_mat, base_vel,
                                  arm_jac, mass, bias[:, cq], qpos[:, sp.arm_qpos], qvel[:, cv], q0, p)
            ctrl[:, arm_act] = tau
            for j, d in enumerate(datas):
                d.ctrl[:] = ctrl[j]
                second(m, d)
        finite = np.ones(k, dtype=bool)
        for j, d in enumerate(datas):
            mujoco.mj_forward(m, d)
            finite[j] = (np.isfinite(d.qpos).all() and np.isfinite(d.qvel).all()
                         and sum(d.warning[w].number for w in bad) == warn0[j])
        out = self.observe(idx)
        out["finite"] = finite
        return out

    def observe(self, idx: Sequence[int]) -> Dict[str, np.ndarray]:
        """Observations (robomimic keys, float64), ``"success"`` and ``"reward"`` of envs ``idx`` in their current
        (refreshed) state."""
        m = self.model
        sp = self.spec
        datas = [self.datas[int(i)] for i in idx]
        k = len(datas)
        qpos = np.empty((k, m.nq))
        qvel = np.empty((k, m.nv))
        qacc = np.empty((k, m.nv))
        xpos = np.empty((k, m.nbody, 3))
        xquat = np.empty((k, m.nbody, 4))
        sxpos = np.empty((k, 3))
        sxmat = np.empty((k, 9))
        for j, d in enumerate(datas):
            qpos[j] = d.qpos
            qvel[j] = d.qvel
            qacc[j] = d.qacc
            xpos[j] = d.xpos
            xquat[j] = d.xquat
            sxpos[j] = d.site_xpos[sp.eef_site]
            sxmat[j] = d.site_xmat[sp.eef_site]
        pf = sp.prefix
        jp = qpos[:, sp.arm_qpos]
        eef_quat = xquat[:, sp.eef_body][:, [1, 2, 3, 0]]
        obs = {
            pf + "joint_pos": jp,
            pf + "joint_pos_cos": np.cos(jp),
            pf + "joint_pos_sin": np.sin(jp),
            pf + "joint_vel": qvel[:, sp.arm_qvel],
            pf + "joint_acc": qacc[:, sp.arm_qvel],
            pf + "eef_pos": sxpos,
            pf + "eef_quat": eef_quat,
            pf + "eef_quat_site": self.quat_ops[1](sxmat.reshape(k, 3, 3)).astype(np.float64),
            pf + "gripper_qpos": qpos[:, sp.grip_qpos],
            pf + "gripper_qvel": qvel[:, sp.grip_qvel],
        }  # type: Dict[str, np.ndarray]
        obj_pos = xpos[:, sp.obj_body]
        obj_quat = xquat[:, sp.obj_body][:, [1, 2, 3, 0]]
        if sp.name == "Lift":
            obs["object"] = np.concatenate([obj_pos, obj_quat, obj_pos - sxpos], axis=1)
        else:
            rel_pos, rel_quat = osc.rel_pose(obj_pos, obj_quat, sxpos, eef_quat, ops=self.quat_ops)
            obs["object"] = np.concatenate([rel_pos, rel_quat, obj_pos, obj_quat], axis=1)  # robosuite's order
        success = sp.success(xpos, sxpos)
        obs["success"] = success
        obs["reward"] = sp.reward(success)
        return obs


# ------------------------------------------------------------------------------------------------------------------
# single-env view and the process-wide pool
# ------------------------------------------------------------------------------------------------------------------

_POOL = {}  # type: Dict[str, MujocoSim]


def _pool_key(env_args: Dict[str, Any]) -> str:
    return json.dumps(env_args, sort_keys=True, default=str)


def shared_sim(env_args: Dict[str, Any]) -> MujocoSim:
    """The process's :class:`MujocoSim` for ``env_args`` (built on first use)."""
    key = _pool_key(env_args)
    sim = _POOL.get(key)
    if sim is None:
        sim = MujocoSim(env_args)
        _POOL[key] = sim
    return sim


class _DataView:
    """MjData with robosuite's aliases (``body_xpos``, ``body_xmat``, ``body_xquat``)."""

    _ALIASES = {"body_xpos": "xpos", "body_xmat": "xmat", "body_xquat": "xquat"}

    def __init__(self, data: Any):
        self._data = data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._data, self._ALIASES.get(name, name))


class _RawView:
    """What scripted experts read (``env.sim.data``, ``env.robots``, task attributes): the robosuite env's attributes
    with ``sim.data`` replaced by this env's MjData."""

    def __init__(self, rs: Any, data: Any, model: Any):
        import types

        import mujoco

        self._rs = rs
        self.sim = types.SimpleNamespace(data=_DataView(data), model=rs.sim.model,
                                         forward=lambda: mujoco.mj_forward(model, data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._rs, name)


class MujocoEnv(Env):
    """One env of the fast backend (see the module docstring); same arguments as
    :class:`dpft.envs.robosuite_env.RobosuiteEnv` (``render=True`` and image keys are refused)."""

    def __init__(self, env_args: Dict[str, Any], obs_keys: Optional[List[str]] = None,
                 max_episode_steps: Optional[int] = None, terminate_on_success: bool = False,
                 render_size: int = 256, render_camera: str = "agentview", render: bool = False):
        from dpft.envs.robosuite_env import DEFAULT_MAX_EPISODE_STEPS, convert_legacy_env_args

        _, args = split_backend(env_args)
        args = convert_legacy_env_args(args)
        if args["env_name"] not in SUPPORTED_TASKS:
            raise _unsupported("the task {}".format(args["env_name"]))
        if obs_keys is not None:
            images = [k for k in obs_keys if str(k).endswith("_image")]
            if images:
                raise _unsupported("camera observations ({})".format(", ".join(images)))
        self.env_name = args["env_name"]
        self.env_args = dict(args, env_kwargs=dict(args["env_kwargs"], backend="mujoco"))
        self.sim = shared_sim(args)
        self.index = self.sim.add_env()
        # named like the robosuite task class, so code that checks the task by class name (scripted experts) works
        view_cls = type(type(self.sim.rs).__name__, (_RawView,), {})
        self.env = view_cls(self.sim.rs, self.sim.datas[self.index], self.sim.model)
        self.max_episode_steps = int(max_episode_steps or DEFAULT_MAX_EPISODE_STEPS[self.env_name])
        if self.max_episode_steps < 1:
            raise DpftError("max_episode_steps must be >= 1, got {!r}.".format(max_episode_steps))
        self.terminate_on_success = bool(terminate_on_success)
        self.render_size = int(render_size)
        self.render_camera = render_camera
        self.action_dim = 7
        self.action_low = -np.ones(7)
        self.action_high = np.ones(7)
        self.sim.reset(self.index, 0)
        first = self._obs_all(self.sim.observe([self.index]))
        if obs_keys is None:
            obs_keys = list(first)
        missing = [k for k in obs_keys if k not in first]
        if missing:
            raise DpftError("Observation key(s) {} are not produced by the mujoco backend ({}); available keys: "
                            "{}.".format(", ".join(repr(k) for k in missing), self.env_name, ", ".join(first)))
        self.obs_keys = list(obs_keys)
        self.obs_shapes = {k: tuple(first[k].shape) for k in self.obs_keys}
        self.obs_dtypes = {k: first[k].dtype for k in self.obs_keys}
        self.elapsed_steps = 0
        self._has_reset = False
        self._queue = []  # type: List[Tuple[np.ndarray, Tuple[ObsDict, float, bool, bool, Dict[str, Any]]]]

    # -- observations --------------------------------------------------------------------------------------------
    @staticmethod
    def _obs_all(batch: Dict[str, np.ndarray], j: int = 0) -> ObsDict:
        return {k: v[j] for k, v in batch.items() if k not in ("success", "reward", "finite")}

    def get_observation(self) -> ObsDict:
        full = self._obs_all(self.sim.observe([self.index]))
        return {k: full[k] for k in self.obs_keys}

    def reset(self, seed: Optional[int] = None) -> ObsDict:
        if seed is not None:
            if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or int(seed) < 0:
                raise DpftError("reset(seed=...) needs a non-negative integer seed, got {!r}.".format(seed))
        self._queue = []
        self.sim.reset(self.index, None if seed is None else int(seed))
        self.elapsed_steps = 0
        self._has_reset = True
        return self.get_observation()

    def _result(self, batch: Dict[str, np.ndarray], j: int) -> Tuple[ObsDict, float, bool, bool, Dict[str, Any]]:
        self.elapsed_steps += 1
        full = self._obs_all(batch, j)
        obs = {k: full[k] for k in self.obs_keys}
        success = bool(batch["success"][j])
        reward = float(batch["reward"][j])
        if not batch["finite"][j]:
            reward = float("nan")  # the vector env cuts the episode (as for a diverged robosuite env)
        terminated = bool(self.terminate_on_success and success)
        truncated = self.elapsed_steps >= self.max_episode_steps
        return obs, reward, terminated, truncated, {"success": success}

    def step(self, action: np.ndarray) -> Tuple[ObsDict, float, bool, bool, Dict[str, Any]]:
        a = self._checked_action(action)
        if self._queue:
            want, result = self._queue.pop(0)
            if np.array_equal(want, a):
                return result
            self._queue = []
            raise DpftError("MujocoEnv: a pre-stepped action differs from the one given; this is a bug in the "
                            "caller of prestep_group.")
        return self._result(self.sim.step([self.index], a[None]), 0)

    def is_success(self) -> bool:
        return bool(self.sim.observe([self.index])["success"][0])

    # -- state ---------------------------------------------------------------------------------------------------
    def get_state(self) -> np.ndarray:
        """Flattened MuJoCo state ``(1 + nq + nv,)`` = (time, qpos, qvel), as robomimic's ``states``."""
        d = self.sim.datas[self.index]
        return np.concatenate([[d.time], d.qpos, d.qvel])

    def set_full_state(self, state: np.ndarray, initial_joint: np.ndarray, gripper_action: np.ndarray,
                       cache: Optional[Dict[str, np.ndarray]] = None) -> ObsDict:
        """Set the MuJoCo integration state (``mj_getState(..., mjSTATE_INTEGRATION)``) and controller state
        (nullspace target joints, gripper command ramp, :func:`controller_cache`) -- for parity checks."""
        self.sim.set_state(self.index, state)
        self.sim.q0[self.index] = initial_joint
        self.sim.grip[self.index] = gripper_action
        self.sim.stale[self.index] = cache
        self._has_reset = True
        self._queue = []
        return self.get_observation()

    def reset_to(self, state: Any, model_xml: Optional[str] = None) -> ObsDict:
        """Start from a robomimic ``states`` row (via robosuite's :meth:`RobosuiteEnv.reset_to`, then copied)."""
        if model_xml is not None or isinstance(state, dict):
            raise _unsupported("reset_to with a model xml")
        self.sim.oracle.reset_to(state)
        self.sim.copy_from_robosuite(self.index)
        self.elapsed_steps = 0
        self._has_reset = True
        self._queue = []
        return self.get_observation()

    # -- rendering -----------------------------------------------------------------------------------------------
    def camera_names(self) -> List[str]:
        import mujoco

        return [mujoco.mj_id2name(self.sim.model, mujoco.mjtObj.mjOBJ_CAMERA, i) for i in range(self.sim.model.ncam)]

    def render(self, height: Optional[int] = None, width: Optional[int] = None,
               camera: Optional[str] = None) -> np.ndarray:
        """RGB frame ``(height, width, 3)`` uint8, upright: this env's state drawn by robosuite's own offscreen
        renderer (the in-process robosuite env takes the state first), so frames equal the robosuite backend's."""
        import mujoco

        rs = self.sim.rs
        mujoco.mj_setState(rs.sim.model._model, rs.sim.data._data, self.sim.get_state(self.index),
                           self.sim._state_spec)
        mujoco.mj_forward(rs.sim.model._model, rs.sim.data._data)
        return self.sim.oracle.render(height if height is not None else self.render_size,
                                      width if width is not None else self.render_size,
                                      camera if camera is not None else self.render_camera)

    @property
    def prestep_group(self) -> Any:
        """Batched chunk stepping for envs sharing this env's simulator (see :func:`prestep_group`)."""
        return self.sim.prestep

    def clear_prestep(self) -> None:
        self._queue = []

    def close(self) -> None:
        if not getattr(self, "_released", False):
            self._released = True
            self.sim.release(self.index)


def prestep_group(envs: Sequence[MujocoEnv], chunks: Sequence[np.ndarray]) -> None:
    """Step the action chunks ``chunks[i] (T, 7)`` of ``envs`` (sharing one :class:`MujocoSim`) in lockstep, each
    env until its episode ends (terminated, truncated or non-finite), and queue the results; the envs' following
    :meth:`MujocoEnv.step` calls with the same actions return them. One batched controller computation per substep."""
    if not envs:
        return
    sim = envs[0].sim
    live = list(range(len(envs)))
    t = 0
    for e in envs:
        e._queue = []
    while live:
        live = [i for i in live if t < len(chunks[i])]
        if not live:
            break
        acts = np.stack([np.asarray(chunks[i][t], dtype=np.float64) for i in live])
        batch = sim.step([envs[i].index for i in live], acts)
        keep = []
        for j, i in enumerate(live):
            e = envs[i]
            res = e._result(batch, j)
            e._queue.append((acts[j], res))
            obs, r, term, trunc, _ = res
            bad = (not np.isfinite(r)) or any(v.dtype.kind == "f" and not np.isfinite(v).all() for v in obs.values())
            if not (term or trunc or bad):
                keep.append(i)
        live = keep
        t += 1


# ------------------------------------------------------------------------------------------------------------------
# parity against robosuite (used by the tests and tools/bench_backend_parity.py)
# ------------------------------------------------------------------------------------------------------------------


def one_step_parity(task: str, seeds: Sequence[int], noise: float, steps: int) -> Dict[str, Any]:
    """Drive robosuite with the scripted expert of ``task`` and, before every step, copy robosuite's MuJoCo and
    controller state into a fast env; step both with the same action and compare.

    Returns ``{"max_err": {key: max |fast - robosuite|}, "steps", "mismatch": [(seed, t, what)], "ill": n}`` where
    keys are ``qpos``, ``qvel`` and every observation key; reward is robosuite's ``reward()`` on the refreshed state
    (the sparse reward at the state success is judged on). A step whose error exceeds 1e-6 counts as ill-conditioned
    (``ill``) when perturbing robosuite's state by 1e-12 (qpos[0]) moves the fast backend's next state at least a
    tenth as much: there the contact solution itself is not determined to 1e-6 (a grasped object's spin), and such
    steps are reported apart (``max_err_ill``) instead of in ``max_err``.
    """
    import mujoco
    from dpft.envs.experts import EXPERTS
    from dpft.envs.robosuite_env import RobosuiteEnv, default_env_args

    args = default_env_args(task)
    rs = RobosuiteEnv(args)
    fast = MujocoEnv(dict(args, env_kwargs=dict(args["env_kwargs"], backend="mujoco")))
    spec = mujoco.mjtState.mjSTATE_INTEGRATION
    m = rs.env.sim.model._model
    buf = np.empty(mujoco.mj_stateSize(m, spec))
    err = {}  # type: Dict[str, float]
    err_ill = {}  # type: Dict[str, float]
    mismatch = []  # type: List[Tuple[int, int, str]]
    n = ill = 0
    try:
        for seed in seeds:
            rs.reset(seed=int(seed))
            expert = EXPERTS[task.lower()](noise=noise)
            expert.reset(rs, rng=np.random.default_rng(int(seed)))
            for t in range(int(steps)):
                a = expert.act(rs)
                mujoco.mj_getState(m, rs.env.sim.data._data, buf, spec)
                robot = rs.env.robots[0]
                q0 = np.array(robot.part_controllers["right"].initial_joint)
                grip = np.array(robot.gripper["right"].current_action)
                cache = controller_cache(robot.part_controllers["right"])
                fast.set_full_state(buf, q0, grip, cache)
                o_rs, _, _, _, i_rs = rs.step(a)
                r_rs = float(rs.env.reward(a))
                o_f, r_f, _, _, i_f = fast.step(a)
                d_rs, d_f = rs.env.sim.data, fast.sim.datas[fast.index]
                cur = {"qpos": float(np.abs(d_rs.qpos - d_f.qpos).max()),
                       "qvel": float(np.abs(d_rs.qvel - d_f.qvel).max())}
                for k in o_rs:
                    cur[k] = float(np.abs(np.asarray(o_rs[k], dtype=np.float64) - o_f[k]).max())
                target = err
                if max(cur.values()) > 1e-6:
                    ref = np.concatenate([d_f.qpos, d_f.qvel])
                    pert = buf.copy()
                    pert[1] += 1e-12
                    fast.set_full_state(pert, q0, grip, cache)
                    fast.step(a)
                    d_f = fast.sim.datas[fast.index]
                    sens = float(np.abs(np.concatenate([d_f.qpos, d_f.qvel]) - ref).max())
                    if sens >= 0.1 * max(cur["qpos"], cur["qvel"]):
                        ill += 1
                        target = err_ill
                for k, v in cur.items():
                    target[k] = max(target.get(k, 0.0), v)
                if r_rs != r_f or bool(i_rs["success"]) != bool(i_f["success"]):
                    mismatch.append((int(seed), t, "reward {} vs {}, success {} vs {}".format(
                        r_rs, r_f, i_rs["success"], i_f["success"])))
                n += 1
                if expert.done:
                    break
    finally:
        rs.close()
    return {"max_err": err, "max_err_ill": err_ill, "steps": n, "ill": ill, "mismatch": mismatch}


def reset_parity(task: str, seeds: Sequence[int]) -> float:
    """Max |fast - robosuite| over the initial MuJoCo state (qpos, qvel) and observations for ``seeds``."""
    from dpft.envs.robosuite_env import RobosuiteEnv, default_env_args

    args = default_env_args(task)
    rs = RobosuiteEnv(args)
    fast = MujocoEnv(dict(args, env_kwargs=dict(args["env_kwargs"], backend="mujoco")))
    worst = 0.0
    try:
        for seed in seeds:
            o_rs = rs.reset(seed=int(seed))
            o_f = fast.reset(seed=int(seed))
            d_rs, d_f = rs.env.sim.data, fast.sim.datas[fast.index]
            worst = max(worst, float(np.abs(d_rs.qpos - d_f.qpos).max()), float(np.abs(d_rs.qvel - d_f.qvel).max()))
            for k in o_rs:
                worst = max(worst, float(np.abs(np.asarray(o_rs[k], dtype=np.float64) - o_f[k]).max()))
    finally:
        rs.close()
    return worst
