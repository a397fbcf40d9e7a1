"""Residual PPO (ResiP, Ankile et al. 2024, arXiv 2407.16677) on the shared on-policy loop.

``dpft finetune agent=residual_ppo checkpoint=RUN_DIR out=FT_DIR`` keeps the diffusion checkpoint frozen as the
base and trains a per-step Gaussian residual on top (:mod:`dpft.rl.residual`: model, per-env base-chunk cache,
stateful evaluation policy). The env runs with ``act_steps = 1``: one RL step is one env step, so ``n_steps`` is
env steps per env per iteration and ``gamma`` is per env step (ResiP 0.999).

What PPO sees (ResiP ``residual_ppo.py``): state ``x = [clamp(normalized obs history, +-obs_clip), base action of
this step]`` for actor and critic; stored action = the *unscaled* residual sample; ``log pi`` = Gaussian
log-density summed over ``Da``; evaluation takes the residual mean (the base still samples its initial noise
from the run's generator). The update is the shared one (:class:`dpft.agents.onpolicy.OnPolicyAgent`): running
reward scaling with clip, truncation-aware GAE (:func:`dpft.rl.returns.gae`), per-minibatch advantage
normalization, ``update_epochs`` epochs with target-KL early stop **before** the offending step, grad clip,
separate AdamW optimizers for the residual (``actor_lr``) and the critic (``critic_lr``).

Bootstrap values need the base action at the observation after a step. For the live batch (all envs) it is what
the cache would give next (:meth:`BaseChunkCache.step` with ``advance=False``); for the final observation of an
episode that ended in a subset of envs it is the first action of a fresh base plan for that observation (the
cache cannot tell which env rows the collector passes; both are draws of the base at that state).

Deviations from ResiP (and why):

* reward scaling: the shared ``RunningRewardScaler`` (std of the discounted return, DPPO/CleanRL, reset at
  iteration-boundary env resets) with ``reward_clip`` (ResiP: 5), instead of ResiP's running std of the per-step
  reward updated during evaluation too (``rl_recipes.md`` 4.3 and 7.8);
* time limits are truncations bootstrapped from ``V(final obs)`` (ResiP treats them as terminal), unless
  ``truncation_as_terminal=true`` (the ``residual_ppo_furniture`` preset); ResiP also makes every step after a
  success terminal (its ``done`` is sticky): ``success_as_terminal=true`` (that preset too);
* learning rates are constant or linear (``lr_schedule``), not cosine; AdamW epsilon is torch's default
  (ResiP 1e-5); gradients are clipped jointly over actor and critic as in ResiP;
* the KL stop skips the step that crosses ``target_kl`` (ResiP applies it, then stops);
* the base samples each plan from fresh noise (ResiP warm-starts from the previous plan with a timestep mismatch,
  across episodes) and re-plans per env.

IN-RIL (:mod:`dpft.agents.inril`): ``inril.separation=network`` trains the base by imitation (its diffusion loss,
:meth:`ResidualPPOAgent.il_parameters` / :meth:`il_loss`) while RL trains the residual (ResiP's
``residual_ppo_w_bc.py`` idea, which never ran there: ``rl_recipes.md`` 4.6); the alignment monitor and the other
separations work in the residual's space with the residual's NLL of the demo correction as the IL loss.

Exact resume needs ``reset_at_iteration=true`` (the default): the base-chunk cache is then empty at every
iteration boundary, so the checkpoint (residual + base weights, critic, optimizers, reward scaler, sampler RNG)
holds all the state.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
from torch import nn

from dpft.errors import DpftError
from dpft.rl.critic import ValueNet
from dpft.rl.ppo_loss import ppo_policy_loss
from dpft.rl.residual import BaseChunkCache, ResidualModel, ResidualPolicy, residual_meta, residual_spec

from dpft.agents.onpolicy import OnPolicyAgent, normalized
from dpft.agents.ppo import PPOAgent


def residual_spec_from_config(a: Any, base_act_steps: int) -> Dict[str, Any]:
    """The residual's settings from ``agent.*`` (``mlp_dims``/``activation`` of the residual MLP, ``residual_*``,
    ``std_min``/``std_max`` as the bounds of a learnable std); ``base_act_steps`` when ``agent.residual_base_act_steps``
    is unset (the pretrained checkpoint's ``act_steps``)."""
    return residual_spec(
        hidden_dims=list(a.mlp_dims), activation=a.activation, action_scale=a.residual_scale,
        init_logstd=a.residual_init_logstd, learn_std=a.residual_learn_std,
        logstd_min=None if a.std_min is None else math.log(float(a.std_min)),
        logstd_max=None if a.std_max is None else math.log(float(a.std_max)), obs_clip=a.residual_obs_clip,
        base_act_steps=int(a.residual_base_act_steps or base_act_steps))


class ResidualPPOAgent(OnPolicyAgent):
    name = "residual_ppo"

    # ------------------------------------------------------------------ building (Finetuner hook)
    @staticmethod
    def model_from_checkpoint(c: Any) -> Tuple[ResidualModel, Any, Dict[str, Any]]:
        """``(ResidualModel, normalizer, meta)`` of ``c.checkpoint`` (a diffusion checkpoint, rebuilt with the
        sampler ``agent.use_ddim``/``agent.ddim_steps`` asks for and frozen); meta is the residual checkpoint's
        (``policy_kind: residual``, ``act_steps: 1``; :func:`dpft.rl.residual.residual_meta`)."""
        from dpft.agents.finetune import _policy_spec_of
        from dpft.checkpoint import load_checkpoint
        from dpft.models import build_policy_model
        from dpft.policy import load_weights

        a = c.agent
        ckpt = load_checkpoint(c.checkpoint, ema=c.weights == "ema")
        have = ckpt.meta.get("policy_kind") or ckpt.meta.get("policy_type", "diffusion")
        if have != "diffusion" or ckpt.meta.get("policy_type", "diffusion") != "diffusion":
            raise DpftError("agent=residual_ppo needs a pretrained diffusion checkpoint as its base, but '%s' holds a "
                            "%s policy (%s); pretrain a diffusion policy (policy=diffusion_mlp or diffusion_unet) "
                            "first." % (ckpt.dir, have, ckpt.meta.get("policy")))
        if ckpt.meta.get("ft_denoising_steps"):
            raise DpftError("agent=residual_ppo takes a pretrained checkpoint as its base; '%s' is a DPPO fine-tuned "
                            "one (ft_denoising_steps=%s)." % (ckpt.dir, ckpt.meta["ft_denoising_steps"]))
        spec = _policy_spec_of(ckpt)
        if a.use_ddim is not None:
            spec["use_ddim"] = bool(a.use_ddim)
        if a.ddim_steps is not None:
            spec["ddim_steps"] = int(a.ddim_steps)
        if spec.get("use_ddim") and not spec.get("ddim_steps"):
            raise DpftError("agent.use_ddim=true needs agent.ddim_steps (ResiP's base samples with 4).")
        spec["ft_denoising_steps"] = 0
        m = ckpt.meta
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(c.seed))
            base = build_policy_model(spec, m["obs_shapes"], int(m["obs_dim"]), list(m["image_keys"]),
                                      int(m["action_dim"]), int(m["horizon_steps"]), int(m["cond_steps"]))
            load_weights(base, ckpt, c.weights)
            rspec = residual_spec_from_config(a, int(m["act_steps"]))
            model = ResidualModel(base, int(m["obs_dim"]), int(m["cond_steps"]), rspec)
        meta = residual_meta(m, spec, rspec)
        meta.update({"policy_type": "residual", "source_checkpoint": os.path.abspath(ckpt.dir)})
        return model, ckpt.normalizer, meta

    # ------------------------------------------------------------------ networks
    def __init__(self, cfg: Any, policy: Any, num_envs: int, device: torch.device, generator: torch.Generator,
                 iterations: int):
        if not isinstance(policy.model, ResidualModel):
            raise DpftError("agent=residual_ppo needs the residual model built by its model_from_checkpoint hook.")
        super().__init__(cfg, policy, num_envs, device, generator, iterations)
        self.cache = BaseChunkCache(self.model.base_act_steps)

    def build_critic(self, state_dim: int) -> nn.Module:
        """ResiP's critic: ReLU MLP on ``[state, base action]``, orthogonal init (head gain 0.25, bias 0.25)."""
        critic = ValueNet(state_dim + self.model.action_dim, list(self.cfg.critic_dims), activation=self.cfg.activation,
                          residual=False)
        linears = [m for m in critic.modules() if isinstance(m, nn.Linear)]
        for i, m in enumerate(linears):
            last = i == len(linears) - 1
            nn.init.orthogonal_(m.weight, 0.25 if last else float(np.sqrt(2.0)))
            nn.init.constant_(m.bias, 0.25 if last else 0.0)
        return critic

    def actor_parameters(self) -> List[nn.Parameter]:
        return self.model.residual_parameters()

    # ------------------------------------------------------------------ acting
    def _plan(self, obs: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.plan(obs, self.gen)

    def obs_to_model(self, raw_obs: Dict[str, Any], update: bool = False) -> Dict[str, torch.Tensor]:
        """Normalized obs plus ``"base_action" (N, Da)``: the base's action of this env step (``update``: the
        collector's per-step call, which advances the per-env cache; otherwise a peek, see the module docstring)."""
        obs = self.policy.normalize_obs(raw_obs)
        n = int(next(iter(obs.values())).shape[0])
        if update:
            obs["base_action"] = self.cache.step(obs, self._plan)
        elif self.cache.valid is not None and self.cache.valid.shape[0] == n:
            obs["base_action"] = self.cache.step(obs, self._plan, advance=False)
        else:
            obs["base_action"] = self._plan(obs)[:, 0]
        return obs

    def on_episode_start(self, rows: np.ndarray) -> None:
        self.cache.reset([int(r) for r in rows])

    def critic_input(self, model_obs: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.residual_input(model_obs["state"], model_obs["base_action"])

    def act(self, model_obs: Dict[str, torch.Tensor], deterministic: bool = False) -> Dict[str, torch.Tensor]:
        m = self.model
        base = model_obs["base_action"]
        res, logp = m.sample_residual(m.residual_input(model_obs["state"], base), deterministic, self.gen)
        return {"action": m.env_action(base, res)[:, None], "residual": res, "logprob": logp}

    def eval_policy(self, normalizer: Any, meta: Dict[str, Any]) -> ResidualPolicy:
        """The stateful policy the checkpoint gives ``dpft rollout`` (fresh cache, residual mean)."""
        p = ResidualPolicy(self.model, normalizer, meta, weights="model", device=self.device)
        self.model.train()
        return p

    # ------------------------------------------------------------------ IN-RIL hooks (agents/inril.py)
    def il_parameters(self) -> List[nn.Parameter]:
        """IN-RIL's network separation (``inril.separation=network``): IL trains the base, RL the residual. Makes
        the base trainable (the RL path never reaches it: plans run under ``no_grad``) and returns its parameters."""
        self.model.set_base_trainable(True)
        return self.model.base_parameters()

    def il_loss(self, batch: Dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        """The imitation loss on a demo batch (normalized ``obs``, ``actions (B, Ta, Da)``).

        With a trainable base (network separation): the base's diffusion loss
        (:meth:`ResidualModel.base_il_loss`). Otherwise, in the residual's own parameter space (what the
        alignment monitor compares with the RL gradient): the residual's negative log-likelihood, summed over
        ``Da``, of the residual that turns a fresh base plan's first action ``b`` into the demo's first action,
        ``r* = (a*_0 - b) / residual_scale`` (ResiP's supervised residual target)."""
        m = self.model
        if any(p.requires_grad for p in m.base_parameters()):
            return m.base_il_loss(batch, generator)[0]
        obs = batch["obs"]
        base = m.plan(obs, generator)[:, 0]
        target = (batch["actions"][:, 0] - base) / m.action_scale
        return -m.residual.log_prob(m.residual_input(obs["state"], base), target).mean()

    # ------------------------------------------------------------------ update
    num_samples = PPOAgent.num_samples  # one sample per env step
    sample_rows = PPOAgent.sample_rows

    def policy_loss(self, ro: Any, flat: Dict[str, Any], idx: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, Any]]:
        cfg, m = self.cfg, self.model
        x = m.residual_input(flat["obs"]["state"][idx], flat["obs"]["base_action"][idx])
        new = m.residual.log_prob(x, flat["act"]["residual"][idx])
        adv = normalized(flat["adv"][idx], cfg.norm_adv, self.adv_reduce)
        loss, info = ppo_policy_loss(new, flat["act"]["logprob"][idx], adv, cfg.clip_coef)
        ent = m.residual.entropy()
        info["entropy"] = ent.detach()
        return loss - cfg.ent_coef * ent, info


__all__ = ["ResidualPPOAgent", "residual_spec_from_config"]
