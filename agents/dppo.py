"""DPPO (Ren et al. 2024): PPO over the denoising chain of a diffusion policy (dppo.md section 3).

The last ``K' = ft_denoising_steps`` sampling steps run a trainable copy of the denoiser (the frozen base runs
the earlier steps; it is never evaluated on steps the copy serves); each of those steps is a Gaussian policy
``x_{k+1} ~ N(mean(x_k, k, obs), max(std_k, min_logprob_denoising_std))``. A sample of the PPO update is one
(env step, denoising step) pair; for pair ``(t, k)``:

* ``log pi`` = per-element log-probs of the first ``act_steps`` actions of the chunk (unexecuted horizon actions
  get no gradient), clamped to ``[logprob_min, logprob_max]`` and averaged (DPPO's per-dimension ratio);
* advantage ``A_t * gamma_denoising^(K'-1-k)`` (normalized per minibatch first) and clip coefficient
  ``c_k`` of the exponential schedule from ``clip_coef_base`` (k = 0) to ``clip_coef`` (k = K'-1); ``K' = 1``
  uses ``clip_coef`` (DPPO divides by zero there).

Old log-probs are those the sampler returned while acting. DDIM samples with ``ddim_eta`` = 1 in training and
deterministically (eta 0) at evaluation.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from dpft.rl.ppo_loss import clip_schedule, denoising_discount, ppo_policy_loss

from dpft.agents.onpolicy import OnPolicyAgent, clamp_mean, normalized


class DPPOAgent(OnPolicyAgent):
    name = "dppo"

    def __init__(self, cfg: Any, policy: Any, num_envs: int, device: torch.device, generator: torch.Generator,
                 iterations: int):
        super().__init__(cfg, policy, num_envs, device, generator, iterations)
        kp = self.model.ft_denoising_steps
        self.kp = kp
        self.clip_k = clip_schedule(kp, cfg.clip_coef_base, cfg.clip_coef, cfg.clip_rate).to(device)
        self.discount_k = denoising_discount(kp, cfg.gamma_denoising).to(device)

    def actor_parameters(self) -> List[nn.Parameter]:
        return self.model.finetune_parameters()

    def act(self, model_obs: Dict[str, torch.Tensor], deterministic: bool = False) -> Dict[str, torch.Tensor]:
        if deterministic:
            actions, _ = self.model.sample(model_obs, deterministic=True, generator=self.gen)
            return {"action": actions}
        actions, chain, logp = self.model.sample(model_obs, deterministic=False, generator=self.gen,
                                                 return_chain=True, return_log_prob=True)
        return {"action": actions, "chain": chain, "logprob": logp}

    def num_samples(self, ro: Any) -> int:
        t, n = ro.shape
        return t * n * self.kp

    def sample_rows(self, ro: Any, idx: torch.Tensor) -> torch.Tensor:
        return torch.div(idx, self.kp, rounding_mode="floor")

    def policy_loss(self, ro: Any, flat: Dict[str, Any], idx: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, Any]]:
        cfg, a = self.cfg, self.act_steps
        rows = self.sample_rows(ro, idx)
        k = idx - rows * self.kp
        obs = {key: v[rows] for key, v in flat["obs"].items()}
        chain = flat["act"]["chain"][rows]  # (B, K'+1, Ta, Da)
        ar = torch.arange(len(rows), device=chain.device)
        x_k, x_next = chain[ar, k], chain[ar, k + 1]
        cond = self.model.encode(obs, base=False, ft=True)
        new = self.model.step_log_prob(cond, x_k, x_next, k)[:, :a]
        old = flat["act"]["logprob"][rows, k][:, :a]
        new_lp = clamp_mean(new, cfg.logprob_min, cfg.logprob_max)
        old_lp = clamp_mean(old, cfg.logprob_min, cfg.logprob_max)
        adv = normalized(flat["adv"][rows], cfg.norm_adv, self.adv_reduce) * self.discount_k[k]
        loss, info = ppo_policy_loss(new_lp, old_lp, adv, self.clip_k[k])
        return loss, info


__all__ = ["DPPOAgent"]
