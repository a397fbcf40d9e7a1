"""IDQL agent for ``dpft finetune agent=idql`` on the shared loop (:mod:`dpft.agents.finetune`) and collector.

    dpft finetune agent=idql checkpoint=RUN_DIR out=FT_DIR [agent.num_candidates=10 agent.replay_ratio=128 ...]

Per training iteration (DPPO's ``train_idql_diffusion_agent.py``, ``rl_recipes.md`` 1.2):

1. the shared collector steps the envs for ``n_steps`` chunks; each chunk is chosen among
   ``agent.num_candidates`` samples of the diffusion actor by ``agent.selection`` (DPPO: ``expectile``
   re-weighting with ``agent.selection_expectile``) scored by the target twin Q (:meth:`act`);
2. :meth:`update` appends the iteration's transitions to the chunk replay buffer in the collector's transition
   form (:meth:`dpft.agents.collector.Rollout.next_obs`): ``obs``, the whole sampled chunk (Q reads the executed
   ``act_steps``), ``reward x agent.reward_scale_const``, ``next_obs`` (for an episode that ended: its final
   observation, never the reset one, and the live observation is never overwritten: ``rl_recipes.md`` 7.1),
   ``terminated`` (no bootstrap) and ``truncated`` (time limit or the iteration-boundary reset: bootstrapped);
3. ``int(new transitions x agent.replay_ratio / agent.batch_size)`` gradient steps, each V -> Q -> target ->
   actor (:func:`dpft.rl.idql.idql_update`); the actor steps only after ``agent.n_critic_warmup_itr`` training
   iterations and when ``agent.train_actor``.

IN-RIL / CAIR (:mod:`dpft.agents.inril`, docs/inril.md): the plug-in ``self.inril`` hooks IDQL's **actor**
step, the only step that trains the policy: between its backward and its clip/step (reference RL direction,
alignment monitor, CAIR's combined gradient) and after it (one RL step counted; every m-th is followed by one IL
step: the actor's diffusion loss, :meth:`il_loss`, on a demo batch). So m counts actor gradient steps, which
are ``replay_ratio / batch_size`` per new transition; critic-only (warm-up) steps are not counted.
``inril.separation=network`` is refused (one policy network).

Evaluation (and the saved checkpoint, policy kind ``"idql"``) samples ``num_candidates`` chunks deterministically
and executes the argmax of the min target Q. The replay buffer, the critics and their optimizers are in the
checkpoint's training state, so ``resume=true`` continues exactly.
"""
from __future__ import annotations

from typing import Any, Dict, List

import numpy as np
import torch
from torch import nn

from dpft.errors import DpftError
from dpft.rl.idql import (IDQLActorCritic, IDQLPolicy, build_optimizers, gradient_steps, idql_meta, idql_updates,
                          make_idql_actor, settings_from_agent_config)
from dpft.rl.replay import ChunkReplayBuffer


class _NoRewardScaling:
    """IDQL has no running reward scaler (DPPO: a constant ``scale_reward_factor`` only); the loop resets one."""

    def reset(self) -> None:
        pass


class IDQLAgent:
    """The Agent interface of :mod:`dpft.agents.finetune` for IDQL (see the module docstring)."""

    name = "idql"

    def __init__(self, cfg: Any, policy: Any, num_envs: int, device: torch.device, generator: torch.Generator,
                 iterations: int):
        self.cfg = cfg
        self.settings = settings_from_agent_config(cfg)
        self.policy = policy
        self.model = make_idql_actor(policy.model, self.settings.ft_denoising_steps)
        self.device = device
        self.gen = generator
        self.act_steps = int(policy.act_steps)
        if policy.image_keys or int(policy.obs_dim) < 1:
            raise DpftError("agent=idql reads the low-dim state in its critics; this checkpoint observes cameras %s. "
                            "Pixel critics are not available (DPPO's IDQL is state-only)." % (policy.image_keys,))
        state_dim = int(policy.obs_dim) * int(policy.cond_steps)
        self.ac = IDQLActorCritic.from_settings(self.model, state_dim, self.act_steps, self.settings).to(device)
        self.critic = nn.ModuleDict({"value": self.ac.value, "q": self.ac.q, "q_target": self.ac.q_target})
        self.opts = build_optimizers(self.ac, self.settings)
        spec = {"state": ((int(policy.cond_steps), int(policy.obs_dim)), torch.float32)}
        self.replay = ChunkReplayBuffer(self.settings.replay_size, spec,
                                        (int(policy.horizon_steps), int(policy.action_dim)))
        self.reward_scaler = _NoRewardScaling()
        self.train_iterations = 0
        self.inril = None  # dpft.agents.inril.InRIL plug-in, attached by the trainer when configured

    # ------------------------------------------------------------------ acting (collector)
    def obs_to_model(self, raw_obs: Dict[str, Any], update: bool = False) -> Dict[str, torch.Tensor]:
        return self.policy.normalize_obs(raw_obs)

    def act(self, model_obs: Dict[str, torch.Tensor], deterministic: bool = False) -> Dict[str, torch.Tensor]:
        """``{"action": (N, Ta, Da)}``: the chosen candidate chunk per env (training rule of ``agent.selection``;
        ``deterministic=True`` = evaluation: deterministic sampler and argmax)."""
        st = self.settings
        rule = "argmax" if deterministic else st.selection
        chunk, _ = self.ac.select_actions(model_obs, st.num_candidates, rule=rule, deterministic=deterministic,
                                          generator=self.gen, expectile=st.selection_expectile,
                                          temperature=st.temperature)
        return {"action": chunk}

    def env_action(self, out: Dict[str, torch.Tensor]) -> np.ndarray:
        a = out["action"][:, : self.act_steps].clamp(-1.0, 1.0)
        return self.policy.normalizer.unnormalize("action", a).to("cpu", torch.float32).numpy()

    @torch.no_grad()
    def value_batched(self, model_obs: Dict[str, torch.Tensor], chunk: int = 8192) -> torch.Tensor:
        """V(s) (the collector logs it; IDQL's targets come from the replay in :meth:`update`)."""
        x = self.ac.critic_obs(model_obs)
        return torch.cat([self.ac.value(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)])

    def on_episode_start(self, rows: np.ndarray) -> None:
        pass

    # ------------------------------------------------------------------ update
    def add_rollout(self, ro: Any) -> int:
        """Append a rollout's transitions (time-major rows ``t * N + n``) to the replay; returns their count."""
        nxt = ro.next_obs()
        flat = lambda d: {k: v.flatten(0, 1).to("cpu") for k, v in d.items()}  # noqa: E731
        reward = ro.reward.reshape(-1).to("cpu", torch.float32) * float(self.settings.reward_scale)
        self.replay.add(flat({"state": ro.obs["state"]}), ro.act["action"].flatten(0, 1).to("cpu"), reward,
                        flat({"state": nxt["state"]}), ro.terminated.reshape(-1).to("cpu"),
                        ro.truncated.reshape(-1).to("cpu"))
        return int(ro.reward.numel())

    def update(self, ro: Any) -> Dict[str, Any]:
        st = self.settings
        new = self.add_rollout(ro)
        actor_on = bool(st.train_actor) and self.train_iterations >= int(st.actor_warmup_itr)
        steps = gradient_steps(new, st.batch_size, st.replay_ratio)
        info = idql_updates(self.ac, self.opts, self.replay, steps, st, generator=self.gen, update_actor=actor_on,
                            inril=self.inril)
        self.train_iterations += 1
        out = {"idql/%s" % k: v for k, v in info.items()}
        if self.inril is not None:
            out.update(self.inril.pop_metrics())
        out.update({"grad_steps": steps, "actor_updated": actor_on, "replay_size": len(self.replay),
                    "actor_lr": st.actor_lr, "critic_lr": st.q_lr})
        if "idql/actor_loss" in out:
            out["actor_loss"] = out["idql/actor_loss"]
        out["v_loss"] = out["idql/v_loss"]
        return out

    def il_loss(self, batch: Dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        """IN-RIL's imitation loss on a demo batch: the actor's own diffusion loss (the loss of its RL step, on
        demos instead of replayed chunks) through the fine-tuned copy on ``model.ft_timestep_range()``; the
        same :func:`dpft.agents.inril.actor_il_loss` DPPO uses."""
        from dpft.agents.inril import actor_il_loss

        return actor_il_loss(self.model, batch, generator)

    # ------------------------------------------------------------------ state and checkpoints
    def actor_parameters(self) -> List[nn.Parameter]:
        return self.model.finetune_parameters()

    def modules(self) -> Dict[str, nn.Module]:
        return {"critic": self.critic}

    def optimizers(self) -> Dict[str, Any]:
        return dict(self.opts)

    def schedulers(self) -> Dict[str, Any]:
        return {}  # constant learning rates (DPPO's IDQL configs: min_lr == max_lr)

    def extra_tensors(self) -> Dict[str, Dict[str, torch.Tensor]]:
        return {"replay": self.replay.state_dict()}

    def load_extra_tensors(self, tensors: Dict[str, Dict[str, torch.Tensor]]) -> None:
        self.replay.load_state_dict(tensors["replay"])

    def export_meta(self) -> Dict[str, Any]:
        return {"policy_kind": "idql", "idql": idql_meta(self.settings, self.ac)}

    def extra_weights(self) -> Dict[str, Dict[str, torch.Tensor]]:
        return {"critic": self.ac.critic_state_dict()}

    def eval_policy(self, normalizer: Any, meta: Dict[str, Any]) -> IDQLPolicy:
        """The policy the checkpoint gives ``dpft.load_policy`` (argmax of min target Q over the candidates)."""
        full = dict(meta)
        full.update(self.export_meta())
        return IDQLPolicy(self.ac, normalizer, full, self.settings.num_candidates, weights="model", device=self.device)


__all__ = ["IDQLAgent"]
