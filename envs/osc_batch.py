"""robosuite 1.5's BASIC composite controller for a Panda (OSC_POSE arm + Panda gripper) as batched array math.

Every function takes arrays with a leading batch dimension ``B`` (one row per env) and reproduces, operation by
operation, what robosuite computes for one env (``controllers/parts/arm/osc.py``, ``controllers/parts/controller.py``,
``controllers/parts/gripper/simple_grip.py``, ``models/grippers/panda_gripper.py``, ``utils/control_utils.py``,
``utils/transform_utils.py``), including the float32 round trips of robosuite's quaternion helpers.

The math is written against an array namespace ``xp`` (numpy by default); :func:`torch_namespace` gives the torch
twin, so the same functions drive a GPU-batched physics engine (tests check both give the same numbers).

Shapes: ``pos (B, 3)``, ``mat (B, 3, 3)``, ``jac (B, 6, n)`` (translation rows first), ``mass (B, n, n)``,
``q, qd (B, n)``, ``action (B, 7)``.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import numpy as np


class _NumpyOps:
    """The few array operations the controller needs, numpy flavour."""

    name = "numpy"
    float32 = np.float32
    float64 = np.float64

    @staticmethod
    def asarray(x: Any, dtype: Any = None) -> Any:
        return np.asarray(x, dtype=dtype)

    @staticmethod
    def cast(x: Any, dtype: Any) -> Any:
        return x.astype(dtype)

    clip = staticmethod(np.clip)
    sign = staticmethod(np.sign)
    sqrt = staticmethod(np.sqrt)
    sin = staticmethod(np.sin)
    cos = staticmethod(np.cos)
    cross = staticmethod(np.cross)
    matmul = staticmethod(np.matmul)
    inv = staticmethod(np.linalg.inv)
    pinv = staticmethod(np.linalg.pinv)
    eigh = staticmethod(np.linalg.eigh)
    stack = staticmethod(np.stack)
    concatenate = staticmethod(np.concatenate)
    where = staticmethod(np.where)
    zeros = staticmethod(np.zeros)
    eye = staticmethod(np.eye)

    @staticmethod
    def norm(x: Any) -> Any:
        return np.linalg.norm(x, axis=-1)

    @staticmethod
    def swap(x: Any) -> Any:
        return np.swapaxes(x, -1, -2)

    @staticmethod
    def argmax(x: Any) -> Any:
        return np.argmax(x, axis=-1)

    @staticmethod
    def take_col(v: Any, idx: Any) -> Any:
        """``v[b, :, idx[b]]`` for a batch of matrices ``v (B, 4, 4)``."""
        return np.take_along_axis(v, idx[:, None, None], axis=2)[:, :, 0]


NUMPY = _NumpyOps()


def torch_namespace(device: Any = "cpu") -> Any:
    """The torch twin of :data:`NUMPY` (float64 tensors on ``device``)."""
    import torch

    class _TorchOps:
        name = "torch"
        float32 = torch.float32
        float64 = torch.float64

        @staticmethod
        def asarray(x: Any, dtype: Any = None) -> Any:
            return torch.as_tensor(x, dtype=dtype or torch.float64, device=device)

        @staticmethod
        def cast(x: Any, dtype: Any) -> Any:
            return x.to(dtype)

        @staticmethod
        def clip(x: Any, lo: Any, hi: Any) -> Any:
            lo = torch.as_tensor(lo, dtype=x.dtype, device=x.device)
            hi = torch.as_tensor(hi, dtype=x.dtype, device=x.device)
            return torch.minimum(torch.maximum(x, lo), hi)

        sign = staticmethod(torch.sign)
        sqrt = staticmethod(torch.sqrt)
        sin = staticmethod(torch.sin)
        cos = staticmethod(torch.cos)

        @staticmethod
        def cross(a: Any, b: Any) -> Any:
            return torch.linalg.cross(a, b, dim=-1)

        matmul = staticmethod(torch.matmul)
        inv = staticmethod(torch.linalg.inv)
        pinv = staticmethod(torch.linalg.pinv)
        eigh = staticmethod(torch.linalg.eigh)
        stack = staticmethod(torch.stack)

        @staticmethod
        def concatenate(xs: Any, axis: int = 0) -> Any:
            return torch.cat(list(xs), dim=axis)

        where = staticmethod(torch.where)

        @staticmethod
        def zeros(shape: Any, dtype: Any = None) -> Any:
            return torch.zeros(shape, dtype=dtype or torch.float64, device=device)

        @staticmethod
        def eye(n: int, dtype: Any = None) -> Any:
            return torch.eye(n, dtype=dtype or torch.float64, device=device)

        @staticmethod
        def norm(x: Any) -> Any:
            return torch.linalg.norm(x, dim=-1)

        @staticmethod
        def swap(x: Any) -> Any:
            return x.transpose(-1, -2)

        @staticmethod
        def argmax(x: Any) -> Any:
            return torch.argmax(x, dim=-1)

        @staticmethod
        def take_col(v: Any, idx: Any) -> Any:
            return torch.gather(v, 2, idx[:, None, None].expand(v.shape[0], v.shape[1], 1))[:, :, 0]

    return _TorchOps()


# ------------------------------------------------------------------------------------------------------------------
# robosuite's transform helpers, batched (utils/transform_utils.py; numba-compiled there, float32 inside)
# ------------------------------------------------------------------------------------------------------------------


def axisangle2quat(vec: Any, xp: Any = NUMPY) -> Any:
    """``(B, 3)`` axis-angle -> ``(B, 4)`` xyzw quaternion; ``[0, 0, 0, 1]`` where the angle is ~0
    (robosuite uses ``math.isclose(angle, 0.0)``, i.e. exactly 0 since its abs_tol is 0)."""
    angle = xp.norm(vec)
    zero = angle == 0.0
    safe = xp.where(zero, xp.asarray(1.0), angle)
    axis = vec / safe[:, None]
    q = xp.concatenate([axis * xp.sin(safe / 2.0)[:, None], xp.cos(safe / 2.0)[:, None]], axis=1)
    ident = xp.zeros(q.shape, dtype=q.dtype)
    ident[:, 3] = 1.0
    return xp.where(zero[:, None], ident, q)


def quat2mat(quat: Any, xp: Any = NUMPY) -> Any:
    """``(B, 4)`` xyzw -> ``(B, 3, 3)`` float64 holding robosuite's float32 result (quaternions of norm ~1)."""
    q = xp.cast(quat, xp.float32)[:, [3, 0, 1, 2]]
    n = xp.matmul(q[:, None, :], q[:, :, None])[:, 0, 0]  # BLAS sdot order, as np.dot
    # numba: q *= math.sqrt(2.0 / n) computes in float64 and stores float32
    q = xp.cast(xp.cast(q, xp.float64) * xp.sqrt(2.0 / xp.cast(n, xp.float64))[:, None], xp.float32)
    q2 = q[:, :, None] * q[:, None, :]  # float32 outer product
    d = xp.cast(q2, xp.float64)  # "1.0 - q2[i, i] - q2[j, j]" promotes to float64; off-diagonal sums stay float32

    def off(a: Any) -> Any:
        return xp.cast(a, xp.float64)

    r0 = xp.stack([1.0 - d[:, 2, 2] - d[:, 3, 3], off(q2[:, 1, 2] - q2[:, 3, 0]), off(q2[:, 1, 3] + q2[:, 2, 0])], 1)
    r1 = xp.stack([off(q2[:, 1, 2] + q2[:, 3, 0]), 1.0 - d[:, 1, 1] - d[:, 3, 3], off(q2[:, 2, 3] - q2[:, 1, 0])], 1)
    r2 = xp.stack([off(q2[:, 1, 3] - q2[:, 2, 0]), off(q2[:, 2, 3] + q2[:, 1, 0]), 1.0 - d[:, 1, 1] - d[:, 2, 2]], 1)
    return xp.stack([r0, r1, r2], 1)


def mat2quat(mat: Any, xp: Any = NUMPY) -> Any:
    """``(B, 3, 3)`` rotation -> ``(B, 4)`` xyzw quaternion with w >= 0 (robosuite's eigenvector method, float32)."""
    m = xp.cast(mat, xp.float32)
    m00, m01, m02 = m[:, 0, 0], m[:, 0, 1], m[:, 0, 2]
    m10, m11, m12 = m[:, 1, 0], m[:, 1, 1], m[:, 1, 2]
    m20, m21, m22 = m[:, 2, 0], m[:, 2, 1], m[:, 2, 2]
    z = m00 * 0.0
    k = xp.stack([
        xp.stack([m00 - m11 - m22, z, z, z], 1),
        xp.stack([m01 + m10, m11 - m00 - m22, z, z], 1),
        xp.stack([m02 + m20, m12 + m21, m22 - m00 - m11, z], 1),
        xp.stack([m21 - m12, m02 - m20, m10 - m01, m00 + m11 + m22], 1),
    ], 1) / 3.0
    w, v = xp.eigh(k)  # lower triangle, as numpy's eigh (UPLO='L') in robosuite
    q1 = xp.take_col(v, xp.argmax(w))[:, [3, 0, 1, 2]]
    q1 = xp.where((q1[:, 0] < 0.0)[:, None], -q1, q1)
    return q1[:, [1, 2, 3, 0]]


def robosuite_quat_ops() -> Tuple[Any, Any]:
    """``(quat2mat, mat2quat)`` batched over rows with robosuite's own (numba-compiled) functions: bit-identical to
    robosuite, at ~1 us per row; the batched float32 twins above agree to float32 rounding (~4e-7)."""
    import robosuite.utils.transform_utils as T

    def q2m(q: Any, xp: Any = NUMPY) -> Any:
        return np.stack([T.quat2mat(row) for row in np.asarray(q)])

    def m2q(m: Any, xp: Any = NUMPY) -> Any:
        return np.stack([T.mat2quat(row) for row in np.asarray(m)])

    return q2m, m2q


def orientation_error(desired: Any, current: Any, xp: Any = NUMPY) -> Any:
    """robosuite's ``orientation_error`` for ``(B, 3, 3)`` matrices -> ``(B, 3)``."""
    c, d = current, desired

    def cross(i: int) -> Any:  # cross(c[:, :, i], d[:, :, i]) written out (np.cross costs ~10x more on small rows)
        return xp.stack([c[:, 1, i] * d[:, 2, i] - c[:, 2, i] * d[:, 1, i],
                         c[:, 2, i] * d[:, 0, i] - c[:, 0, i] * d[:, 2, i],
                         c[:, 0, i] * d[:, 1, i] - c[:, 1, i] * d[:, 0, i]], 1)

    return 0.5 * (cross(0) + cross(1) + cross(2))


def rel_pose(obj_pos: Any, obj_quat: Any, eef_pos: Any, eef_quat: Any, xp: Any = NUMPY,
             ops: Optional[Tuple[Any, Any]] = None) -> Tuple[Any, Any]:
    """Object pose in the gripper frame as robosuite's ``<obj>_to_<robot>eef_pos/quat`` sensors compute it
    (``pose_inv(pose2mat(eef)) @ pose2mat(obj)`` with float32 pose matrices). Returns ``(pos (B, 3), quat (B, 4))``."""
    q2m, m2q = ops or (quat2mat, mat2quat)
    r_obj = xp.cast(xp.cast(q2m(obj_quat, xp), xp.float32), xp.float64)
    t_obj = xp.cast(xp.cast(obj_pos, xp.float32), xp.float64)
    r_eef = xp.cast(xp.cast(q2m(eef_quat, xp), xp.float32), xp.float64)
    t_eef = xp.cast(xp.cast(eef_pos, xp.float32), xp.float64)
    r_inv = xp.swap(r_eef)
    t_inv = -xp.matmul(r_inv, t_eef[:, :, None])[:, :, 0]
    rot = xp.matmul(r_inv, r_obj)
    pos = xp.matmul(r_inv, t_obj[:, :, None])[:, :, 0] + t_inv
    return pos, xp.cast(m2q(rot, xp), xp.float64)


# ------------------------------------------------------------------------------------------------------------------
# the controller
# ------------------------------------------------------------------------------------------------------------------


class OSCParams:
    """Constants of one OSC_POSE arm + Panda gripper controller (read from robosuite's controller objects).

    Attributes (numpy): ``kp (6,)``, ``kd (6,)``, ``action_scale (6,)``, ``input_min/max (6,)``,
    ``in_transform (6,)``, ``out_transform (6,)``, ``torque_low/high (7,)`` (actuator ctrlrange),
    ``grip_low/high (2,)``, ``grip_speed``, ``base_frame`` (``input_ref_frame == "base"``), ``uncouple``,
    ``nullspace_kp`` (10, robosuite's default)."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)

    @classmethod
    def from_robosuite(cls, robot: Any) -> "OSCParams":
        arm = robot.part_controllers["right"]
        grip = robot.part_controllers["right_gripper"]
        model = robot.sim.model
        arm_act = robot._ref_actuators_indexes_dict["right"]
        grip_act = robot._ref_actuators_indexes_dict["right_gripper"]
        scale = np.abs(arm.output_max - arm.output_min) / np.abs(arm.input_max - arm.input_min)
        gscale = np.abs(grip.output_max - grip.output_min) / np.abs(grip.input_max - grip.input_min)
        return cls(
            kp=np.array(arm.kp, dtype=np.float64), kd=np.array(arm.kd, dtype=np.float64),
            action_scale=scale, input_min=np.array(arm.input_min, float), input_max=np.array(arm.input_max, float),
            in_transform=(arm.input_max + arm.input_min) / 2.0, out_transform=(arm.output_max + arm.output_min) / 2.0,
            torque_low=np.array(model.actuator_ctrlrange[arm_act, 0]),
            torque_high=np.array(model.actuator_ctrlrange[arm_act, 1]),
            grip_low=np.array(model.actuator_ctrlrange[grip_act, 0]),
            grip_high=np.array(model.actuator_ctrlrange[grip_act, 1]),
            grip_act_min=np.array(grip.actuator_min, float), grip_act_max=np.array(grip.actuator_max, float),
            grip_input_min=np.array(grip.input_min, float), grip_input_max=np.array(grip.input_max, float),
            grip_scale=gscale, grip_in_transform=(grip.input_max + grip.input_min) / 2.0,
            grip_out_transform=(grip.output_max + grip.output_min) / 2.0,
            grip_speed=float(robot.gripper["right"].speed),
            base_frame=arm.input_ref_frame == "base", uncouple=bool(arm.uncoupling), nullspace_kp=10.0,
        )


def gripper_command(current: Any, action: Any, p: OSCParams, xp: Any = NUMPY) -> Tuple[Any, Any]:
    """Panda gripper: ``current (B, 2)`` ramp state and ``action (B,)`` -> (new ramp state, ctrl ``(B, 2)``)
    (``PandaGripper.format_action`` then ``SimpleGripController.set_goal``/``run_controller``)."""
    step = xp.asarray(np.array([-1.0, 1.0]) * p.grip_speed)
    current = xp.clip(current + step[None, :] * xp.sign(action)[:, None], -1.0, 1.0)
    a = xp.clip(current, xp.asarray(p.grip_input_min), xp.asarray(p.grip_input_max))
    goal = (a - xp.asarray(p.grip_in_transform)) * xp.asarray(p.grip_scale) + xp.asarray(p.grip_out_transform)
    bias = 0.5 * (xp.asarray(p.grip_act_max) + xp.asarray(p.grip_act_min))
    weight = 0.5 * (xp.asarray(p.grip_act_max) - xp.asarray(p.grip_act_min))
    ctrl = bias + weight * goal
    return current, xp.clip(ctrl, xp.asarray(p.grip_low), xp.asarray(p.grip_high))


def osc_goal(action: Any, eef_pos: Any, eef_mat: Any, base_pos: Any, base_mat: Any, p: OSCParams,
             xp: Any = NUMPY, ops: Optional[Tuple[Any, Any]] = None) -> Tuple[Any, Any]:
    """``OSC.set_goal`` for delta input, goal update mode "achieved": ``action (B, 6)`` in [-1, 1] ->
    (goal position ``(B, 3)``, goal orientation ``(B, 3, 3)``) in the controller frame (robot base or world)."""
    a = xp.clip(action, xp.asarray(p.input_min), xp.asarray(p.input_max))
    delta = (a - xp.asarray(p.in_transform)) * xp.asarray(p.action_scale) + xp.asarray(p.out_transform)
    rot = (ops or (quat2mat, mat2quat))[0](axisangle2quat(delta[:, 3:6], xp), xp)
    if p.base_frame:
        base_t = xp.swap(base_mat)
        pos = xp.matmul(base_t, (eef_pos - base_pos)[:, :, None])[:, :, 0] + delta[:, 0:3]
        cur = xp.matmul(base_t, eef_mat)
    else:
        pos = eef_pos + delta[:, 0:3]
        cur = eef_mat
    return pos, xp.matmul(rot, cur)


def osc_torques(goal_pos: Any, goal_ori: Any, eef_pos: Any, eef_mat: Any, eef_vel: Any, base_pos: Any,
                base_mat: Any, base_vel: Any, jac: Any, mass: Any, bias: Any, q: Any, qd: Any, q0: Any,
                p: OSCParams, xp: Any = NUMPY) -> Any:
    """``OSC.run_controller`` + the clip of ``Robot.control``: joint torques ``(B, n)``.

    ``eef_vel``/``base_vel`` ``(B, 6)``: linear and angular site velocities (``jac @ qvel``); ``jac (B, 6, n)`` the
    reference site's Jacobian over the arm's dofs; ``mass (B, n, n)`` the arm block of the mass matrix; ``bias``
    ``(B, n)`` qfrc_bias (gravity compensation); ``q0`` the nullspace target (the joints at reset)."""
    if p.base_frame:
        want_pos = base_pos + xp.matmul(base_mat, goal_pos[:, :, None])[:, :, 0]
        want_ori = xp.matmul(base_mat, goal_ori)
    else:
        want_pos, want_ori = goal_pos, goal_ori
    ori_err = orientation_error(want_ori, eef_mat, xp)
    pos_err = want_pos - eef_pos
    kp = xp.asarray(p.kp)
    kd = xp.asarray(p.kd)
    force = pos_err * kp[0:3] + (-(eef_vel[:, 0:3] - base_vel[:, 0:3])) * kd[0:3]
    torque = ori_err * kp[3:6] + (-(eef_vel[:, 3:6] - base_vel[:, 3:6])) * kd[3:6]
    m_inv = xp.inv(mass)
    jac_t = xp.swap(jac)
    # robosuite takes pinv of the three operational-space inverses; they are positive definite away from kinematic
    # singularities, where pinv == inv up to rounding (p.exact_pinv=True computes pinv as robosuite does)
    pinv = xp.pinv if getattr(p, "exact_pinv", False) else xp.inv
    jm = xp.matmul(jac, m_inv)
    lam_inv = xp.matmul(jm, jac_t)
    lam_full = pinv(lam_inv)
    if p.uncouple:
        lam_pos = pinv(lam_inv[:, 0:3, 0:3])
        lam_ori = pinv(lam_inv[:, 3:6, 3:6])
        wrench = xp.concatenate([xp.matmul(lam_pos, force[:, :, None])[:, :, 0],
                                 xp.matmul(lam_ori, torque[:, :, None])[:, :, 0]], axis=1)
    else:
        wrench = xp.matmul(lam_full, xp.concatenate([force, torque], axis=1)[:, :, None])[:, :, 0]
    tau = xp.matmul(jac_t, wrench[:, :, None])[:, :, 0] + bias
    jbar = xp.matmul(xp.matmul(m_inv, jac_t), lam_full)
    n = mass.shape[-1]
    null = xp.eye(n) - xp.matmul(jbar, jac)
    kv = math.sqrt(p.nullspace_kp) * 2
    pose_torques = xp.matmul(mass, (p.nullspace_kp * (q0 - q) - kv * qd)[:, :, None])
    tau = tau + xp.matmul(xp.swap(null), pose_torques)[:, :, 0]
    return xp.clip(tau, xp.asarray(p.torque_low), xp.asarray(p.torque_high))


def params_to(p: OSCParams, xp: Any) -> Dict[str, Any]:  # pragma: no cover - convenience for the GPU path
    return {k: (xp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in p.__dict__.items()}


# ------------------------------------------------------------------------------------------------------------------
# CPU fast path: the same torque law compiled with numba (robosuite's own dependency), one call for all rows
# ------------------------------------------------------------------------------------------------------------------

_NUMBA_KERNEL = None


def _build_numba_kernel() -> Any:
    import os

    import numba

    # numba caches the compiled kernel next to this file (or in NUMBA_CACHE_DIR); a read-only install compiles anew
    cache = bool(os.environ.get("NUMBA_CACHE_DIR")) or os.access(os.path.dirname(os.path.abspath(__file__)), os.W_OK)

    @numba.njit(cache=cache)
    def kernel(want_pos, want_ori, eef_pos, eef_mat, jac_full, qvel, mass_full, bias, qpos, q0, cq, qp,
               kp, kd, uncouple, null_kp, low, high, out):  # pragma: no cover - compiled
        k = eef_pos.shape[0]
        n = cq.shape[0]
        kv = np.sqrt(null_kp) * 2.0
        for b in range(k):
            jac = np.empty((6, n))
            mass = np.empty((n, n))
            qd = np.empty(n)
            for r in range(6):
                for c in range(n):
                    jac[r, c] = jac_full[b, r, cq[c]]
            for r in range(n):
                qd[r] = qvel[b, cq[r]]
                for c in range(n):
                    mass[r, c] = mass_full[b, cq[r], cq[c]]
            vel = jac @ qd
            cur = eef_mat[b]
            des = want_ori[b]
            err = np.zeros(3)
            for i in range(3):
                err[0] += cur[1, i] * des[2, i] - cur[2, i] * des[1, i]
                err[1] += cur[2, i] * des[0, i] - cur[0, i] * des[2, i]
                err[2] += cur[0, i] * des[1, i] - cur[1, i] * des[0, i]
            force = np.empty(3)
            torque = np.empty(3)
            for i in range(3):
                force[i] = (want_pos[b, i] - eef_pos[b, i]) * kp[i] + (-vel[i]) * kd[i]
                torque[i] = 0.5 * err[i] * kp[3 + i] + (-vel[3 + i]) * kd[3 + i]
            m_inv = np.linalg.inv(mass)
            jac_t = jac.T.copy()
            lam_inv = (jac @ m_inv) @ jac_t
            lam_full = np.linalg.inv(lam_inv)
            wrench = np.empty(6)
            if uncouple:
                wrench[0:3] = np.linalg.inv(lam_inv[0:3, 0:3].copy()) @ force
                wrench[3:6] = np.linalg.inv(lam_inv[3:6, 3:6].copy()) @ torque
            else:
                full = np.empty(6)
                full[0:3] = force
                full[3:6] = torque
                wrench[:] = lam_full @ full
            tau = jac_t @ wrench
            for i in range(n):
                tau[i] = tau[i] + bias[b, cq[i]]
            jbar = (m_inv @ jac_t) @ lam_full
            null = np.eye(n) - jbar @ jac
            target = np.empty(n)
            for i in range(n):
                target[i] = null_kp * (q0[b, i] - qpos[b, qp[i]]) - kv * qd[i]
            tau = tau + null.T @ (mass @ target)
            for i in range(n):
                out[b, i] = min(max(tau[i], low[i]), high[i])

    return kernel


def numba_available() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def osc_torques_fast(goal_pos: np.ndarray, goal_ori: np.ndarray, eef_pos: np.ndarray, eef_mat: np.ndarray,
                     base_pos: np.ndarray, base_mat: np.ndarray, jac_full: np.ndarray, qvel: np.ndarray,
                     mass_full: np.ndarray, bias: np.ndarray, qpos: np.ndarray, q0: np.ndarray, cq: np.ndarray,
                     qp: np.ndarray, p: OSCParams) -> np.ndarray:
    """:func:`osc_torques` for a robot whose base does not move (zero base velocity), compiled with numba: full-model
    arrays in (``jac_full (B, 6, nv)``, ``qvel (B, nv)``, ``mass_full (B, nv, nv)``, ``bias (B, nv)``, ``qpos (B, nq)``)
    with the arm's dof indexes ``cq`` and qpos indexes ``qp``. Equal to :func:`osc_torques` to rounding (tested)."""
    global _NUMBA_KERNEL
    if _NUMBA_KERNEL is None:
        _NUMBA_KERNEL = _build_numba_kernel()
    if p.base_frame:
        want_pos = base_pos + np.matmul(base_mat, goal_pos[:, :, None])[:, :, 0]
        want_ori = np.matmul(base_mat, goal_ori)
    else:
        want_pos, want_ori = goal_pos, goal_ori
    out = np.empty((eef_pos.shape[0], len(cq)))
    _NUMBA_KERNEL(np.ascontiguousarray(want_pos), np.ascontiguousarray(want_ori), np.ascontiguousarray(eef_pos),
                  np.ascontiguousarray(eef_mat), jac_full, qvel, mass_full, bias, qpos, np.ascontiguousarray(q0),
                  cq, qp, p.kp, p.kd, bool(p.uncouple), float(p.nullspace_kp), p.torque_low, p.torque_high, out)
    return out
