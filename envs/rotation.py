"""Rotation helpers for FurnitureBench observations and actions (torch, vectorized over any leading dims).

Conventions (the ones ankile's furniture-bench fork and ResiP use, so converted datasets and live
observations agree bit for bit in meaning):

* quaternions are ``(..., 4)`` in **xyzw** order (real part last, Isaac Gym's order);
* the 6-D rotation of Zhou et al. (CVPR 2019) is the **first two rows** of the rotation matrix, flattened
  row-major: ``rot6d = [R[0, 0], R[0, 1], R[0, 2], R[1, 0], R[1, 1], R[1, 2]]``
  (fork: ``furniture_bench/controllers/control_utils.py::matrix_to_rotation_6d`` takes ``matrix[..., :2, :]``);
  the inverse map orthonormalizes the two rows with Gram-Schmidt and takes their cross product as row 3;
* FurnitureSim's 14-D robot state is ``[ee_pos 3, ee_quat 4 (xyzw), ee_pos_vel 3, ee_ori_vel 3,
  gripper_width 1]``; the policies see the 16-D version with the quaternion replaced by its 6-D rotation
  (fork: ``control_utils.proprioceptive_quat_to_6d_rotation``);
* a 10-D action is ``[pos 3, rot6d 6, gripper 1]``; the fork's 8-D actions are ``[pos 3, quat 4, gripper 1]``.

Every function takes and returns torch tensors of the same floating dtype; numpy callers wrap with
``torch.from_numpy`` (float64 keeps round trips exact to ~1e-12).
"""
from __future__ import annotations

import torch

__all__ = [
    "quat_xyzw_to_matrix",
    "matrix_to_quat_xyzw",
    "standardize_quat_xyzw",
    "matrix_to_rot6d",
    "rot6d_to_matrix",
    "quat_xyzw_to_rot6d",
    "rot6d_to_quat_xyzw",
    "quat_multiply",
    "quat_conjugate",
    "axis_angle_to_quat_xyzw",
    "quat_xyzw_to_axis_angle",
    "robot_state_quat_to_rot6d",
    "action_quat_to_rot6d",
    "action_rot6d_to_quat",
]


def _check_last(x: torch.Tensor, n: int, name: str) -> None:
    if x.shape[-1] != n:
        raise ValueError("%s must have last dimension %d, got shape %s" % (name, n, tuple(x.shape)))


def quat_xyzw_to_matrix(quat: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``(..., 3, 3)`` of quaternions ``(..., 4)`` xyzw (normalized first)."""
    _check_last(quat, 4, "quat")
    q = quat / quat.norm(dim=-1, keepdim=True)
    x, y, z, w = q.unbind(-1)
    rows = (
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
    )
    return torch.stack(rows, dim=-1).reshape(quat.shape[:-1] + (3, 3))


def standardize_quat_xyzw(quat: torch.Tensor) -> torch.Tensor:
    """The same rotation with a non-negative real part (``q`` and ``-q`` are the same rotation)."""
    return torch.where(quat[..., 3:4] < 0, -quat, quat)


def matrix_to_quat_xyzw(matrix: torch.Tensor) -> torch.Tensor:
    """Unit quaternions ``(..., 4)`` xyzw with ``w >= 0`` of rotation matrices ``(..., 3, 3)``.

    Shepperd's method: four candidate formulas, each exact but ill-conditioned when its pivot
    (``2|w|``, ``2|x|``, ``2|y|`` or ``2|z|``) is small; the candidate with the largest pivot is taken.
    """
    if matrix.shape[-2:] != (3, 3):
        raise ValueError("matrix must have shape (..., 3, 3), got %s" % (tuple(matrix.shape),))
    m = matrix
    m00, m01, m02 = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    m10, m11, m12 = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
    m20, m21, m22 = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]
    # pivots s_i = 2 |q_i| (w, x, y, z)
    s = torch.sqrt(torch.clamp(torch.stack([
        1 + m00 + m11 + m22,
        1 + m00 - m11 - m22,
        1 - m00 + m11 - m22,
        1 - m00 - m11 + m22,
    ], dim=-1), min=0.0))
    # each candidate in xyzw order, multiplied by its pivot s_i (so entry i is s_i^2)
    cand = torch.stack([
        torch.stack([m21 - m12, m02 - m20, m10 - m01, s[..., 0] ** 2], dim=-1),
        torch.stack([s[..., 1] ** 2, m10 + m01, m02 + m20, m21 - m12], dim=-1),
        torch.stack([m10 + m01, s[..., 2] ** 2, m12 + m21, m02 - m20], dim=-1),
        torch.stack([m20 + m02, m21 + m12, s[..., 3] ** 2, m10 - m01], dim=-1),
    ], dim=-2)  # (..., 4 candidates, 4)
    cand = cand / (2.0 * torch.clamp(s, min=0.1)[..., None])
    best = s.argmax(dim=-1)
    idx = best[..., None, None].expand(best.shape + (1, 4))
    quat = torch.gather(cand, -2, idx).squeeze(-2)
    quat = quat / quat.norm(dim=-1, keepdim=True)
    return standardize_quat_xyzw(quat)


def matrix_to_rot6d(matrix: torch.Tensor) -> torch.Tensor:
    """6-D rotations ``(..., 6)``: the first two rows of ``matrix (..., 3, 3)``, row-major."""
    if matrix.shape[-2:] != (3, 3):
        raise ValueError("matrix must have shape (..., 3, 3), got %s" % (tuple(matrix.shape),))
    return matrix[..., :2, :].reshape(matrix.shape[:-2] + (6,))


def rot6d_to_matrix(rot6d: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``(..., 3, 3)`` from 6-D rotations ``(..., 6)`` (Gram-Schmidt on the two rows)."""
    _check_last(rot6d, 6, "rot6d")
    a1, a2 = rot6d[..., :3], rot6d[..., 3:]
    b1 = a1 / torch.clamp(a1.norm(dim=-1, keepdim=True), min=1e-12)
    b2 = a2 - (b1 * a2).sum(-1, keepdim=True) * b1
    b2 = b2 / torch.clamp(b2.norm(dim=-1, keepdim=True), min=1e-12)
    b3 = torch.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-2)


def quat_xyzw_to_rot6d(quat: torch.Tensor) -> torch.Tensor:
    """6-D rotations ``(..., 6)`` of quaternions ``(..., 4)`` xyzw."""
    return matrix_to_rot6d(quat_xyzw_to_matrix(quat))


def rot6d_to_quat_xyzw(rot6d: torch.Tensor) -> torch.Tensor:
    """Unit quaternions ``(..., 4)`` xyzw (``w >= 0``) of 6-D rotations ``(..., 6)``."""
    return matrix_to_quat_xyzw(rot6d_to_matrix(rot6d))


def quat_multiply(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamilton product ``a * b`` of xyzw quaternions (rotation ``b`` then ``a``; broadcasts)."""
    _check_last(a, 4, "a")
    _check_last(b, 4, "b")
    ax, ay, az, aw = a.unbind(-1)
    bx, by, bz, bw = b.unbind(-1)
    return torch.stack([
        aw * bx + ax * bw + ay * bz - az * by,
        aw * by - ax * bz + ay * bw + az * bx,
        aw * bz + ax * by - ay * bx + az * bw,
        aw * bw - ax * bx - ay * by - az * bz,
    ], dim=-1)


def quat_conjugate(quat: torch.Tensor) -> torch.Tensor:
    """Conjugate (the inverse rotation for unit quaternions), xyzw."""
    _check_last(quat, 4, "quat")
    return torch.cat([-quat[..., :3], quat[..., 3:]], dim=-1)


def axis_angle_to_quat_xyzw(axis_angle: torch.Tensor) -> torch.Tensor:
    """Unit quaternions ``(..., 4)`` xyzw of rotation vectors ``(..., 3)`` (axis * angle in radians)."""
    _check_last(axis_angle, 3, "axis_angle")
    angle = axis_angle.norm(dim=-1, keepdim=True)
    half = 0.5 * angle
    small = angle < 1e-6
    # sin(a/2)/a, with its Taylor expansion near 0
    safe = torch.where(small, torch.ones_like(angle), angle)
    scale = torch.where(small, 0.5 - angle * angle / 48.0, torch.sin(half) / safe)
    return torch.cat([axis_angle * scale, torch.cos(half)], dim=-1)


def quat_xyzw_to_axis_angle(quat: torch.Tensor) -> torch.Tensor:
    """Rotation vectors ``(..., 3)`` (angle in [0, pi]) of quaternions ``(..., 4)`` xyzw."""
    q = standardize_quat_xyzw(quat / quat.norm(dim=-1, keepdim=True))
    vec = q[..., :3]
    sin_half = vec.norm(dim=-1, keepdim=True)
    angle = 2.0 * torch.atan2(sin_half, q[..., 3:])
    small = sin_half < 1e-6
    safe = torch.where(small, torch.ones_like(sin_half), sin_half)
    scale = torch.where(small, 2.0 * torch.ones_like(angle), angle / safe)
    return vec * scale


def robot_state_quat_to_rot6d(robot_state: torch.Tensor) -> torch.Tensor:
    """FurnitureSim robot state ``(..., 14)`` -> ``(..., 16)``: the ee quaternion (dims 3:7) becomes rot6d."""
    _check_last(robot_state, 14, "robot_state")
    return torch.cat([
        robot_state[..., :3],
        quat_xyzw_to_rot6d(robot_state[..., 3:7]),
        robot_state[..., 7:],
    ], dim=-1)


def action_quat_to_rot6d(action: torch.Tensor) -> torch.Tensor:
    """Actions ``(..., 8)`` ``[pos, quat xyzw, gripper]`` -> ``(..., 10)`` ``[pos, rot6d, gripper]``."""
    _check_last(action, 8, "action")
    return torch.cat([action[..., :3], quat_xyzw_to_rot6d(action[..., 3:7]), action[..., 7:]], dim=-1)


def action_rot6d_to_quat(action: torch.Tensor) -> torch.Tensor:
    """Actions ``(..., 10)`` ``[pos, rot6d, gripper]`` -> ``(..., 8)`` ``[pos, quat xyzw (w >= 0), gripper]``."""
    _check_last(action, 10, "action")
    return torch.cat([action[..., :3], rot6d_to_quat_xyzw(action[..., 3:9]), action[..., 9:]], dim=-1)
