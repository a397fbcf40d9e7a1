"""The environment contract shared by every backend (robosuite, gymnasium MuJoCo, FurnitureBench).

Two levels:

* :class:`Env` is ONE simulator instance with raw (unnormalized) observations. robosuite and gymnasium
  adapters implement it; the vector env runs several of them (in worker processes or in-process).
* :class:`BatchedEnv` is what rollouts and RL agents talk to: ``num_envs`` environments stepped one action
  chunk at a time, with an observation history of ``cond_steps`` and per-env auto-reset. The vector env
  implements it over :class:`Env` instances; FurnitureBench (GPU-batched Isaac Gym) implements it directly.

Observations are dicts of numpy arrays keyed by dataset obs keys (``robot0_eef_pos``, ``agentview_image``,
...), exactly as a robomimic HDF5 stores them, so a checkpoint's obs keys select what the policy sees.
Normalization is never done here: :meth:`dpft.policy.Policy.act` normalizes with the checkpoint's
normalizer.

Shapes: single env obs ``{key: (*shape)}``; batched obs ``{key: (N, To, *shape)}``; action chunk
``(N, act_steps, Da)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

ObsDict = Dict[str, np.ndarray]


class Env:
    """One simulator instance (raw observations, one action per :meth:`step`).

    Subclasses set ``obs_shapes`` (key -> shape), ``obs_dtypes`` (key -> numpy dtype), ``action_dim``,
    ``max_episode_steps`` and implement the methods below.
    """

    obs_shapes: Dict[str, Tuple[int, ...]]
    obs_dtypes: Dict[str, Any]
    action_dim: int
    max_episode_steps: int

    def reset(self, seed: Optional[int] = None) -> ObsDict:
        """Start a new episode (seeded when ``seed`` is given) and return its first observation."""
        raise NotImplementedError

    def step(self, action: np.ndarray) -> Tuple[ObsDict, float, bool, bool, Dict[str, Any]]:
        """Apply one action ``(Da,)``.

        Returns ``(obs, reward, terminated, truncated, info)``; ``info["success"]`` (bool) says whether the
        task is solved in the current state. ``truncated`` is True when the episode reached
        ``max_episode_steps`` (time limit), ``terminated`` when the task ended it (e.g. terminate on success).
        """
        raise NotImplementedError

    def render(self, height: int = 256, width: int = 256, camera: Optional[str] = None) -> np.ndarray:
        """Return an RGB frame ``(height, width, 3)`` uint8 (upright)."""
        raise NotImplementedError

    def get_state(self) -> Optional[np.ndarray]:
        """Flat simulator state (robomimic ``states``), or None when the backend has none."""
        return None

    def _checked_action(self, action: np.ndarray) -> np.ndarray:
        """``action`` as float64 ``(action_dim,)``; :class:`DpftError` before any reset or on a wrong shape."""
        from dpft.errors import DpftError

        if not getattr(self, "_has_reset", False):
            raise DpftError("{}.step() was called before reset().".format(type(self).__name__))
        a = np.asarray(action, dtype=np.float64)
        if a.shape != (self.action_dim,):
            raise DpftError("{}: action has shape {}; expected ({},).".format(
                getattr(self, "env_name", type(self).__name__), tuple(a.shape), self.action_dim))
        return a

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class StepResult:
    """Result of stepping one action chunk in every env of a :class:`BatchedEnv`.

    Attributes:
        obs: observation history after the chunk ``{key: (N, To, *shape)}``; for envs whose episode ended in
            this chunk this is already the first observation of the next episode (auto-reset).
        reward: ``(N,)`` float32, rewards summed over the executed steps of the chunk.
        terminated: ``(N,)`` bool, the episode ended by the task (no bootstrapping).
        truncated: ``(N,)`` bool, the episode hit its time limit or was cut (bootstrap from ``final_obs``).
        success: ``(N,)`` bool, task success was reached at some step of the episode so far (for envs whose
            episode ended in this chunk: of that finished episode). An episode cut by a fault (a dead worker,
            a raising env, a NaN observation or reward) is never a success.
        final_obs: ``{key: (N, To, *shape)}``: the last observation history of episodes that ended in this
            chunk (before reset); rows of other envs equal ``obs`` (when no episode ended it may be ``obs``
            itself: treat both as read-only).
        info: extra per-batch information (e.g. ``"steps"``: (N,) env steps executed in this chunk,
            ``"nan_resets"``, ``"episode_return"``/``"episode_length"`` arrays for finished episodes,
            ``"failed"``: (N,) bool + ``"fail_reason"`` list when a worker died).

    A batched env may return torch tensors instead of numpy arrays for ``obs``, ``reward``, ``terminated``,
    ``truncated``, ``success`` and ``final_obs`` (:class:`dpft.envs.furniture.FurnitureEnv` with
    ``return_torch=True``: on the simulator's GPU); ``info`` stays numpy / Python. Consumers (the RL collector,
    :func:`dpft.envs.rollout.rollout`) copy flags and rewards with :func:`as_numpy` and pass observations on.
    """

    obs: ObsDict
    reward: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    success: np.ndarray
    final_obs: ObsDict
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> np.ndarray:
        return np.logical_or(self.terminated, self.truncated)


class BatchedEnv:
    """``num_envs`` environments stepped one action chunk at a time (see module docstring)."""

    num_envs: int
    obs_shapes: Dict[str, Tuple[int, ...]]
    action_dim: int
    max_episode_steps: int
    cond_steps: int
    act_steps: int

    def reset(self, seeds: Optional[List[int]] = None) -> ObsDict:
        """Reset every env (env i seeded with ``seeds[i]``) and return histories ``(N, To, ...)``."""
        raise NotImplementedError

    def step(self, action_chunk: np.ndarray) -> StepResult:
        """Execute ``action_chunk`` ``(N, act_steps, Da)`` (raw, unnormalized actions)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def as_numpy(x: Any) -> Any:
    """``x`` as a numpy array: torch tensors (FurnitureEnv with ``return_torch=True`` gives them on the GPU) are
    copied to the host; numpy arrays and other array-likes pass through ``np.asarray``."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def resolve_task_name(task: str, tasks: Dict[str, str], kind: str) -> str:
    """The simulator's env name for a short task name (``"lift"``) or one of the names in ``tasks`` itself
    (case-insensitive); :class:`DpftError` listing the known tasks otherwise."""
    from dpft.errors import DpftError

    if isinstance(task, str):
        if task.lower() in tasks:
            return tasks[task.lower()]
        for name in tasks.values():
            if task.lower() == name.lower():
                return name
    raise DpftError("Unknown {} task {!r}; known tasks: {}.".format(
        kind, task, ", ".join("{} ({})".format(k, v) for k, v in tasks.items())))
