"""Shared on-policy agent: critic, optimizers, returns and the PPO update loop. DPPO and Gaussian PPO are
subclasses that define only how they act and their policy loss on a minibatch.

Per iteration (:meth:`OnPolicyAgent.update`):

1. rewards scaled by the running std of the discounted return (``reward_scale_running``; statistics reset at
   iteration-boundary env resets), times ``reward_scale_const``;
2. truncation-aware GAE at the chunk level (:func:`dpft.rl.returns.gae`); returns ``R = A + V_old`` fixed for
   the iteration;
3. ``update_epochs`` passes over ``num_samples`` shuffled samples in minibatches of ``batch_size`` (a last,
   smaller minibatch is dropped, as DPPO, unless it is the only one); each minibatch computes the subclass's
   policy loss and the critic's ``0.5 (V - R)^2`` (optionally clipped around ``V_old``); if the minibatch's
   approximate KL (k3) exceeds ``target_kl`` the iteration's updates stop **before** that step is applied;
   gradients are checked for NaN/Inf through their one combined norm (the run stops with a message; the last good
   checkpoint stays), clipped to ``max_grad_norm`` and applied by the two AdamW optimizers (actor and critic).
   During the first ``n_critic_warmup_itr`` training iterations only the critic steps.

Data parallel (H-ddp, ``agent.dp`` set by the trainer under torchrun): the same loop over GLOBAL minibatches (rank 0's
permutation of all ranks' samples); each rank computes its members (:meth:`OnPolicyAgent._dp_minibatch`), the
gradients are summed over ranks before the NaN check and clipping, and advantage normalization, the reward scaler,
the KL stop and the logged statistics are global (:mod:`dpft.rl.data_parallel`). Single-process runs never enter it.

Subclass API: ``obs_to_model(raw)``, ``act(model_obs, deterministic) -> {"action": (N, Ta, Da), ...}``,
``actor_parameters()``, ``num_samples(rollout)``, ``policy_loss(rollout, flat, idx) -> (loss, info)`` and
``sample_rows(rollout, idx) -> env-step row indices`` (for the critic), and ``export()`` for checkpoints.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np
import torch
from torch import nn

from dpft.errors import DpftError
from dpft.rl.critic import ValueNet
from dpft.rl.ppo_loss import explained_variance, normalize_advantages, value_loss
from dpft.rl.returns import RunningRewardScaler, gae


class OnPolicyAgent:
    """Base class (see the module docstring). ``model``: the actor (``DiffusionModel``/``GaussianModel``);
    ``policy``: a :class:`dpft.policy.Policy` around it (observation normalization, action un-normalization)."""

    name = "onpolicy"

    def __init__(self, cfg: Any, policy: Any, num_envs: int, device: torch.device, generator: torch.Generator,
                 iterations: int):
        self.cfg = cfg
        self.policy = policy
        self.model = policy.model
        self.device = device
        self.gen = generator
        self.act_steps = int(policy.act_steps)
        state_dim = int(policy.obs_dim) * int(policy.cond_steps)
        if policy.image_keys:
            raise DpftError("The RL critic reads low-dim state only; this checkpoint observes cameras %s. Pixel "
                            "critics are not available yet." % (policy.image_keys,))
        self.critic = self.build_critic(state_dim).to(device)
        self.actor_opt = torch.optim.AdamW(self.actor_parameters(), lr=cfg.actor_lr, weight_decay=cfg.weight_decay)
        self.critic_opt = torch.optim.AdamW(self.critic.parameters(), lr=cfg.critic_lr, weight_decay=cfg.weight_decay)
        total = max(1, int(iterations))
        lam = (lambda it: max(0.0, 1.0 - it / total)) if cfg.lr_schedule == "linear" else (lambda it: 1.0)
        self.actor_sched = torch.optim.lr_scheduler.LambdaLR(self.actor_opt, lam)
        self.critic_sched = torch.optim.lr_scheduler.LambdaLR(self.critic_opt, lam)
        self.reward_scaler = RunningRewardScaler(num_envs, gamma=cfg.gamma, clip=cfg.reward_clip, device=device)
        self.train_iterations = 0  # training iterations done (critic warm-up counts these)
        self.inril = None  # (H-inril) dpft.agents.inril.InRIL plug-in, attached by the trainer when configured
        #: (H-ddp) :class:`dpft.rl.data_parallel.DataParallel` under torchrun (set by the trainer), else None
        self.dp = None  # type: Any
        #: (H-ddp) the minibatch's global advantage sums for :func:`normalized` (``reduce=``), set per minibatch
        self.adv_reduce = None  # type: Any
        self._actor_on = False

    def build_critic(self, state_dim: int) -> nn.Module:
        """DPPO's ``CriticObs``: V(flattened normalized state history), residual Mish MLP."""
        dims = [int(d) for d in self.cfg.critic_dims]
        return ValueNet(state_dim, dims, residual=len(set(dims)) == 1 and len(dims) % 2 == 1)

    # ------------------------------------------------------------------ acting
    def obs_to_model(self, raw_obs: Dict[str, Any], update: bool = False) -> Dict[str, torch.Tensor]:
        """Raw env observations -> the model's input (``update``: the collector's per-step call, which may
        update running statistics)."""
        return self.policy.normalize_obs(raw_obs)

    def critic_input(self, model_obs: Dict[str, torch.Tensor]) -> torch.Tensor:
        return model_obs["state"].flatten(1)

    def value_batched(self, model_obs: Dict[str, torch.Tensor], chunk: int = 8192) -> torch.Tensor:
        x = self.critic_input(model_obs)
        return torch.cat([self.critic(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)])

    def env_action(self, out: Dict[str, torch.Tensor]) -> np.ndarray:
        """Raw actions ``(N, act_steps, Da)``: the first ``act_steps`` of the normalized chunk, clamped to the
        data range [-1, 1] and un-normalized (chains and log-probs keep the raw sample)."""
        a = out["action"][:, : self.act_steps].clamp(-1.0, 1.0)
        return self.policy.normalizer.unnormalize("action", a).to("cpu", torch.float32).numpy()

    def on_episode_start(self, rows: np.ndarray) -> None:
        """Called by the collector for env rows whose episode starts (stateful actors reset them)."""

    def _clip_and_check(self, params: List[nn.Parameter], pg_loss: Any, v_loss: Any) -> None:
        """Clip ``params``' gradients to ``max_grad_norm`` (one global norm, CleanRL/ResiP) or just measure it, and
        stop the run if that norm is NaN/Inf (one host sync; before any optimizer step, so the clipped values are
        moot and the last good checkpoint stays)."""
        if self.cfg.max_grad_norm is not None:
            total_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        else:
            total_norm = grad_total_norm(params)
        if not bool(torch.isfinite(total_norm)):
            raise DpftError("The %s update produced NaN/Inf gradients at training iteration %d (policy loss %s, "
                            "value loss %s); training stopped, the last good checkpoint is kept. Lower "
                            "agent.actor_lr / agent.critic_lr or set agent.max_grad_norm."
                            % (self.name, self.train_iterations, pg_loss, v_loss))

    # ------------------------------------------------------------------ to override
    def actor_parameters(self) -> List[nn.Parameter]:
        raise NotImplementedError

    def act(self, model_obs: Dict[str, torch.Tensor], deterministic: bool = False) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def num_samples(self, ro: Any) -> int:
        raise NotImplementedError

    def sample_rows(self, ro: Any, idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def policy_loss(self, ro: Any, flat: Dict[str, Any], idx: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, Any]]:
        raise NotImplementedError

    # ------------------------------------------------------------------ update
    def advantages(self, ro: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(advantages, returns)`` ``(T, N)`` of a rollout (scaled rewards, truncation-aware GAE)."""
        cfg = self.cfg
        reward = ro.reward.to(torch.float64)
        if cfg.reward_scale_running:  # (H-ddp) under DDP every rank merges the global return moments
            reward = self.reward_scaler(reward, ro.terminated | ro.truncated,
                                        reduce=self.dp.all_reduce_sum if self.dp is not None else None)
        reward = reward * cfg.reward_scale_const
        adv, ret = gae(reward.to(ro.values.dtype), ro.values, ro.next_values, ro.terminated, ro.truncated,
                       cfg.gamma, cfg.gae_lambda)
        return adv, ret

    def update(self, ro: Any) -> Dict[str, Any]:
        cfg = self.cfg
        adv, ret = self.advantages(ro)
        t, n = ro.shape
        flat = {
            "obs": {k: v.flatten(0, 1) for k, v in ro.obs.items()},
            "act": {k: v.flatten(0, 1) for k, v in ro.act.items()},
            "adv": adv.reshape(-1), "ret": ret.reshape(-1), "v_old": ro.values.reshape(-1),
        }
        actor_on = self.train_iterations >= cfg.n_critic_warmup_itr
        self._actor_on = actor_on
        total = self.num_samples(ro)
        dp = self.dp
        layout = dp.layout(ro.shape, total) if dp is not None else None
        if layout is not None:  # (H-ddp) minibatches over the GLOBAL samples, each rank computes its members
            total = layout.total
        bs = min(int(cfg.batch_size), total)
        n_mb = max(1, total // bs)
        stats = {"approx_kl": [], "clipfrac": [], "ratio": [], "pg_loss": [], "v_loss": [], "entropy": []}
        stopped = False
        steps = 0
        actor_params = self.actor_parameters()
        critic_params = list(self.critic.parameters())
        for _ in range(int(cfg.update_epochs)):
            perm = torch.randperm(total, generator=self.gen, device="cpu")
            if dp is not None:
                perm = dp.broadcast(perm)  # rank 0's permutation: the same minibatches on every rank
            perm = perm.to(self.device)
            for j in range(n_mb):
                idx = perm[j * bs:(j + 1) * bs]
                if dp is not None:
                    mb = self._dp_minibatch(ro, flat, layout, idx, actor_on, actor_params, critic_params, stats)
                    if mb is None:
                        stopped = True
                        break
                    steps += 1
                    continue
                pg, info = self.policy_loss(ro, flat, idx)
                if cfg.target_kl is not None and actor_on and float(info["approx_kl"]) > cfg.target_kl:
                    stopped = True
                    break
                rows = self.sample_rows(ro, idx)
                v = self.critic(self.critic_input({k: x[rows] for k, x in flat["obs"].items()}))
                vl = value_loss(v, flat["ret"][rows], old_v=flat["v_old"][rows] if cfg.clip_vloss else None,
                                clip=cfg.clip_vloss)
                loss = cfg.vf_coef * vl + (pg if actor_on else 0.0 * pg)
                self.actor_opt.zero_grad(set_to_none=True)
                self.critic_opt.zero_grad(set_to_none=True)
                loss.backward()
                self.after_backward(actor_params)
                # one combined gradient norm (one host sync): NaN/Inf anywhere makes it non-finite. With
                # max_grad_norm it is clip_grad_norm_'s total norm (one global norm over actor and critic, CleanRL,
                # ResiP); a non-finite one stops the run before any optimizer step, so the clipped values are moot
                self._clip_and_check(actor_params + critic_params, float(pg.detach()), float(vl.detach()))
                self.critic_opt.step()
                if actor_on:
                    self.actor_opt.step()
                    if self.inril is not None:  # (H-inril) one IL step after every m RL steps
                        self.inril.after_rl_step()
                steps += 1
                stats["pg_loss"].append(float(pg.detach()))
                stats["v_loss"].append(float(vl.detach()))
                for k in ("approx_kl", "clipfrac", "ratio", "entropy"):
                    if k in info:
                        stats[k].append(float(info[k]))
            if stopped:
                break
        self.critic_sched.step()
        if actor_on:
            self.actor_sched.step()
        self.train_iterations += 1
        out = {k: float(np.mean(v)) for k, v in stats.items() if v}
        if dp is not None:  # (H-ddp) over the whole (T, N) batch
            ev = explained_variance(dp.all_gather_cat(ro.values, 1).reshape(-1), dp.all_gather_cat(ret, 1).reshape(-1))
        else:
            ev = explained_variance(ro.values.reshape(-1), ret.reshape(-1))
        if self.inril is not None:
            out.update(self.inril.pop_metrics())
        out.update({"grad_steps": steps, "kl_stop": bool(stopped), "actor_updated": bool(actor_on),
                    "explained_variance": None if ev != ev else float(ev),
                    "actor_lr": self.actor_opt.param_groups[0]["lr"], "critic_lr": self.critic_opt.param_groups[0]["lr"]})
        return out

    def _dp_minibatch(self, ro: Any, flat: Dict[str, Any], layout: Any, idx: torch.Tensor, actor_on: bool,
                      actor_params: List[nn.Parameter], critic_params: List[nn.Parameter],
                      stats: Dict[str, List[float]]) -> Any:
        """(H-ddp) One minibatch step under DDP (:mod:`dpft.rl.data_parallel`): this rank's members of the global
        minibatch ``idx``, mean losses weighted by their share, gradients summed over ranks, global advantage
        normalization and KL stop. Returns None when the target-KL stop fires (before the step), else True."""
        from dpft.rl.data_parallel import weighted_means

        cfg, dp = self.cfg, self.dp
        local = layout.local(idx)
        n_loc = int(local.numel())
        w = n_loc / float(idx.numel())
        rows = self.sample_rows(ro, local)
        a = flat["adv"][rows].detach().reshape(-1).to(torch.float64)
        sums = dp.all_reduce_sum(torch.stack([torch.tensor(float(a.numel()), dtype=torch.float64, device=a.device),
                                              a.sum(), (a * a).sum()]))
        self.adv_reduce = (lambda _local: sums) if float(sums[0]) > 1 else None
        pg = info = None
        if n_loc:
            pg, info = self.policy_loss(ro, flat, local)
        keys = ("approx_kl", "clipfrac", "ratio", "entropy")
        g = weighted_means(dp, [("pg_loss", None if pg is None else float(pg.detach()))]
                           + [(k, float(info[k]) if info is not None and k in info else None) for k in keys],
                           w, self.device)
        self.adv_reduce = None
        if cfg.target_kl is not None and actor_on and g.get("approx_kl", 0.0) > cfg.target_kl:
            return None
        self.actor_opt.zero_grad(set_to_none=True)
        self.critic_opt.zero_grad(set_to_none=True)
        vl = None
        if n_loc:
            v = self.critic(self.critic_input({k: x[rows] for k, x in flat["obs"].items()}))
            vl = value_loss(v, flat["ret"][rows], old_v=flat["v_old"][rows] if cfg.clip_vloss else None,
                            clip=cfg.clip_vloss)
            loss = cfg.vf_coef * vl + (pg if actor_on else 0.0 * pg)
            (loss * w).backward()
        vl_sum = dp.all_reduce_grads(actor_params + critic_params,
                                     extra=torch.tensor([0.0 if vl is None else w * float(vl.detach())]))
        v_glob = float(vl_sum[0])
        self._clip_and_check(actor_params + critic_params, g.get("pg_loss"), v_glob)
        self.critic_opt.step()
        if actor_on:
            self.actor_opt.step()
        stats["pg_loss"].append(g["pg_loss"])
        stats["v_loss"].append(v_glob)
        for k in keys:
            if k in g:
                stats[k].append(g[k])
        return True

    def after_backward(self, actor_params: List[nn.Parameter]) -> None:
        """Hook between backward and the optimizer steps (IN-RIL reads the RL gradient here)."""
        if self.inril is not None and self._actor_on:  # (H-inril) reference EMA, monitor, CAIR's combination
            self.inril.after_rl_backward()

    def il_loss(self, batch: Dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        """(H-inril) The imitation loss on a demo batch through the parameters RL trains: DPPO the epsilon loss
        through the fine-tuned copy on the fine-tuned steps' timesteps (``model.ft_timestep_range()``), a
        Gaussian policy its NLL. Observations get the agent's own transform (running obs normalization)."""
        from dpft.agents.inril import actor_il_loss  # the one IL loss of every agent (IDQL's too)

        return actor_il_loss(self.model, batch, generator, getattr(self, "obs_rms", None))

    # ------------------------------------------------------------------ state
    def modules(self) -> Dict[str, nn.Module]:
        return {"critic": self.critic}

    def optimizers(self) -> Dict[str, Any]:
        return {"actor": self.actor_opt, "critic": self.critic_opt}

    def schedulers(self) -> Dict[str, Any]:
        return {"actor": self.actor_sched, "critic": self.critic_sched}

    def extra_tensors(self) -> Dict[str, Dict[str, torch.Tensor]]:
        return {"reward_scaler": self.reward_scaler.state_dict()}

    def load_extra_tensors(self, tensors: Dict[str, Dict[str, torch.Tensor]]) -> None:
        self.reward_scaler.load_state_dict(tensors["reward_scaler"])


def grad_total_norm(params: List[nn.Parameter]) -> torch.Tensor:
    """The 2-norm of all ``.grad`` of ``params`` together (a 0-d tensor, no host sync): ``torch._foreach_norm``
    per tensor, then the norm of those norms (``clip_grad_norm_``'s total norm without the clipping)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if hasattr(torch, "_foreach_norm"):
        norms = torch._foreach_norm(grads)
    else:
        norms = [torch.linalg.vector_norm(g) for g in grads]
    return torch.linalg.vector_norm(torch.stack([n.to(grads[0].device) for n in norms]))


def normalized(adv: torch.Tensor, on: bool, reduce: Any = None) -> torch.Tensor:
    """Per-minibatch advantage normalization (``on``); ``reduce`` (H-ddp: the agent's ``adv_reduce``) gives the
    global minibatch sums ``(n, sum A, sum A^2)`` under DDP."""
    if reduce is not None:
        return normalize_advantages(adv, reduce=reduce) if on else adv
    return normalize_advantages(adv) if on and adv.numel() > 1 else adv


def clamp_mean(logp: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """DPPO's diffusion log-prob reduction (``diffusion_ppo.py``): per-element log-probs ``(B, ..., Da)`` clamped
    to [lo, hi], then averaged -> ``(B,)``."""
    return logp.clamp(lo, hi).flatten(1).mean(1)


def mean_clamp(logp: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """DPPO's Gaussian log-prob reduction (``gaussian_vpg.py``): per-element log-probs ``(B, act_steps, Da)``
    averaged over action steps and dims first, then the mean clamped to [lo, hi] -> ``(B,)``.

    Clamping each element instead would cut the gradient of every element above ``hi`` (at std 0.04, 56% of them
    with hi = 2) and bias the log-std score."""
    return logp.flatten(1).mean(1).clamp(lo, hi)


__all__ = ["OnPolicyAgent", "normalized", "clamp_mean", "mean_clamp", "grad_total_norm"]
