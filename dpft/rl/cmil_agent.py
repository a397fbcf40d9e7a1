"""CMIL's update (:class:`CmilLearner`): world model, discriminator, actor and critics; BC initialization.

One :meth:`CmilLearner.update` on a replay batch (expert + online sequences) and an expert batch, in this order
(the reference ``victorkolev/cmil`` ``Agent.train``; ``reference/inril_resip_furniture_cmil.md`` 5.1-5.3):

1. **World model**: :meth:`WorldModel.loss` (image [+ proprio] likelihood + balanced KL with free nats) on the
   replay batch; Adam step. Its posteriors (detached) start the imagination.
2. **Expert latents**: the expert batch filtered through the same posterior (no gradient); pairs
   ``(feat_t, action_{t+1})`` (:func:`~dpft.rl.cmil_math.pair_state_next_action`), dropping pairs whose
   ``t + 1`` starts a new episode.
3. **Imagination** (world model frozen): ``imag_horizon`` prior steps from every replay posterior, the actor
   sampling reparameterised actions (its input detached, the dynamics differentiable: DreamerV2's
   ``actor_grad: dynamics``).
4. **Reward** per imagined transition ``t -> t + 1``: the discriminator (frozen) on the instance-noised pair
   ``(feat_t, a_{t+1})``, minus ``alpha`` times the ensemble disagreement of the prior that made state ``t + 1``
   (:func:`~dpft.rl.cmil_math.imagined_reward`, ``code`` or ``paper`` form). Env rewards are never used.
5. **Actor**: ``-mean(weight * (lambda-return + actor_ent * entropy))`` with targets from the min of the two slow
   critics, plus ``bc_scale * -log pi(a_{t+1} | expert feat_t)``; gradients reach the actor through the frozen
   dynamics, discriminator and target critics.
6. **Discriminator**: BCE of expert pairs (label 1) vs the imagined pairs (label 0), both instance-noised
   (:func:`~dpft.rl.cmil_math.discriminator_loss`).
7. **Critics**: both regress the (detached) imagined lambda-returns (weighted), and, with ``real_critic``, the
   lambda-returns of ``D`` on the real replay sequence (the reference's ``data_reward``, clean inputs; the
   discount is cut where an episode starts). Every ``target_every`` updates the slow targets are copied.

All randomness (sampling in the model, the actor, member choice, instance noise) comes from one CPU
``torch.Generator`` (the trainer's, saved in checkpoints), so an update is a pure function of the weights,
optimizer states, batches and generator state.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Mapping

import torch
from torch import nn

from dpft.models.world_model import detach_state, frozen_params, mlp_head
from dpft.rl.cmil_math import (add_instance_noise, discriminator_loss, ensemble_disagreement, imagined_reward,
                               lambda_returns, pair_state_next_action)
from dpft.rl.cmil_policy import CmilModel


class CmilLearner:
    """Networks, optimizers and the update of CMIL (see the module docstring). ``c`` is a ``CmilConfig``."""

    def __init__(self, model: CmilModel, c: Any, device: torch.device, generator: torch.Generator):
        self.c = c
        self.model = model.to(device)
        self.device = device
        self.gen = generator
        feat, act = model.wm.feat_dim, model.action_dim
        self.critics = nn.ModuleList([mlp_head(feat, 1, c.critic_layers, c.critic_units, model.wm_cfg.act)
                                      for _ in range(2)]).to(device)
        self.targets = copy.deepcopy(self.critics)
        for p in self.targets.parameters():
            p.requires_grad_(False)
        self.disc = mlp_head(feat + act, 1, c.disc_layers, c.disc_units, model.wm_cfg.act).to(device)
        adam = lambda params, lr, wd=0.0: torch.optim.Adam(params, lr=float(lr), eps=float(c.opt_eps),  # noqa: E731
                                                           weight_decay=float(wd))
        self.opts = {"model": adam(model.wm.parameters(), c.model_lr, c.model_wd),
                     "actor": adam(model.actor.parameters(), c.actor_lr),
                     "critic": adam(self.critics.parameters(), c.critic_lr),
                     "disc": adam(self.disc.parameters(), c.disc_lr),
                     "bc": torch.optim.SGD(model.actor.parameters(), lr=float(c.bc_lr))}
        self.updates = 0
        self.bc_steps = 0

    # ------------------------------------------------------------------ state
    def modules(self) -> Dict[str, nn.Module]:
        """Trained modules besides the policy model (critics, slow targets, discriminator)."""
        return {"critics": self.critics, "targets": self.targets, "disc": self.disc}

    def _step(self, name: str, loss: torch.Tensor, params: List[nn.Parameter]) -> float:
        opt = self.opts[name]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, float(self.c.grad_clip))
        opt.step()
        return float(norm)

    # ------------------------------------------------------------------ pieces
    def expert_pairs(self, expert: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Expert latents (no gradient): ``feat (M, F)``, ``action (M, A)`` of the valid ``(feat_t, a_{t+1})``
        pairs and ``inputs (M, F + A)``."""
        wm = self.model.wm
        with torch.no_grad():
            post, _ = wm.observe(expert, sample=True, generator=self.gen)
            feat = wm.rssm.get_feat(post)
        valid = ~expert["is_first"][:, 1:]
        f = feat[:, :-1][valid]
        a = expert["action"][:, 1:][valid].to(f.dtype)
        return {"feat": f, "action": a, "inputs": torch.cat([f, a], -1)}

    def bc_loss(self, pairs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return -self.model.actor.log_prob(pairs["feat"], pairs["action"]).mean()

    def bc_step(self, expert: Mapping[str, torch.Tensor]) -> Dict[str, float]:
        """One BC-initialization step (SGD, ``bc_lr``) of the actor on expert latents."""
        loss = self.bc_loss(self.expert_pairs(expert))
        self._step("bc", loss, list(self.model.actor.parameters()))
        self.bc_steps += 1
        return {"bc_init_loss": float(loss.detach())}

    def _target_value(self, feat: torch.Tensor) -> torch.Tensor:
        return torch.min(self.targets[0](feat), self.targets[1](feat)).squeeze(-1)

    def _disc_reward(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if self.c.reward_form == "code" else logits

    # ------------------------------------------------------------------ update
    def update(self, batch: Mapping[str, torch.Tensor], expert: Mapping[str, torch.Tensor]) -> Dict[str, float]:
        c, m, g = self.c, self.model, self.gen
        wm = m.wm
        out = {}  # type: Dict[str, Any]
        # 1. world model
        wm_loss, wm_metrics, post = wm.loss(batch, generator=g)
        out["grad_norm/model"] = self._step("model", wm_loss, list(wm.parameters()))
        out.update(wm_metrics)
        post = detach_state(post)
        # 2. expert latents
        ex = self.expert_pairs(expert)
        # 3.-5. imagination, reward, actor
        with wm.frozen(), frozen_params(self.disc):
            seq = wm.imagine(lambda f: m.actor.sample(f, False, g), post, int(c.imag_horizon), float(c.discount), g)
            pairs = pair_state_next_action(seq["feat"], seq["action"], time_dim=0)  # (H, N, F + A)
            logits = self.disc(add_instance_noise(pairs, float(c.disc_noise), g)).squeeze(-1)
            reward = imagined_reward(logits, seq["ens_mean"], float(c.alpha), c.reward_form)  # (H, N)
            value = self._target_value(seq["feat"])  # (H + 1, N)
            ret = lambda_returns(reward, value, seq["discount"][1:], float(c.lam))  # (H, N)
            weight = seq["weight"][:-1].detach()
            ent = m.actor.entropy(seq["feat"][:-1].detach())
            objective = -(weight * (ret + float(c.actor_ent) * ent)).mean()
            bc = self.bc_loss(ex)
            actor_loss = objective + float(c.bc_scale) * bc
        out["grad_norm/actor"] = self._step("actor", actor_loss, list(m.actor.parameters()))
        if c.real_critic:  # the real pairs' reward, from the discriminator BEFORE its step (the reference's order)
            with torch.no_grad():
                rfeat = wm.rssm.get_feat(post).transpose(0, 1)  # (L, B, F)
                ract = batch["action"].transpose(0, 1).to(rfeat.dtype)
                rpairs = pair_state_next_action(rfeat, ract, time_dim=0)  # (L - 1, B, F + A)
                rreward = self._disc_reward(self.disc(rpairs).squeeze(-1))
        # 6. discriminator
        policy_in = pairs.detach().reshape(-1, pairs.shape[-1])
        d_loss, d_metrics = discriminator_loss(ex["inputs"], policy_in, self.disc, float(c.disc_noise), g)
        out["grad_norm/disc"] = self._step("disc", d_loss, list(self.disc.parameters()))
        out.update(d_metrics)
        # 7. critics
        feat_c = seq["feat"][:-1].detach()
        tgt = ret.detach()
        critic_loss = feat_c.new_zeros(())
        for critic in self.critics:
            critic_loss = critic_loss + 0.5 * (weight * (critic(feat_c).squeeze(-1) - tgt).pow(2)).mean()
        if c.real_critic:
            with torch.no_grad():
                cont = (~batch["is_first"].transpose(0, 1)[1:]).to(rfeat.dtype)  # (L - 1, B)
                rvalue = self._target_value(rfeat)  # (L, B)
                # where t + 1 starts another episode (the window crosses a boundary) the pair (feat_t, a_{t+1})
                # does not exist: row t gets R_t = V(feat_t) (no made-up reward, no cut of the return of t - 1,
                # which bootstraps from V(feat_t); episodes here end by time limit or iteration cut, never by a
                # terminal state)
                rreward = torch.where(cont > 0, rreward, rvalue[:-1])
                rret = lambda_returns(rreward, rvalue, float(c.discount) * cont, float(c.lam))
            for critic in self.critics:
                err = (critic(rfeat[:-1]).squeeze(-1) - rret).pow(2) * cont
                critic_loss = critic_loss + 0.5 * err.sum() / cont.sum().clamp(min=1.0)
            out["real_return"] = rret.mean()
        out["grad_norm/critic"] = self._step("critic", critic_loss, list(self.critics.parameters()))
        self.updates += 1
        if self.updates % int(c.target_every) == 0:
            self.targets.load_state_dict(self.critics.state_dict())
        with torch.no_grad():
            out.update(actor_loss=actor_loss.detach(), actor_objective=objective.detach(), bc_loss=bc.detach(),
                       critic_loss=critic_loss.detach(), imag_reward=reward.mean(), imag_return=ret.mean(),
                       imag_disagreement=ensemble_disagreement(seq["ens_mean"], member_dim=-2)[1:].mean(),
                       imag_disc_prob=torch.sigmoid(logits).mean(), actor_entropy=ent.mean(),
                       expert_pairs=float(ex["feat"].shape[0]))
        return {k: float(v) for k, v in out.items()}


__all__ = ["CmilLearner"]
