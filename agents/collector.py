"""The one on-policy rollout collector, over the batched env contract (:class:`dpft.envs.base.BatchedEnv`).

One RL step is one action chunk: the agent samples a normalized chunk for every env, the first ``act_steps``
actions are executed, and the env returns the chunk's summed reward, ``terminated`` / ``truncated`` kept apart,
success, and the observation history before auto-reset (``final_obs``). The collector stores, time-major
``(T, N, ...)``:

* ``obs``: the agent's model input (normalized state ``(T, N, To, Do)``, uint8 images) at each step;
* whatever the agent's ``act`` returned for training (DPPO: ``chain (T, N, K'+1, Ta, Da)`` and ``logprob``;
  PPO: ``action`` and ``logprob``) -- old log-probs come from the sampler itself, never recomputed;
* ``reward``, ``terminated`` (task end, or an episode cut by an env fault: never bootstrapped; with
  ``truncation_as_terminal`` also every time-limit end, as DPPO's furniture wrapper and ResiP do; with
  ``success_as_terminal`` every step from the task's success on, ResiP's sticky ``done``), ``truncated``;
* ``values (T, N)`` and ``next_values (T, N)``: ``V(obs after step t)``, which for an episode that ended at
  ``t`` is ``V(final_obs)`` (the truncation bootstrap), never the reset observation of the next episode.

It also counts finished episodes (return, length, success, faults) for the training-success log, and times
env stepping versus policy inference.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

import numpy as np
import torch

from dpft.envs.base import as_numpy


@dataclass
class Rollout:
    """One iteration's samples, time-major ``(T, N, ...)`` tensors on the agent's device."""

    obs: Dict[str, torch.Tensor]
    act: Dict[str, torch.Tensor]
    reward: torch.Tensor
    terminated: torch.Tensor
    truncated: torch.Tensor
    values: torch.Tensor
    next_values: torch.Tensor
    episodes: List[Dict[str, Any]] = field(default_factory=list)
    env_steps: int = 0
    env_time: float = 0.0
    policy_time: float = 0.0
    nan_episodes: int = 0
    #: transition form (off-policy agents, :meth:`next_obs`): model obs after the last step ``{key: (N, ...)}``
    #: and, for every step ``t`` where episodes ended, ``(t, rows, model obs of those rows' final_obs)``
    last_obs: Dict[str, torch.Tensor] = field(default_factory=dict)
    final_obs: List[Tuple[int, np.ndarray, Dict[str, torch.Tensor]]] = field(default_factory=list)

    @property
    def shape(self):
        return tuple(self.reward.shape)

    def next_obs(self) -> Dict[str, torch.Tensor]:
        """The transition form: ``{key: (T, N, ...)}`` model observation after each step -- ``obs[t + 1]`` (the
        last step: ``last_obs``), except in the rows whose episode ended at ``t``, which get that episode's FINAL
        observation (``final_obs`` before the auto-reset). The live observations in ``obs`` are never changed
        (DPPO's IDQL overwrites them through a shallow copy, ``rl_recipes.md`` 7.1)."""
        out = {}
        for k, v in self.obs.items():
            nxt = torch.cat([v[1:], self.last_obs[k].unsqueeze(0).to(v.device)])
            for t, rows, fobs in self.final_obs:
                nxt[t, torch.as_tensor(rows, device=v.device)] = fobs[k].to(v.device, v.dtype)
            out[k] = nxt
        return out


def _stack(items: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    return {k: torch.stack([d[k] for d in items]) for k in items[0]}


def _rows(obs: Dict[str, Any], rows: np.ndarray) -> Dict[str, Any]:
    """Rows of numpy arrays or (device) torch tensors (FurnitureEnv ``return_torch=True``)."""
    return {k: v[torch.as_tensor(rows, device=v.device)] if isinstance(v, torch.Tensor) else v[rows]
            for k, v in obs.items()}


class OnPolicyCollector:
    """Steps a :class:`BatchedEnv` with an agent for ``n_steps`` chunks per call.

    The agent provides ``obs_to_model(raw_obs) -> {key: (N, To, ...)}`` tensors, ``act(model_obs,
    deterministic=False) -> {name: (N, ...)}`` (with ``"action"``, the normalized chunk ``(N, Ta, Da)``),
    ``env_action(act_out) -> np.ndarray (N, act_steps, Da)`` and ``value(model_obs) -> (N,)``.
    """

    def __init__(self, env: Any, agent: Any, truncation_as_terminal: bool = False, success_as_terminal: bool = False):
        self.env = env
        self.agent = agent
        #: time-limit ends count as terminal (no bootstrap): DPPO's furniture wrapper, ResiP truncation_as_done
        self.truncation_as_terminal = bool(truncation_as_terminal)
        #: every step from the task's success on is terminal while the episode runs on (ResiP's sticky done)
        self.success_as_terminal = bool(success_as_terminal)
        self.raw_obs = None  # type: Any
        self._ep_return = np.zeros(env.num_envs)
        self._ep_length = np.zeros(env.num_envs, dtype=np.int64)

    def reset(self, seeds: List[int]) -> None:
        """Start a fresh episode in every env (``seeds[i]`` for env i)."""
        self.raw_obs = self.env.reset(seeds=list(seeds))
        self._ep_return[:] = 0.0
        self._ep_length[:] = 0
        self.agent.on_episode_start(np.arange(self.env.num_envs))

    @torch.no_grad()
    def collect(self, n_steps: int) -> Rollout:
        if self.raw_obs is None:
            raise RuntimeError("OnPolicyCollector.collect before reset()")
        agent, env = self.agent, self.env
        n = env.num_envs
        obs_list, act_list = [], []
        rewards = np.zeros((n_steps, n), dtype=np.float32)
        term = np.zeros((n_steps, n), dtype=bool)
        trunc = np.zeros((n_steps, n), dtype=bool)
        final_rows = []  # (t, rows, model obs of final_obs rows)
        episodes = []  # type: List[Dict[str, Any]]
        env_time = policy_time = 0.0
        env_steps = nan_eps = 0
        for t in range(n_steps):
            t0 = time.perf_counter()
            model_obs = agent.obs_to_model(self.raw_obs, update=True)
            out = agent.act(model_obs, deterministic=False)
            action = agent.env_action(out)
            t1 = time.perf_counter()
            res = env.step(action)
            t2 = time.perf_counter()
            policy_time += t1 - t0
            env_time += t2 - t1
            obs_list.append(model_obs)
            act_list.append({k: v for k, v in out.items()})
            # (N,) flags and rewards on the host; observations stay where the env keeps them (torch on the GPU
            # for FurnitureBench), the agent's obs_to_model moves them to the policy's device
            reward = as_numpy(res.reward).astype(np.float64)
            terminated, truncated = as_numpy(res.terminated).astype(bool), as_numpy(res.truncated).astype(bool)
            success = as_numpy(res.success).astype(bool)
            failed = np.asarray(res.info.get("failed", np.zeros(n, dtype=bool)), dtype=bool)
            bad = ~np.isfinite(reward)
            # the env layer cuts an episode at a non-finite obs/reward (VectorEnv: info["nan_resets"])
            nan_cut = np.asarray(res.info.get("nan_resets", np.zeros(n, dtype=bool)), dtype=bool)
            reward = np.where(bad, 0.0, reward)
            steps = np.asarray(res.info.get("steps", np.full(n, action.shape[1])))
            env_steps += int(steps.sum())
            self._ep_return += reward
            self._ep_length += steps
            rewards[t] = reward
            done = np.logical_or(terminated, truncated)
            # an episode cut by a fault (dead worker, NaN obs/reward) is not bootstrapped from
            term[t] = np.logical_or(terminated, failed | bad)
            if self.truncation_as_terminal:
                term[t] |= truncated
            if self.success_as_terminal:
                term[t] |= success
            trunc[t] = np.logical_and(truncated, ~term[t])
            rows = np.nonzero(done)[0]
            if len(rows):
                final_rows.append((t, rows, agent.obs_to_model(_rows(res.final_obs, rows))))
                for i in rows:
                    cut = bool(failed[i] or bad[i])
                    nan_eps += int(bad[i] or nan_cut[i])
                    episodes.append({"return": float(self._ep_return[i]), "length": int(self._ep_length[i]),
                                     "success": bool(success[i]) and not cut, "failed": cut})
                self._ep_return[rows] = 0.0
                self._ep_length[rows] = 0
                agent.on_episode_start(rows)
            self.raw_obs = res.obs
        t0 = time.perf_counter()
        obs = _stack(obs_list)
        last_obs = agent.obs_to_model(self.raw_obs)
        values_all = agent.value_batched({k: torch.cat([v.flatten(0, 1), last_obs[k]]) for k, v in obs.items()})
        values = values_all[: n_steps * n].reshape(n_steps, n)
        next_values = torch.cat([values[1:], values_all[n_steps * n:].reshape(1, n)])
        for t, rows, fobs in final_rows:
            idx = torch.as_tensor(rows, device=next_values.device)
            next_values[t, idx] = agent.value_batched(fobs)
        policy_time += time.perf_counter() - t0
        dev = values.device
        return Rollout(obs=obs, act=_stack(act_list), reward=torch.as_tensor(rewards, device=dev),
                       terminated=torch.as_tensor(term, device=dev), truncated=torch.as_tensor(trunc, device=dev),
                       values=values, next_values=next_values, episodes=episodes, env_steps=env_steps,
                       env_time=env_time, policy_time=policy_time, nan_episodes=nan_eps, last_obs=last_obs,
                       final_obs=final_rows)


__all__ = ["OnPolicyCollector", "Rollout"]
