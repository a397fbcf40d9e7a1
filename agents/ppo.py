"""Gaussian PPO on a Gaussian checkpoint (DPPO's ``train_ppo_gaussian_agent``) or from scratch (CleanRL's
``ppo_continuous_action.py``).

The policy is ``N(mean(obs), std)`` over a chunk ``(Ta, Da)`` with a learned, state-independent, bounded
std per action dimension. ``log pi`` covers the first ``act_steps`` (executed) actions: ``logprob_reduction=
mean`` averages the per-element log-densities over action steps and dims and then clamps the mean to
``[logprob_min, logprob_max]`` (DPPO's ``gaussian_vpg.py`` order, :func:`mean_clamp`; the ratio is then a
per-dimension geometric mean, hence DPPO's tiny clip 0.01), ``sum`` adds them (CleanRL, ResiP; the true
log-density of the executed actions, no clamp). The update's log-densities use the sampler's own
``normal_log_prob``, so the first minibatch's ratio is exactly 1. Evaluation acts with the mean.

From scratch (``env=``), the ``ppo_scratch`` preset follows CleanRL: tanh 64x64 actor and critic with
orthogonal init (gain sqrt(2), actor head 0.01, critic head 1), std 1 at the start, running observation
normalization (``obs_norm``; saved into the checkpoint's normalizer, see :func:`export_obs_norm`), running
reward scaling, value clipping, global grad clip 0.5, linearly annealed learning rate.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np
import torch
from torch import nn

from dpft.rl.critic import ValueNet
from dpft.rl.ppo_loss import ppo_policy_loss
from dpft.rl.returns import RunningMeanStd

from dpft.agents.onpolicy import OnPolicyAgent, mean_clamp, normalized
from dpft.models.gaussian import normal_log_prob


def orthogonal_init(module: nn.Module, head_gain: float) -> None:
    """CleanRL's ``layer_init``: orthogonal weights (gain sqrt(2); the last Linear ``head_gain``), zero biases."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    for i, m in enumerate(linears):
        nn.init.orthogonal_(m.weight, head_gain if i == len(linears) - 1 else float(np.sqrt(2.0)))
        nn.init.zeros_(m.bias)


class PPOAgent(OnPolicyAgent):
    name = "ppo"

    def __init__(self, cfg: Any, policy: Any, num_envs: int, device: torch.device, generator: torch.Generator,
                 iterations: int, scratch: bool = False):
        self.scratch = bool(scratch)
        if self.scratch:
            orthogonal_init(policy.model.mlp, 0.01)
        super().__init__(cfg, policy, num_envs, device, generator, iterations)
        self.obs_rms = RunningMeanStd(shape=(int(policy.obs_dim),), device=device) if cfg.obs_norm else None

    def build_critic(self, state_dim: int) -> nn.Module:
        if not self.scratch:
            return super().build_critic(state_dim)
        critic = ValueNet(state_dim, list(self.cfg.critic_dims), activation=self.cfg.activation, residual=False)
        orthogonal_init(critic, 1.0)
        return critic

    def actor_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def obs_to_model(self, raw_obs: Dict[str, Any], update: bool = False) -> Dict[str, torch.Tensor]:
        obs = self.policy.normalize_obs(raw_obs)
        if self.obs_rms is not None:  # CleanRL NormalizeObservation: update with each new observation, then scale
            if update:  # (H-ddp) under DDP every rank merges the global batch moments
                self.obs_rms.update(obs["state"][:, -1], reduce=self.dp.all_reduce_sum if self.dp is not None else None)
            obs["state"] = self.obs_rms.normalize(obs["state"]).to(obs["state"].dtype)
        return obs

    def act(self, model_obs: Dict[str, torch.Tensor], deterministic: bool = False) -> Dict[str, torch.Tensor]:
        if deterministic:
            return {"action": self.model.sample(model_obs, deterministic=True)[0]}
        actions, _, logp = self.model.sample(model_obs, deterministic=False, generator=self.gen, return_log_prob=True)
        return {"action": actions, "logprob": self._reduce(logp[:, : self.act_steps])}

    def _reduce(self, logp: torch.Tensor) -> torch.Tensor:
        if self.cfg.logprob_reduction == "mean":
            return mean_clamp(logp, self.cfg.logprob_min, self.cfg.logprob_max)
        return logp.flatten(1).sum(1)

    def num_samples(self, ro: Any) -> int:
        t, n = ro.shape
        return t * n

    def sample_rows(self, ro: Any, idx: torch.Tensor) -> torch.Tensor:
        return idx

    def policy_loss(self, ro: Any, flat: Dict[str, Any], idx: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, Any]]:
        cfg, a = self.cfg, self.act_steps
        obs = {k: v[idx] for k, v in flat["obs"].items()}
        mean, std = self.model.distribution(obs)
        actions = flat["act"]["action"][idx]
        logp = normal_log_prob(actions - mean, std)[:, :a]  # the sampler's formula: the same float operations
        new = self._reduce(logp)
        adv = normalized(flat["adv"][idx], cfg.norm_adv, self.adv_reduce)
        loss, info = ppo_policy_loss(new, flat["act"]["logprob"][idx], adv, cfg.clip_coef)
        ent = self.model.entropy(reduction=cfg.logprob_reduction, act_steps=a)
        info["entropy"] = ent.detach()
        return loss - cfg.ent_coef * ent, info

    def extra_tensors(self) -> Dict[str, Dict[str, torch.Tensor]]:
        out = super().extra_tensors()
        if self.obs_rms is not None:
            out["obs_rms"] = self.obs_rms.state_dict()
        return out

    def load_extra_tensors(self, tensors: Dict[str, Dict[str, torch.Tensor]]) -> None:
        super().load_extra_tensors(tensors)
        if self.obs_rms is not None:
            self.obs_rms.load_state_dict(tensors["obs_rms"])

    def export_obs_norm(self, normalizer: Any) -> Any:
        """The checkpoint normalizer with the running observation statistics folded in: ``x_n = (x - mean) /
        sqrt(var + 1e-8)`` is min-max normalization with ``min = mean - s`` and ``max = mean + s`` for
        ``s = sqrt(var + 1e-8)`` (composed with the incoming normalizer, an identity for from-scratch runs)."""
        if self.obs_rms is None:
            return normalizer
        from dpft.normalization import MinMaxNormalizer

        lo = torch.as_tensor(normalizer.min("state"), dtype=torch.float64)
        hi = torch.as_tensor(normalizer.max("state"), dtype=torch.float64)
        s = torch.sqrt(self.obs_rms.var.cpu() + 1e-8)
        m = self.obs_rms.mean.cpu()
        half, mid = (hi - lo) / 2, (hi + lo) / 2  # x_n1 = (x - mid) / half; x_n = (x_n1 - m) / s
        new_mid, new_half = mid + m * half, s * half
        stats = {"state": ((new_mid - new_half).numpy(), (new_mid + new_half).numpy()),
                 "action": (normalizer.min("action"), normalizer.max("action"))}
        return MinMaxNormalizer(stats)


__all__ = ["PPOAgent", "orthogonal_init"]
