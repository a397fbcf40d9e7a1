"""Advantages, returns and running statistics for on-policy RL at the action-chunk level.

One RL step is one executed action chunk (``act_steps`` env steps, rewards summed), as in DPPO; ``gamma``
is therefore per chunk. All rollout tensors are time-major ``(T, N)``: T chunks per env in the iteration,
N envs. Episode boundaries are given by two flags per step:

- ``terminated[t, n]``: the episode ended in a terminal state after step t (success/failure the task
  defines, or an episode cut by an env fault, which the collector passes as terminated): nothing is
  bootstrapped after it.
- ``truncated[t, n]``: the episode was cut by a time limit (or the iteration's reset) after step t: the
  future is unknown, not zero, so the target bootstraps ``V(final_obs)``.

Contents:

- :func:`gae`: generalized advantage estimation (Schulman et al. 2016, arXiv 1506.02438) that stops the
  recursion at every episode boundary and bootstraps at truncation.
- :class:`RunningMeanStd`: running mean / population variance (Chan et al.'s parallel merge), float64,
  for observation normalization (CleanRL's ``NormalizeObservation``) and inside the reward scaler.
- :class:`RunningRewardScaler`: divides rewards by the running std of the discounted return (DPPO's
  ``util/reward_scaling.py``, gym's ``NormalizeReward``), with the deviations listed in its docstring.

Every statistic is float64 and ``state_dict()`` holds only tensors (safetensors-friendly), so a resumed
run continues bit-for-bit.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch

from dpft.errors import DpftError

Reduce = Callable[[torch.Tensor], torch.Tensor]


def _as_float(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Flags (bool/int/float) as a float tensor of ``like``'s dtype and device."""
    return x.to(device=like.device, dtype=like.dtype)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    next_values: torch.Tensor,
    terminated: torch.Tensor,
    truncated: torch.Tensor,
    gamma: float,
    lam: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Chunk-level GAE(gamma, lambda) that bootstraps at truncation and stops at every episode boundary.

    Shapes: every input ``(T, N)``; returns ``(advantages (T, N), returns (T, N))`` in ``rewards``' dtype.

    Args:
        rewards: ``r_t``, the (scaled) chunk reward of step t.
        values: ``V(s_t)``, the critic on the observation the chunk was chosen from.
        next_values: ``V(s_{t+1})`` = the critic on the observation *after* step t: for a step inside an
            episode it equals ``values[t + 1]``; for a truncated step it is ``V(final_obs)`` (the last
            observation of the cut episode, not the reset observation that follows); for the last step of
            the batch it is V of the observation after it; for a terminated step it is ignored.
        terminated: 1 where the episode ended in a terminal state after step t (no bootstrap).
        truncated: 1 where the episode was cut after step t (bootstrap ``next_values[t]``). Where both are
            set, terminated wins.
        gamma: discount per chunk. lam: GAE lambda.

    Formula (``d_t = terminated_t OR truncated_t``)::

        delta_t = r_t + gamma * (1 - terminated_t) * next_values_t - values_t
        A_t     = delta_t + gamma * lam * (1 - d_t) * A_{t+1},      A_T = 0
        R_t     = A_t + values_t                                     (critic target)

    Sources and deviations: the recursion is CleanRL's ``ppo_continuous_action.py`` L232-246 and DPPO's
    ``train_ppo_diffusion_agent.py`` L195-279, with ``next_values`` given per step instead of read from
    ``values[t + 1]``. Both references get truncation wrong (``rl_recipes.md`` section 7.11): CleanRL and
    ResiP treat a time-out as terminal (``next_done = terminated OR truncated``, no bootstrap), and DPPO
    never cuts the recursion at a time-out, so it bootstraps from and accumulates across the reset
    observation of the next episode. Here a truncated step bootstraps ``V(final_obs)`` and is still an
    episode boundary for the lambda-recursion.
    """
    tensors = {"rewards": rewards, "values": values, "next_values": next_values,
               "terminated": terminated, "truncated": truncated}
    shape = tuple(rewards.shape)
    for name, x in tensors.items():
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != shape or x.dim() != 2:
            raise DpftError(
                "gae: every input must be a time-major (T, N) tensor of the same shape; rewards has shape {} "
                "but {} has {}.".format(shape, name, tuple(x.shape) if isinstance(x, torch.Tensor) else type(x))
            )
    if not rewards.is_floating_point():
        raise DpftError("gae: rewards must be a floating tensor, got dtype {}.".format(rewards.dtype))
    if not (0.0 <= float(gamma) <= 1.0 and 0.0 <= float(lam) <= 1.0):
        raise DpftError("gae: gamma and lam must lie in [0, 1], got gamma={} lam={}.".format(gamma, lam))
    values = _as_float(values, rewards)
    next_values = _as_float(next_values, rewards)
    term = _as_float(terminated.bool(), rewards)
    boundary = _as_float(terminated.bool() | truncated.bool(), rewards)

    deltas = rewards + gamma * (1.0 - term) * next_values - values
    carry = gamma * lam * (1.0 - boundary)
    advantages = torch.empty_like(rewards)
    last = torch.zeros_like(rewards[0])
    for t in range(shape[0] - 1, -1, -1):
        last = deltas[t] + carry[t] * last
        advantages[t] = last
    return advantages, advantages + values


class RunningMeanStd:
    """Running mean and population variance of a stream of ``(B, *shape)`` batches, in float64.

    Merge of the running statistics ``(m, v, n)`` with a batch ``(m_b, v_b, n_b)`` (Chan, Golub, LeVeque
    1979; OpenAI baselines ``RunningMeanStd``, gym's ``NormalizeObservation``)::

        delta = m_b - m;  N = n + n_b
        m    <- m + delta * n_b / N
        v    <- (v * n + v_b * n_b + delta^2 * n * n_b / N) / N      (population variance: M2 / N)
        n    <- N

    starting from ``m = 0, v = 1, n = count_init = 1e-4`` (baselines' prior; it weighs 1e-4 samples).
    Deviation from DPPO: DPPO's copy divides M2 by ``N - 1`` (``rl_recipes.md`` 3.1 and 7.5), mixing an
    unbiased estimate with the population-variance merge and inflating the variance after small batches
    (with ``n ~ 1e-4`` the first update divides by ``n_b - 1 + 1e-4``). The population formula is the one
    the merge is exact for: updating with batches A then B gives the variance of A and B together.

    Args:
        shape: shape of one sample (``()`` for scalars, ``(Do,)`` for observations).
        count_init: the prior count (must be > 0).
        device: where the float64 statistics live; inputs are moved there (keep it on the rollout's
            device to avoid copies).

    :meth:`normalize` computes ``clip((x - m) / sqrt(v + eps), -clip, clip)`` in ``x``'s dtype.
    """

    def __init__(self, shape: Sequence[int] = (), count_init: float = 1e-4,
                 device: Union[str, torch.device] = "cpu"):
        if not float(count_init) > 0:
            raise DpftError("RunningMeanStd count_init must be > 0, got {}.".format(count_init))
        self.shape = tuple(int(s) for s in shape)
        self.device = torch.device(device)
        self.mean = torch.zeros(self.shape, dtype=torch.float64, device=self.device)
        self.var = torch.ones(self.shape, dtype=torch.float64, device=self.device)
        self.count = torch.tensor(float(count_init), dtype=torch.float64, device=self.device)

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        ndim = len(self.shape)
        if x.dim() < ndim + 1 or tuple(x.shape[x.dim() - ndim:]) != self.shape:
            raise DpftError(
                "RunningMeanStd: expected a batch of shape (B, {}) but got {}.".format(
                    ", ".join(str(s) for s in self.shape) or "", tuple(x.shape))
            )
        return x.reshape((-1,) + self.shape).to(device=self.device, dtype=torch.float64)

    def update(self, x: torch.Tensor, reduce: Optional[Reduce] = None) -> None:
        """Merge the samples of ``x`` (``(..., *shape)``, all leading dims are samples) into the statistics.

        ``reduce``: optional all-reduce SUM over data-parallel ranks (e.g. ``lambda t: dist.all_reduce(t)
        or t``) so every rank merges the same global batch moments; the batch moments are then computed
        from the reduced ``(n, sum x, sum x^2)``.
        """
        flat = self._check(x)
        if reduce is None:
            if flat.shape[0] == 0:
                return
            n_b = torch.tensor(float(flat.shape[0]), dtype=torch.float64, device=self.device)
            m_b = flat.mean(dim=0)
            v_b = flat.var(dim=0, unbiased=False)
        else:
            sums = torch.cat([
                torch.full((1,), float(flat.shape[0]), dtype=torch.float64, device=self.device),
                flat.sum(dim=0).reshape(-1), (flat * flat).sum(dim=0).reshape(-1),
            ])
            sums = reduce(sums)
            n_b = sums[0]
            if float(n_b) == 0:
                return
            m_b = (sums[1:1 + self.mean.numel()] / n_b).reshape(self.shape)
            v_b = (sums[1 + self.mean.numel():] / n_b).reshape(self.shape) - m_b * m_b
            v_b = v_b.clamp(min=0.0)
        self.update_from_moments(m_b, v_b, n_b)

    def update_from_moments(self, batch_mean: torch.Tensor, batch_var: torch.Tensor,
                            batch_count: Union[float, torch.Tensor]) -> None:
        """Merge a batch given by its mean, population variance (``(*shape)``) and count (see class doc)."""
        m_b = torch.as_tensor(batch_mean, dtype=torch.float64, device=self.device)
        v_b = torch.as_tensor(batch_var, dtype=torch.float64, device=self.device)
        n_b = torch.as_tensor(batch_count, dtype=torch.float64, device=self.device)
        delta = m_b - self.mean
        total = self.count + n_b
        self.mean = self.mean + delta * n_b / total
        m2 = self.var * self.count + v_b * n_b + delta * delta * self.count * n_b / total
        self.var = m2 / total
        self.count = total

    def normalize(self, x: torch.Tensor, clip: Optional[float] = None, eps: float = 1e-8) -> torch.Tensor:
        """``clip((x - mean) / sqrt(var + eps), -clip, clip)``; shapes ``(..., *shape)``, ``x``'s dtype."""
        mean = self.mean.to(device=x.device, dtype=x.dtype)
        std = torch.sqrt(self.var + eps).to(device=x.device, dtype=x.dtype)
        out = (x - mean) / std
        return out if clip is None else out.clamp(-clip, clip)

    @property
    def std(self) -> torch.Tensor:
        """``sqrt(var)``, float64 ``(*shape)``."""
        return torch.sqrt(self.var)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """``{"mean": (*shape), "var": (*shape), "count": ()}``, float64 CPU copies."""
        return {"mean": self.mean.detach().cpu().clone(), "var": self.var.detach().cpu().clone(),
                "count": self.count.detach().cpu().clone()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Restore exactly what :meth:`state_dict` returned (shapes checked)."""
        _require_keys(state, ("mean", "var", "count"), "RunningMeanStd")
        for key, want in (("mean", self.shape), ("var", self.shape), ("count", ())):
            got = tuple(torch.as_tensor(state[key]).shape)
            if got != want:
                raise DpftError("RunningMeanStd state {!r} has shape {}, expected {} (a different observation "
                                "size than this run's?).".format(key, got, want))
        self.mean = torch.as_tensor(state["mean"]).to(device=self.device, dtype=torch.float64).clone()
        self.var = torch.as_tensor(state["var"]).to(device=self.device, dtype=torch.float64).clone()
        self.count = torch.as_tensor(state["count"]).to(device=self.device, dtype=torch.float64).clone()


def _require_keys(state: Dict[str, torch.Tensor], keys: Sequence[str], what: str) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise DpftError("{} state_dict is missing {} (has {}); was it saved by this version of dpft?".format(
            what, missing, sorted(state)))


class RunningRewardScaler:
    """Scale chunk rewards by the running std of the discounted return (DPPO's ``RunningRewardScaler``).

    Per call on a rollout's rewards ``(T, N)`` with episode-boundary flags ``dones (T, N)``
    (``terminated OR truncated`` after step t)::

        g_t = r_t + gamma * g_{t-1}           g carried per env across calls, zeroed after a done
        stats <- merge(stats, {g_t})          RunningMeanStd over all T*N values (population variance)
        return clip(r_t / sqrt(var + eps), -clip, clip)          (not centred)

    Sources: DPPO ``util/reward_scaling.py`` as called in ``train_ppo_agent.py`` (``rl_recipes.md`` 3.1);
    gym's ``NormalizeReward`` / CleanRL do the same per env step. Deviations from DPPO, each deliberate:

    - ``gamma`` is an argument (pass the run's per-chunk gamma): DPPO hard-codes 0.99 whatever
      ``train.gamma`` is (``rl_recipes.md`` 7.5), so with robomimic's 0.999 it normalizes by the scale of a
      ~100-chunk return while the critic regresses a ~1000-chunk one.
    - population variance ``M2 / N`` (see :class:`RunningMeanStd`), where DPPO divides by ``N - 1``.
    - boundaries come as ``dones`` after step t instead of DPPO's ``firsts`` before step t (same recursion,
      ``first_{t+1} = done_t``). An env reset that the flags do not show (e.g. resetting all envs at an
      iteration start) must be told with :meth:`reset` so no return is carried into the new episode.
    - data-parallel: ``reduce`` (all-reduce SUM) makes all ranks hold the same statistics.

    Args:
        num_envs: N (the carried return has one entry per env).
        gamma: discount per chunk (use the run's ``gamma``).
        clip: scaled rewards are clipped to ``[-clip, clip]`` (DPPO 10); ``None`` disables it.
        eps: added to the variance before the square root (1e-8).

    Only training iterations should call it (DPPO's eval iterations never touch the statistics).
    """

    def __init__(self, num_envs: int, gamma: float, clip: Optional[float] = 10.0, eps: float = 1e-8,
                 device: Union[str, torch.device] = "cpu"):
        if int(num_envs) != num_envs or int(num_envs) < 1:
            raise DpftError("RunningRewardScaler num_envs must be a positive integer, got {}.".format(num_envs))
        if not 0.0 <= float(gamma) <= 1.0:
            raise DpftError("RunningRewardScaler gamma must lie in [0, 1], got {}.".format(gamma))
        if clip is not None and not float(clip) > 0:
            raise DpftError("RunningRewardScaler clip must be > 0 or null, got {}.".format(clip))
        self.num_envs = int(num_envs)
        self.gamma = float(gamma)
        self.clip = None if clip is None else float(clip)
        self.eps = float(eps)
        self.device = torch.device(device)
        self.stats = RunningMeanStd((), device=self.device)
        self.ret = torch.zeros(self.num_envs, dtype=torch.float64, device=self.device)

    def _check(self, x: torch.Tensor, name: str) -> None:
        if x.dim() != 2 or x.shape[1] != self.num_envs:
            raise DpftError("RunningRewardScaler: {} must be time-major (T, num_envs={}), got shape {}.".format(
                name, self.num_envs, tuple(x.shape)))

    def reset(self, rows: Optional[Sequence[int]] = None) -> None:
        """Zero the carried discounted return of env ``rows`` (all when ``None``): their episodes restart."""
        if rows is None:
            self.ret.zero_()
        else:
            self.ret[torch.as_tensor(list(rows), dtype=torch.long, device=self.device)] = 0.0

    def update(self, rewards: torch.Tensor, dones: torch.Tensor, reduce: Optional[Reduce] = None) -> None:
        """Run the discounted-return recursion over ``rewards (T, N)`` and merge all ``g_t`` into the stats."""
        self._check(rewards, "rewards")
        self._check(dones, "dones")
        r = rewards.detach().to(device=self.device, dtype=torch.float64)
        keep = 1.0 - dones.to(device=self.device).bool().to(torch.float64)
        g = torch.empty_like(r)
        ret = self.ret
        for t in range(r.shape[0]):
            ret = ret * self.gamma + r[t]
            g[t] = ret
            ret = ret * keep[t]
        self.ret = ret
        self.stats.update(g.reshape(-1), reduce=reduce)

    def scale(self, rewards: torch.Tensor) -> torch.Tensor:
        """``clip(rewards / sqrt(var + eps), -clip, clip)``, any shape, ``rewards``' dtype and device."""
        std = torch.sqrt(self.stats.var + self.eps).to(device=rewards.device, dtype=rewards.dtype)
        out = rewards / std
        return out if self.clip is None else out.clamp(-self.clip, self.clip)

    def __call__(self, rewards: torch.Tensor, dones: torch.Tensor, reduce: Optional[Reduce] = None) -> torch.Tensor:
        """:meth:`update` then :meth:`scale` (DPPO's order: this batch's returns are in the statistics)."""
        self.update(rewards, dones, reduce=reduce)
        return self.scale(rewards)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """``{"mean": (), "var": (), "count": (), "ret": (N,)}``, float64 CPU copies."""
        state = self.stats.state_dict()
        state["ret"] = self.ret.detach().cpu().clone()
        return state

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Restore exactly what :meth:`state_dict` returned (N checked)."""
        _require_keys(state, ("mean", "var", "count", "ret"), "RunningRewardScaler")
        ret = torch.as_tensor(state["ret"])
        if tuple(ret.shape) != (self.num_envs,):
            raise DpftError("RunningRewardScaler state 'ret' has shape {}, but this run has num_envs={} (the "
                            "number of envs must not change on resume).".format(tuple(ret.shape), self.num_envs))
        self.stats.load_state_dict({k: state[k] for k in ("mean", "var", "count")})
        self.ret = ret.to(device=self.device, dtype=torch.float64).clone()
