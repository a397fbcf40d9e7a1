"""IDQL (Hansen-Estruch et al. 2023) on a fine-tunable diffusion actor, as DPPO runs it (``rl_recipes.md`` 1, 6).

Modules (:class:`IDQLActorCritic`):

- ``actor``: the pretrained :class:`~dpft.diffusion.model.DiffusionModel`, made fine-tunable over the **whole
  chain** (``ft_denoising_steps = K'`` = every sampling step by default, :func:`make_idql_actor`): the
  trainable copy ``ft_network`` (and ``ft_obs_encoder`` when the encoder has weights) serves every step and is
  trained by the actor's own diffusion loss ``actor.loss(batch, network="ft", t_range=ft_timestep_range())``,
  which for DDPM with ``K' = K`` is every training timestep. This is DPPO's IDQL (``self.actor =
  self.network``, the whole DDPM actor trained in place) while keeping the frozen pretrained base next to it
  (the same two-network model as DPPO, so IN-RIL's IL update on ``network="ft"`` applies unchanged, and
  ``sample(use_base_network=True)`` still gives the pretrained policy). ``ft_denoising_steps=K' < N`` trains
  only the last K' steps' copy (a dpft option, not in the references).
- ``value``: :class:`~dpft.rl.critic.ValueNet` V(s), expectile regression on ``min(Q1', Q2')(s, a) - V(s)``.
- ``q``: :class:`~dpft.rl.critic.TwinQ` over ``(s, executed chunk)``; ``q_target``: its Polyak copy.

The critics read the normalized low-dim state history flattened (``model_obs["state"] (B, To, Do)``;
DPPO's IDQL is state-only) and the first ``act_steps`` actions of a chunk in the normalized action space (the
executed ones). The replay stores the whole sampled chunk ``(Ta, Da)`` so the actor's loss sees the chunk it
predicts; with ``Ta == act_steps`` (every DPPO IDQL config) both are the same.

One update on a replay batch (:func:`idql_update`), in DPPO's order::

    V step:      loss_v = expectile_loss(min(Q1', Q2')(s, a) - V(s), expectile)
    Q step:      y = r + gamma * V(s') * (1 - terminated)        # truncation bootstraps
                 loss_q = mean((Q1 - y)^2) + mean((Q2 - y)^2)
    target step: Q' <- (1 - critic_tau) Q' + critic_tau Q
    actor step:  actor.loss({"obs": s, "actions": chunk}, network="ft")   # skipped during the warm-up
    IN-RIL:      after every m-th actor step, one IL step (the same loss on a demo batch; docs/inril.md)

Action selection (:meth:`IDQLActorCritic.select_actions`): ``N`` candidates per observation from one batched
``sample(num_samples=N)`` (each observation encoded once), scored by the **target** twin
``min(Q1', Q2')``, one chosen by ``argmax`` / ``expectile`` re-weighting / ``softmax`` (:func:`dpft.rl.idql_math.select_candidates`).

Choices where DPPO and the IDQL paper differ (:class:`IDQLSettings` exposes both):

- **Expectiles**: ``expectile = 0.8`` for the V loss and ``selection_expectile = 0.7`` for the training-time
  re-weighting: DPPO's numbers (hard-coded there, ``rl_recipes.md`` 7.2), kept as defaults because dpft's IDQL
  reproduces DPPO's (and IN-RIL's) fine-tuning results on robomimic and gym; they are two separate options, so
  ``expectile=0.7`` gives the IDQL paper's locomotion critic. A higher loss expectile makes V closer to the max
  of Q over the behaviour policy, which suits an actor that keeps collecting its own improved data.
- **Actor trained or frozen**: trained by default (``train_actor=True``, DPPO: BC on its own replayed chunks,
  so the sampler drifts towards the chunks the critics picked); ``train_actor=False`` is the IDQL paper's
  online fine-tuning (critics only; the actor stays the pretrained one and improvement comes from selection).
  With fine-tuning from demos only (no offline data in the replay), DPPO's choice is the one with published
  numbers on these tasks.
- **Selection**: training ``selection="expectile"`` (DPPO's exploration), evaluation always ``argmax`` (DPPO's
  eval and the IDQL paper's selection); ``softmax`` with ``temperature`` is a dpft option.

Evaluation policy kind ``"idql"`` (:class:`IDQLPolicy`, registered with :func:`dpft.policy.register_policy_kind`):
``dpft.load_policy(FT_DIR)`` rebuilds the actor from ``meta["policy_spec"]``, the critics from
``critic.safetensors`` (the checkpoint's ``extra_weights={"critic": ...}``) and ``meta["idql"]``, and acts by
sampling ``num_candidates`` chunks and taking the argmax of the min target Q.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from dpft.errors import DpftError
from dpft.policy import Policy, register_policy_kind
from dpft.rl.critic import TwinQ, ValueNet, polyak_update, target_copy
from dpft.rl.idql_math import (SELECTION_RULES, candidate_scores, expectile_loss, gather_candidates,
                               select_candidates, twin_q_loss, twin_q_target)

CRITIC_FILE = "critic.safetensors"
CRITIC_WEIGHTS = "critic"  # the save_checkpoint extra_weights name (-> critic.safetensors)
POLICY_KIND = "idql"


@dataclass
class IDQLSettings:
    """IDQL hyperparameters; defaults are DPPO's robomimic (lift/can) ``ft_idql_diffusion_mlp.yaml``
    (``rl_recipes.md`` 1.5). DPPO gym: ``actor_lr=1e-4``, ``num_candidates=20``, ``gamma=0.99``,
    ``reward_scale=0.01``, replay 1M."""

    gamma: float = 0.999  # discount per chunk (gym 0.99)
    expectile: float = 0.8  # V loss expectile (DPPO 0.8; IDQL paper 0.7 locomotion / 0.9 AntMaze)
    selection: str = "expectile"  # training-time rule: argmax | expectile (DPPO) | softmax
    selection_expectile: float = 0.7  # weights of the "expectile" rule (DPPO 0.7 / 0.3)
    temperature: float = 1.0  # "softmax" rule: p ~ exp((Q - V) / temperature)
    num_candidates: int = 10  # N chunks sampled per observation (DPPO robomimic 10, gym 20; IDQL paper 64)
    critic_tau: float = 0.001  # Polyak rate of the target twin per gradient step (IDQL paper 0.005)
    actor_lr: float = 1e-5  # (gym 1e-4)
    v_lr: float = 1e-3
    q_lr: float = 1e-3
    weight_decay: float = 0.0  # AdamW, DPPO
    max_grad_norm: Optional[float] = None  # DPPO: unset
    batch_size: int = 1000
    replay_ratio: float = 128.0  # DPPO: gradient steps per iteration = new transitions * ratio / batch_size
    replay_size: int = 250000  # transitions (DPPO: buffer_size 5000 x 50 envs)
    actor_warmup_itr: int = 5  # training iterations that update only the critics (DPPO n_critic_warmup_itr)
    train_actor: bool = True  # DPPO; False = the IDQL paper's critic-only online fine-tuning
    reward_scale: float = 1.0  # DPPO scale_reward_factor (gym 0.01)
    ft_denoising_steps: Optional[int] = None  # None = the whole chain (DPPO's in-place actor)
    critic_dims: Tuple[int, ...] = (256, 256, 256)
    critic_activation: str = "mish"
    v_residual: bool = True  # DPPO CriticObs residual
    q_residual: bool = True  # DPPO asks for it but builds plain MLPs (misspelled key, rl_recipes.md 7.3)
    critic_layer_norm: bool = False

    @classmethod
    def from_mapping(cls, cfg: Any, **override: Any) -> "IDQLSettings":
        """Fields present in ``cfg`` (a mapping, dataclass or object with attributes) and ``override``."""
        values = {}
        for f in fields(cls):
            if isinstance(cfg, Mapping):
                if f.name in cfg:
                    values[f.name] = cfg[f.name]
            elif cfg is not None and hasattr(cfg, f.name):
                values[f.name] = getattr(cfg, f.name)
        values.update(override)
        if "critic_dims" in values:
            values["critic_dims"] = tuple(int(d) for d in values["critic_dims"])
        out = cls(**values)
        out.validate()
        return out

    def validate(self) -> None:
        """Range checks, each error naming the setting (``agent.<name>`` on the command line)."""
        def bad(name: str, want: str) -> DpftError:
            return DpftError("IDQL setting agent.%s=%r: expected %s." % (name, getattr(self, name), want))

        for name in ("expectile", "selection_expectile"):
            if not 0.0 < float(getattr(self, name)) < 1.0:
                raise bad(name, "a number in (0, 1) (DPPO: expectile 0.8, selection_expectile 0.7)")
        for name in ("gamma", "critic_tau"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise bad(name, "a number in [0, 1]")
        for name in ("temperature", "v_lr", "q_lr", "replay_ratio"):
            if not float(getattr(self, name)) > 0:
                raise bad(name, "a number > 0")
        if not float(self.actor_lr) >= 0:
            raise bad("actor_lr", "a number >= 0")
        for name in ("num_candidates", "batch_size", "replay_size"):
            if int(getattr(self, name)) < 1:
                raise bad(name, "an integer >= 1")
        if int(self.actor_warmup_itr) < 0:
            raise bad("actor_warmup_itr", "an integer >= 0")
        if self.selection not in SELECTION_RULES:
            raise bad("selection", "one of %s" % ", ".join(SELECTION_RULES))
        if self.max_grad_norm is not None and not float(self.max_grad_norm) > 0:
            raise bad("max_grad_norm", "a number > 0 or null (off)")
        if self.ft_denoising_steps is not None and int(self.ft_denoising_steps) < 1:
            raise bad("ft_denoising_steps", "null (the whole chain) or an integer >= 1")


def settings_from_agent_config(a: Any) -> IDQLSettings:
    """:class:`IDQLSettings` of ``dpft finetune agent=idql``'s flat :class:`dpft.rl.config.AgentConfig`: the IDQL
    keys by name, plus ``v_lr``/``q_lr`` (None = ``critic_lr``), ``n_critic_warmup_itr`` -> ``actor_warmup_itr``,
    ``reward_scale_const`` -> ``reward_scale``, ``ft_denoising_steps`` 0 -> the whole chain; residual critics when
    ``critic_dims`` is an odd count of equal widths (as the on-policy critic). Range-checked."""
    dims = tuple(int(d) for d in a.critic_dims)
    residual = len(set(dims)) == 1 and len(dims) % 2 == 1
    return IDQLSettings.from_mapping(
        a, v_lr=a.critic_lr if a.v_lr is None else a.v_lr, q_lr=a.critic_lr if a.q_lr is None else a.q_lr,
        actor_warmup_itr=int(a.n_critic_warmup_itr), reward_scale=float(a.reward_scale_const),
        ft_denoising_steps=int(a.ft_denoising_steps) or None, critic_dims=dims, v_residual=residual,
        q_residual=residual)


def gradient_steps(new_transitions: int, batch_size: int, replay_ratio: float) -> int:
    """DPPO's ``num_batch = int(new_transitions / batch_size * replay_ratio)`` (at least 1): every collected
    transition is drawn ``replay_ratio`` times on average (robomimic 50 x 300 chunks, batch 1000, ratio 128
    -> 1,920 steps per iteration)."""
    return max(1, int(int(new_transitions) * float(replay_ratio) / int(batch_size)))


def make_idql_actor(model: nn.Module, ft_denoising_steps: Optional[int] = None) -> nn.Module:
    """Make a pretrained :class:`DiffusionModel` IDQL's actor in place: a trainable copy over the last
    ``ft_denoising_steps`` sampling steps (None = all of them, DPPO's whole-chain actor) with the base frozen.
    A Gaussian model is refused (IDQL samples candidates from a diffusion actor)."""
    if not hasattr(model, "make_finetunable") or not hasattr(model, "num_sampling_steps"):
        raise DpftError("IDQL needs a diffusion checkpoint (its actor samples candidate chunks from the denoising "
                        "chain); got a %s. Use agent=ppo for Gaussian policies." % type(model).__name__)
    n = int(model.num_sampling_steps)
    k = n if ft_denoising_steps is None else int(ft_denoising_steps)
    if getattr(model, "ft_network", None) is not None and int(model.ft_denoising_steps) != k:
        raise DpftError("This checkpoint is already fine-tuned with ft_denoising_steps=%d; IDQL was asked for %d. "
                        "Fine-tune the pretrained checkpoint, or set agent.ft_denoising_steps=%d."
                        % (model.ft_denoising_steps, k, model.ft_denoising_steps))
    model.make_finetunable(k)
    return model


def _dims(dims: Sequence[int]) -> List[int]:
    return [int(d) for d in dims]


class IDQLActorCritic(nn.Module):
    """IDQL's networks (see the module docstring).

    Args:
        actor: a fine-tunable DiffusionModel (:func:`make_idql_actor`).
        state_dim: flattened critic input ``To * Do``.
        act_steps: executed actions per chunk (the Q input is ``act_steps * Da`` wide).
        critic_dims, critic_activation, v_residual, q_residual, critic_layer_norm: critic architecture
            (:class:`IDQLSettings`).
    """

    def __init__(self, actor: nn.Module, state_dim: int, act_steps: int, critic_dims: Sequence[int] = (256, 256, 256),
                 critic_activation: str = "mish", v_residual: bool = True, q_residual: bool = True,
                 critic_layer_norm: bool = False):
        super().__init__()
        if getattr(actor, "ft_network", None) is None:
            raise DpftError("IDQLActorCritic needs a fine-tunable actor; call make_idql_actor(model) first.")
        self.actor = actor
        self.act_steps = int(act_steps)
        self.action_dim = int(actor.action_dim)
        if not 1 <= self.act_steps <= int(actor.horizon_steps):
            raise DpftError("IDQL act_steps=%d must be between 1 and the actor's horizon_steps=%d."
                            % (self.act_steps, actor.horizon_steps))
        self.state_dim = int(state_dim)
        if self.state_dim < 1:
            raise DpftError("IDQL's critics read the low-dim state, but this policy has none (state_dim=0); pixel-only "
                            "checkpoints are not supported (DPPO's IDQL is state-only).")
        dims = _dims(critic_dims)
        self.arch = {"critic_dims": dims, "critic_activation": str(critic_activation), "v_residual": bool(v_residual),
                     "q_residual": bool(q_residual), "critic_layer_norm": bool(critic_layer_norm)}
        self.value = ValueNet(self.state_dim, dims, activation=critic_activation, residual=v_residual,
                              layer_norm=critic_layer_norm)
        self.q = TwinQ(self.state_dim, self.act_steps * self.action_dim, dims, activation=critic_activation,
                       residual=q_residual, layer_norm=critic_layer_norm)
        self.q_target = target_copy(self.q)

    @classmethod
    def from_settings(cls, actor: nn.Module, state_dim: int, act_steps: int, settings: IDQLSettings,
                      ) -> "IDQLActorCritic":
        return cls(actor, state_dim, act_steps, settings.critic_dims, settings.critic_activation, settings.v_residual,
                   settings.q_residual, settings.critic_layer_norm)

    # ------------------------------------------------------------------ inputs
    def critic_obs(self, model_obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``model_obs["state"] (B, To, Do)`` (normalized) flattened to ``(B, To*Do)``."""
        if "state" not in model_obs:
            raise DpftError("IDQL's critics read the low-dim 'state' observation; the batch has only %s."
                            % sorted(model_obs))
        return model_obs["state"].flatten(1)

    def executed(self, chunk: torch.Tensor) -> torch.Tensor:
        """The first ``act_steps`` actions of ``chunk (B, Ta', Da)`` (``Ta' >= act_steps``)."""
        return chunk[:, : self.act_steps]

    # ------------------------------------------------------------------ acting
    @torch.no_grad()
    def select_actions(self, model_obs: Mapping[str, torch.Tensor], num_candidates: int, rule: str = "argmax",
                       deterministic: bool = False, generator: Optional[torch.Generator] = None,
                       expectile: float = 0.7, temperature: float = 1.0) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Sample ``num_candidates`` chunks per observation in one batched call and choose one per observation.

        Returns ``(chunks (B, Ta, Da) normalized and clamped to [-1, 1], info)`` with ``info["index"] (B,)``
        (the chosen candidate), ``info["q"] (B, N)`` (min target Q of every candidate) and, for the
        ``expectile`` / ``softmax`` rules, ``info["v"] (B,)``. ``deterministic`` is the sampler's (DPPO's
        evaluation mode); the random draws of the stochastic rules use ``generator`` too.
        """
        n = int(num_candidates)
        cands = self.actor.sample(dict(model_obs), deterministic=deterministic, generator=generator,
                                  num_samples=n)[0]  # (B*N, Ta, Da), obs i -> rows i*N..i*N+N-1
        s = self.critic_obs(model_obs)
        b = s.shape[0]
        q_flat = self.q_target.min_q(s.repeat_interleave(n, dim=0), self.executed(cands))
        q, _ = candidate_scores(q_flat, b)
        info = {"q": q}
        v = None
        if rule != "argmax":
            v = self.value(s)
            info["v"] = v
        idx = select_candidates(q, v, rule=rule, expectile=expectile, temperature=temperature, generator=generator)
        info["index"] = idx
        return gather_candidates(cands, idx), info

    # ------------------------------------------------------------------ state
    def critic_state_dict(self) -> Dict[str, torch.Tensor]:
        """``value.*``, ``q.*`` and ``q_target.*`` tensors (what ``critic.safetensors`` holds)."""
        return {k: v.detach().clone() for k, v in self.state_dict().items() if not k.startswith("actor.")}

    def load_critic_state_dict(self, state: Mapping[str, torch.Tensor], source: str = "critic weights") -> None:
        """Strict inverse of :meth:`critic_state_dict` (missing/unexpected keys and shapes named)."""
        from dpft.checkpoint import load_state_strict

        holder = nn.ModuleDict({"value": self.value, "q": self.q, "q_target": self.q_target})
        load_state_strict(holder, state, source)


# ---------------------------------------------------------------------------------------------- update
def build_optimizers(ac: IDQLActorCritic, settings: IDQLSettings) -> Dict[str, torch.optim.Optimizer]:
    """AdamW for ``value``, ``q`` and (when ``train_actor``) the actor's trainable copy (DPPO: wd 0)."""
    opts = {
        "value": torch.optim.AdamW(ac.value.parameters(), lr=settings.v_lr, weight_decay=settings.weight_decay),
        "q": torch.optim.AdamW(ac.q.parameters(), lr=settings.q_lr, weight_decay=settings.weight_decay),
    }
    if settings.train_actor:
        opts["actor"] = torch.optim.AdamW(ac.actor.finetune_parameters(), lr=settings.actor_lr,
                                          weight_decay=settings.weight_decay)
    return opts


def _step(opt: torch.optim.Optimizer, loss: torch.Tensor, params: List[nn.Parameter], name: str,
          max_grad_norm: Optional[float], after_backward: Optional[Any] = None) -> None:
    if not bool(torch.isfinite(loss)):
        raise DpftError("The IDQL %s loss is %s; training stopped (the last good checkpoint is kept). Lower the "
                        "learning rates (agent.v_lr / agent.q_lr / agent.actor_lr), scale rewards down "
                        "(agent.reward_scale) or set agent.max_grad_norm." % (name, float(loss)))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if after_backward is not None:  # IN-RIL: reads (CAIR: replaces) the raw gradient before clipping
        after_backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, float(max_grad_norm))
    opt.step()


def idql_update(ac: IDQLActorCritic, optimizers: Mapping[str, torch.optim.Optimizer], batch: Mapping[str, Any],
                settings: IDQLSettings, generator: Optional[torch.Generator] = None,
                update_actor: bool = True, inril: Optional[Any] = None) -> Dict[str, float]:
    """One IDQL gradient step on a replay batch: V step -> Q step -> target update -> actor step.

    ``batch`` is :meth:`ChunkReplayBuffer.sample`'s layout: ``obs`` / ``next_obs`` model inputs (``"state"``
    normalized ``(B, To, Do)``), ``chunk (B, Ta', Da)`` normalized (Q reads its first ``act_steps``; the actor
    loss reads all of it and needs ``Ta' = horizon_steps``), ``reward (B,)`` (already scaled),
    ``terminated (B,)``. The actor step runs only when ``update_actor`` and an ``"actor"`` optimizer exists;
    its loss draws timesteps and noise from ``generator``. Returns floats: ``v_loss``, ``q_loss``, ``v``,
    ``q``, ``target`` (batch means) and ``actor_loss`` when the actor stepped.

    ``inril`` (:class:`dpft.agents.inril.InRIL`, or None) takes part in the actor step only, as in the on-policy
    update: ``inril.after_rl_backward()`` between the actor's backward and its clip/step (reference EMA, the
    alignment monitor, CAIR's combined gradient) and ``inril.after_rl_step()`` after the actor's optimizer step
    (counts one RL step; runs the IL step that falls due). A warm-up step (no actor step) is not an RL step.
    """
    s = ac.critic_obs(batch["obs"])
    s_next = ac.critic_obs(batch["next_obs"])
    chunk = batch["chunk"].to(s.dtype)
    a = ac.executed(chunk)
    reward = batch["reward"].to(s.dtype)
    mgn = settings.max_grad_norm
    # V step: expectile of min target Q over the behaviour (replayed) chunks
    with torch.no_grad():
        q_t = ac.q_target.min_q(s, a)
    v = ac.value(s)
    loss_v = expectile_loss(q_t - v, settings.expectile)
    _step(optimizers["value"], loss_v, list(ac.value.parameters()), "V", mgn)
    # Q step: bootstrap from the (just updated) online V, stopped only by termination
    with torch.no_grad():
        y = twin_q_target(reward, ac.value(s_next), batch["terminated"], settings.gamma)
    q1, q2 = ac.q(s, a)
    loss_q = twin_q_loss(q1, q2, y)
    _step(optimizers["q"], loss_q, list(ac.q.parameters()), "Q", mgn)
    polyak_update(ac.q_target, ac.q, settings.critic_tau)
    info = {"v_loss": float(loss_v.detach()), "q_loss": float(loss_q.detach()), "v": float(v.detach().mean()),
            "q": float(torch.minimum(q1, q2).detach().mean()), "target": float(y.mean())}
    if update_actor and "actor" in optimizers:
        actor = ac.actor
        loss_a, _ = actor.loss({"obs": dict(batch["obs"]), "actions": chunk}, generator=generator, network="ft",
                               t_range=actor.ft_timestep_range())
        _step(optimizers["actor"], loss_a, actor.finetune_parameters(), "actor", mgn,
              after_backward=inril.after_rl_backward if inril is not None else None)
        info["actor_loss"] = float(loss_a.detach())
        if inril is not None:
            inril.after_rl_step()
    return info


def idql_updates(ac: IDQLActorCritic, optimizers: Mapping[str, torch.optim.Optimizer], replay: Any, steps: int,
                 settings: IDQLSettings, generator: Optional[torch.Generator] = None,
                 update_actor: bool = True, inril: Optional[Any] = None) -> Dict[str, float]:
    """``steps`` calls of :func:`idql_update`, each on a fresh ``replay.sample(batch_size, generator)``;
    returns the means of the per-step infos and ``grad_steps``. The batch is moved to the critics' device.
    ``inril`` is passed to every :func:`idql_update` (its IL steps interleave with the actor steps)."""
    device = next(ac.value.parameters()).device
    sums = {}  # type: Dict[str, float]
    for _ in range(int(steps)):
        batch = replay.sample(settings.batch_size, generator=generator, device=device)
        for k, val in idql_update(ac, optimizers, batch, settings, generator, update_actor, inril=inril).items():
            sums[k] = sums.get(k, 0.0) + val
    out = {k: val / max(1, int(steps)) for k, val in sums.items()}
    out["grad_steps"] = int(steps)
    return out


# ---------------------------------------------------------------------------------------------- evaluation policy
def idql_meta(settings: IDQLSettings, ac: IDQLActorCritic) -> Dict[str, Any]:
    """``meta["idql"]`` of a checkpoint: what :func:`build_idql_policy` needs to rebuild the critics and act."""
    out = dict(ac.arch)
    out.update({"num_candidates": int(settings.num_candidates), "act_steps": int(ac.act_steps),
                "state_dim": int(ac.state_dim), "eval_selection": "argmax",
                "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()}})
    return out


class IDQLPolicy(Policy):
    """A :class:`dpft.policy.Policy` that acts as IDQL evaluates: ``num_candidates`` chunks sampled per
    observation, the one with the largest ``min(Q1', Q2')`` executed (``selection`` and ``num_candidates``
    are attributes; change them to evaluate other rules).

    Attributes: ``ac`` (:class:`IDQLActorCritic`), ``num_candidates``, ``selection`` (``"argmax"``),
    ``selection_expectile``, ``temperature``.
    """

    def __init__(self, ac: IDQLActorCritic, normalizer: Any, meta: Mapping[str, Any], num_candidates: int,
                 weights: str = "model", checkpoint_dir: Optional[str] = None, device: Union[str, torch.device] = "cpu"):
        super().__init__(ac.actor, normalizer, meta, weights=weights, checkpoint_dir=checkpoint_dir, device=device)
        self.ac = ac.to(self.device).eval()
        self.num_candidates = int(num_candidates)
        self.selection = "argmax"
        self.selection_expectile = 0.7
        self.temperature = 1.0

    @torch.no_grad()
    def predict_chunk(self, obs: Any, deterministic: bool = True, generator: Optional[torch.Generator] = None,
                      seed: Optional[int] = None) -> np.ndarray:
        """The chosen chunk, unnormalized: ``np.ndarray float32 (B, horizon_steps, Da)``."""
        if seed is not None:
            if generator is not None:
                raise DpftError("Pass either generator= or seed= to act/predict_chunk, not both.")
            generator = torch.Generator().manual_seed(int(seed))
        model_obs = self.normalize_obs(obs)
        chunk, _ = self.ac.select_actions(model_obs, self.num_candidates, rule=self.selection,
                                          deterministic=deterministic, generator=generator,
                                          expectile=self.selection_expectile, temperature=self.temperature)
        actions = self.normalizer.unnormalize("action", chunk.clamp(-1.0, 1.0))
        return actions.detach().to("cpu", torch.float32).numpy()

    def describe(self) -> Dict[str, Any]:
        out = super().describe()
        out.update({"policy_kind": POLICY_KIND, "num_candidates": self.num_candidates, "selection": self.selection})
        return out


def save_idql_checkpoint(run_dir: str, step: int, ac: IDQLActorCritic, normalizer: Any, meta: Mapping[str, Any],
                         config_yaml: str, training_state: Optional[Mapping[str, Any]] = None, keep: int = 3) -> str:
    """Write an IDQL checkpoint: the actor as ``model.safetensors`` (no EMA), the critics as
    ``critic.safetensors`` (``save_checkpoint(extra_weights={"critic": ...})``), ``meta["policy_kind"] = "idql"``
    (``meta`` must already hold ``policy_spec`` with the actor's ``ft_denoising_steps`` and ``idql`` from
    :func:`idql_meta`). Returns the checkpoint directory."""
    import inspect

    from dpft.checkpoint import save_checkpoint

    if "extra_weights" not in inspect.signature(save_checkpoint).parameters:
        raise DpftError("This dpft's dpft.checkpoint.save_checkpoint has no extra_weights argument, so IDQL's critics "
                        "cannot travel in the checkpoint; update dpft.")
    full = dict(meta)
    full["policy_kind"] = POLICY_KIND
    for key in ("policy_spec", "idql"):
        if key not in full:
            raise DpftError("save_idql_checkpoint: meta lacks %r (policy_spec with ft_denoising_steps=%d; idql from "
                            "idql_meta())." % (key, ac.actor.ft_denoising_steps))
    return save_checkpoint(run_dir, step, ac.actor.state_dict(), None, normalizer, full, config_yaml,
                           training_state=training_state, keep=keep,
                           extra_weights={CRITIC_WEIGHTS: ac.critic_state_dict()})


def _critic_state(ckpt: Any) -> Dict[str, torch.Tensor]:
    extra = getattr(ckpt, "extra_weights", None) or {}
    if CRITIC_WEIGHTS in extra:
        return dict(extra[CRITIC_WEIGHTS])
    path = os.path.join(ckpt.dir, CRITIC_FILE)
    if not os.path.isfile(path):
        raise DpftError("Checkpoint '%s' is an IDQL checkpoint (policy_kind 'idql') but has no %s: the critics that "
                        "choose among the candidate chunks are missing." % (ckpt.dir, CRITIC_FILE))
    from dpft.checkpoint import read_tensors

    checksums = None
    try:  # verify against meta.json's checksums like every other file of the checkpoint
        from dpft.checkpoint import _Checksums

        checksums = _Checksums(ckpt.dir, ckpt.meta, None)
    except Exception:  # an older checkpoint module without checksums
        checksums = None
    return read_tensors(path, checksums)


def build_idql_policy(ckpt: Any, weights: str = "ema", device: Union[str, torch.device] = "cpu") -> IDQLPolicy:
    """Policy-registry builder of kind ``"idql"``: actor from ``meta["policy_spec"]`` and ``model.safetensors``
    (IDQL keeps no actor EMA: ``weights="ema"`` falls back to the live weights when there is no EMA file),
    critics from ``critic.safetensors``, architecture and ``num_candidates`` from ``meta["idql"]``."""
    from dpft.checkpoint import EMA_FILE, MODEL_FILE, load_state_strict
    from dpft.policy import build_model_from_spec

    meta = ckpt.meta
    for key in ("policy_spec", "idql"):
        if key not in meta:
            raise DpftError("Checkpoint file '%s' has policy_kind 'idql' but lacks meta key %r; it was not written "
                            "by dpft finetune agent=idql." % (os.path.join(ckpt.dir, "meta.json"), key))
    info = meta["idql"]
    actor = build_model_from_spec(meta)
    used = weights
    if weights == "ema" and ckpt.ema_state is not None:
        load_state_strict(actor, ckpt.ema_state, os.path.join(ckpt.dir, EMA_FILE))
    else:
        used = "model"
        load_state_strict(actor, ckpt.model_state, os.path.join(ckpt.dir, MODEL_FILE))
    with torch.random.fork_rng(devices=[]):
        ac = IDQLActorCritic(actor, int(info["state_dim"]), int(info["act_steps"]), info["critic_dims"],
                             info["critic_activation"], info["v_residual"], info["q_residual"],
                             info["critic_layer_norm"])
    ac.load_critic_state_dict(_critic_state(ckpt), os.path.join(ckpt.dir, CRITIC_FILE))
    return IDQLPolicy(ac, ckpt.normalizer, meta, int(info["num_candidates"]), weights=used, checkpoint_dir=ckpt.dir,
                      device=device)


register_policy_kind(POLICY_KIND, build_idql_policy)

__all__ = ["IDQLSettings", "IDQLActorCritic", "IDQLPolicy", "make_idql_actor", "build_optimizers", "idql_update",
           "idql_updates", "gradient_steps", "settings_from_agent_config", "idql_meta", "build_idql_policy", "save_idql_checkpoint", "CRITIC_FILE", "CRITIC_WEIGHTS",
           "POLICY_KIND"]
