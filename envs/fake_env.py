"""A cheap deterministic :class:`~dpft.envs.base.Env` for tests and examples: a point mass reaching a goal.

The state is the point position ``p`` (3,) and the goal ``g`` (3,), both drawn uniformly from
``[-0.5, 0.5]^3`` by ``reset(seed)`` (``numpy.random.default_rng(seed)``: same seed, same episode). One step
moves ``p <- p + step_size * clip(a, -1, 1)``; the reward is ``-|p - g|`` (Euclidean distance after the move)
and ``info["success"]`` is ``|p - g| < success_radius``. The episode is *terminated* on success when
``terminate_on_success`` is set and *truncated* when it reaches ``max_episode_steps``.

Observations mimic robosuite (float64 low-dim keys): ``robot0_eef_pos`` = p, ``object`` = g and, with
``image=True``, ``agentview_image`` (16, 16, 3) uint8 (a top-down drawing, the same picture as
:meth:`FakeEnv.render`).

A few switches inject faults for the vector-env tests: ``step_delay_s`` (sleep in every step),
``hang_on_seed`` (the episode with that seed blocks for an hour at step ``fault_step``), ``raise_on_seed``
(it raises ``RuntimeError`` there) and ``nan_on_seed`` (it returns a NaN observation there).

:class:`ScriptedReachPolicy` is a matching policy object (``act`` + ``meta``) for rollout tests.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from dpft.envs.base import Env, ObsDict


class FakeEnv(Env):
    """Point-mass reaching env (see module docstring). Picklable: build it with ``functools.partial``."""

    def __init__(
        self,
        max_episode_steps: int = 50,
        step_size: float = 0.05,
        success_radius: float = 0.05,
        terminate_on_success: bool = False,
        image: bool = False,
        step_delay_s: float = 0.0,
        hang_on_seed: Optional[int] = None,
        raise_on_seed: Optional[int] = None,
        nan_on_seed: Optional[int] = None,
        fault_step: int = 3,
    ):
        self.max_episode_steps = int(max_episode_steps)
        self.step_size = float(step_size)
        self.success_radius = float(success_radius)
        self.terminate_on_success = bool(terminate_on_success)
        self.image = bool(image)
        self.step_delay_s = float(step_delay_s)
        self.hang_on_seed = hang_on_seed
        self.raise_on_seed = raise_on_seed
        self.nan_on_seed = nan_on_seed
        self.fault_step = int(fault_step)
        self.action_dim = 3
        self.obs_shapes: Dict[str, Tuple[int, ...]] = {"robot0_eef_pos": (3,), "object": (3,)}
        self.obs_dtypes: Dict[str, Any] = {"robot0_eef_pos": np.dtype(np.float64), "object": np.dtype(np.float64)}
        if self.image:
            self.obs_shapes["agentview_image"] = (16, 16, 3)
            self.obs_dtypes["agentview_image"] = np.dtype(np.uint8)
        self._pos = np.zeros(3)
        self._goal = np.zeros(3)
        self._t = 0
        self._seed: Optional[int] = None
        self._closed = False

    # -- Env API -----------------------------------------------------------------------------------------
    def reset(self, seed: Optional[int] = None) -> ObsDict:
        rng = np.random.default_rng(seed)
        self._pos = rng.uniform(-0.5, 0.5, size=3)
        self._goal = rng.uniform(-0.5, 0.5, size=3)
        self._t = 0
        self._seed = seed
        return self._obs()

    def step(self, action: np.ndarray) -> Tuple[ObsDict, float, bool, bool, Dict[str, Any]]:
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (3,):
            raise ValueError("FakeEnv.step expects an action of shape (3,), got %s" % (action.shape,))
        if self.step_delay_s > 0:
            time.sleep(self.step_delay_s)
        self._t += 1
        faulty = self._seed is not None and self._t == self.fault_step
        if faulty and self._seed == self.hang_on_seed:
            time.sleep(3600.0)
        if faulty and self._seed == self.raise_on_seed:
            raise RuntimeError("FakeEnv fault injected at step %d (seed %d)" % (self._t, self._seed))
        self._pos = self._pos + self.step_size * np.clip(action, -1.0, 1.0)
        dist = float(np.linalg.norm(self._pos - self._goal))
        success = dist < self.success_radius
        terminated = bool(success and self.terminate_on_success)
        truncated = bool(self._t >= self.max_episode_steps and not terminated)
        obs = self._obs()
        if faulty and self._seed == self.nan_on_seed:
            obs["robot0_eef_pos"] = np.full(3, np.nan)
        return obs, -dist, terminated, truncated, {"success": bool(success)}

    def render(self, height: int = 256, width: int = 256, camera: Optional[str] = None) -> np.ndarray:
        """Top-down drawing: grey floor, goal as a green square, point as a red square, a blue bar whose
        length is the step count (so consecutive frames differ)."""
        frame = np.full((height, width, 3), 60, dtype=np.uint8)
        half = max(1, min(height, width) // 16)
        for xyz, color in ((self._goal, (0, 200, 0)), (self._pos, (220, 30, 30))):
            r = int(np.clip((xyz[1] + 0.75) / 1.5 * height, 0, height - 1))
            c = int(np.clip((xyz[0] + 0.75) / 1.5 * width, 0, width - 1))
            frame[max(0, r - half):r + half + 1, max(0, c - half):c + half + 1] = color
        bar = int(round(width * min(1.0, self._t / max(1, self.max_episode_steps))))
        frame[: max(1, height // 32), :bar] = (40, 80, 255)
        return frame

    def get_state(self) -> Optional[np.ndarray]:
        return np.concatenate([self._pos, self._goal, [float(self._t)]])

    def close(self) -> None:
        self._closed = True

    # -- helpers -----------------------------------------------------------------------------------------
    def _obs(self) -> ObsDict:
        obs = {"robot0_eef_pos": self._pos.copy(), "object": self._goal.copy()}
        if self.image:
            obs["agentview_image"] = self.render(16, 16)
        return obs


@dataclass
class FakePolicyMeta:
    """The subset of :class:`dpft.policy.Policy` metadata that rollouts read."""

    obs_keys: List[str] = field(default_factory=lambda: ["robot0_eef_pos", "object"])
    cond_steps: int = 1
    act_steps: int = 4
    horizon_steps: int = 4
    action_dim: int = 3
    env_args: Dict[str, Any] = field(default_factory=dict)


class ScriptedReachPolicy:
    """Proportional controller for :class:`FakeEnv` with the ``Policy.act`` interface.

    ``act(obs)`` reads the newest observation of each history ``obs[key]`` ``(B, To, 3)`` and returns
    ``(B, act_steps, 3)`` actions ``clip(gain * (goal - pos), -1, 1)`` (the same action repeated). ``calls``
    counts the calls and ``batch_sizes`` records each batch size.
    """

    def __init__(self, cond_steps: int = 1, act_steps: int = 4, gain: float = 10.0):
        self.meta = FakePolicyMeta(cond_steps=cond_steps, act_steps=act_steps, horizon_steps=act_steps)
        self.gain = float(gain)
        self.calls = 0
        self.batch_sizes: List[int] = []

    def act(self, obs: Dict[str, np.ndarray], deterministic: bool = True) -> np.ndarray:
        self.calls += 1
        pos = np.asarray(obs["robot0_eef_pos"])[:, -1]
        goal = np.asarray(obs["object"])[:, -1]
        self.batch_sizes.append(pos.shape[0])
        a = np.clip(self.gain * (goal - pos), -1.0, 1.0).astype(np.float32)
        return np.repeat(a[:, None, :], self.meta.act_steps, axis=1)
