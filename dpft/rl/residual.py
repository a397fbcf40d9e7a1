"""Residual policy of ResiP (Ankile et al. 2024, arXiv 2407.16677): a frozen diffusion base plus a per-step
Gaussian residual, as a module (:class:`ResidualModel`), a stateful evaluation policy (:class:`ResidualPolicy`,
registered as policy kind ``"residual"``) and the per-env base-chunk cache both use (:class:`BaseChunkCache`).

    policy = dpft.load_policy("runs/lift_residual")     # meta["policy_kind"] == "residual"
    policy.reset()                                       # all envs start an episode
    a = policy.act(obs)                                  # np.ndarray (B, 1, Da): one env step per call
    policy.reset([3])                                    # env 3 starts a new episode: only its cache clears

How it acts (everything in the checkpoint's normalized action space, [-1, 1]):

* the **base** (the pretrained :class:`~dpft.diffusion.model.DiffusionModel`, frozen, DDIM with few steps,
  eta 0, so its only randomness is the initial noise ``x_K``; ResiP: 4 steps) plans a chunk ``(Ta, Da)`` for an
  env when that env's episode starts and then every ``base_act_steps`` env steps (ResiP: 8 of a 32-step
  plan). Each env has its own cached chunk and step index, so envs re-plan independently;
* the **residual** (:class:`ResidualActor`): ``N(mu(x), sigma)`` with ``x = [clamp(normalized obs history,
  +-obs_clip), base action of this step]`` (ResiP: obs clamp 3), an MLP (ResiP: 2 x 256 ReLU) whose last layer
  is zero-initialized without bias, so ``mu = 0`` and the first actions are exactly the base's; ``log sigma``
  fixed at ``init_logstd`` (ResiP: -1, ``learn_std false``) or learnable within ``[logstd_min, logstd_max]``;
* **env action** = ``unnormalize(clamp(base_j + action_scale * residual, -1, 1))`` with ``action_scale`` 0.1
  (ResiP); training samples the residual, evaluation (``deterministic=True``) takes its mean. PPO log-probs are
  those of the *unscaled* residual sample, summed over ``Da`` (ResiP). The env runs with ``act_steps = 1``.
* the critic of residual PPO sees ``x`` too (the base action is part of the state of the residual MDP).

Parameter groups: ``model.base`` (never given to the RL optimizer; ``requires_grad=False`` until
:meth:`ResidualModel.set_base_trainable`) and ``model.residual``. IN-RIL's network separation trains the base by
imitation later through :meth:`ResidualModel.base_il_loss` (``DiffusionModel.loss(network="base")``).

Fixed ResiP defects (``rl_recipes.md`` 4.1 and 7.8): ResiP warm-starts each plan from the previous one noised to
t = 50 but denoises it as t = 75 (diffusers' "leading" spacing), keeps that previous plan across episodes, and
uses one action queue for all envs (correct only when every env resets in lock step). Here every plan starts
from fresh noise with the timesteps the schedule says, the cache is per env, and :meth:`BaseChunkCache.reset`
(called by the collector and by the rollout for the rows whose episode starts) drops exactly those rows' plans.

Checkpoint layout (written by ``dpft finetune agent=residual_ppo``): ``model.safetensors`` holds ``base.*`` and
``residual.*``; ``meta.json`` has ``policy_kind: "residual"``, ``policy_spec`` (the base, with its DDIM
settings), ``residual_spec`` (:func:`residual_spec`), ``act_steps: 1`` and the base's ``horizon_steps``, so
:func:`build_residual_model` rebuilds it from the metadata alone.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from dpft.errors import DpftError
from dpft.models.mlp import MLP
from dpft.policy import Policy, build_model_from_spec, register_policy_kind

#: ResiP's residual settings (``actor/residual_diffusion.yaml``, ``base_residual_rl.yaml``)
RESIDUAL_DEFAULTS = {"hidden_dims": [256, 256], "activation": "relu", "action_scale": 0.1, "init_logstd": -1.0,
                     "learn_std": False, "logstd_min": -5.0, "logstd_max": 0.0, "obs_clip": 3.0,
                     "base_act_steps": 8}


def residual_spec(**kw: Any) -> Dict[str, Any]:
    """The residual's settings with :data:`RESIDUAL_DEFAULTS` filled in (``None`` values take the default);
    unknown keys are refused."""
    unknown = sorted(set(kw) - set(RESIDUAL_DEFAULTS))
    if unknown:
        raise DpftError("Unknown residual setting(s) %s; known: %s." % (unknown, ", ".join(sorted(RESIDUAL_DEFAULTS))))
    out = dict(RESIDUAL_DEFAULTS)
    out.update({k: v for k, v in kw.items() if v is not None})
    out["hidden_dims"] = [int(d) for d in out["hidden_dims"]]
    for key in ("action_scale", "init_logstd", "logstd_min", "logstd_max", "obs_clip"):
        out[key] = float(out[key])
    out["learn_std"] = bool(out["learn_std"])
    out["base_act_steps"] = int(out["base_act_steps"])
    out["activation"] = str(out["activation"])
    if not out["action_scale"] > 0 or not out["obs_clip"] > 0:
        raise DpftError("residual action_scale=%s and obs_clip=%s must be > 0 (ResiP: 0.1 and 3)."
                        % (out["action_scale"], out["obs_clip"]))
    if out["learn_std"] and not out["logstd_min"] <= out["init_logstd"] <= out["logstd_max"]:
        raise DpftError("residual init_logstd=%s must lie in [logstd_min, logstd_max] = [%s, %s] when learn_std is "
                        "true." % (out["init_logstd"], out["logstd_min"], out["logstd_max"]))
    if out["base_act_steps"] < 1:
        raise DpftError("residual base_act_steps=%d must be >= 1 (env steps between base re-plans; ResiP: 8)."
                        % out["base_act_steps"])
    return out


class ResidualActor(nn.Module):
    """``x (B, in_dim) -> N(mu(x) (B, Da), sigma (Da,))``; zero-initialized, bias-free last layer (ResiP)."""

    def __init__(self, in_dim: int, action_dim: int, hidden_dims: Sequence[int] = (256, 256), activation: str = "relu",
                 init_logstd: float = -1.0, learn_std: bool = False, logstd_min: float = -5.0,
                 logstd_max: float = 0.0):
        super().__init__()
        dims = [int(in_dim)] + [int(d) for d in hidden_dims]
        self.trunk = MLP(dims + [int(action_dim)], activation=activation)
        linears = [m for m in self.trunk.modules() if isinstance(m, nn.Linear)]
        for m in linears[:-1]:  # ResiP layer_init: Kaiming (ReLU) hidden layers, zero biases
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
        head = linears[-1]
        nn.init.zeros_(head.weight)  # action_head_std 0.0: the residual mean starts at exactly 0
        head.bias = None
        self.log_std = nn.Parameter(torch.full((int(action_dim),), float(init_logstd)), requires_grad=bool(learn_std))
        self.logstd_min, self.logstd_max = float(logstd_min), float(logstd_max)
        self.learn_std = bool(learn_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def std(self) -> torch.Tensor:
        log_std = self.log_std.clamp(self.logstd_min, self.logstd_max) if self.learn_std else self.log_std
        return log_std.exp()

    def log_prob(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``log N(residual; mu(x), sigma)`` summed over ``Da`` (ResiP): ``(B,)``."""
        std = self.std()
        z = (residual - self(x)) / std
        return (-0.5 * z * z - torch.log(std) - 0.5 * math.log(2 * math.pi)).sum(-1)

    def entropy(self) -> torch.Tensor:
        """Entropy of the Gaussian, summed over ``Da`` (0-d)."""
        return (torch.log(self.std()) + 0.5 * math.log(2 * math.pi * math.e)).sum()


class ResidualModel(nn.Module):
    """Frozen diffusion ``base`` + :class:`ResidualActor` ``residual`` (see the module docstring).

    Args:
        base: the pretrained ``DiffusionModel`` (sampled deterministically: DDIM eta 0 / DPPO's DDPM eval mode).
        obs_dim, cond_steps: ``Do`` and ``To`` of the normalized ``state`` history the residual reads.
        spec: :func:`residual_spec` output.
    """

    def __init__(self, base: nn.Module, obs_dim: int, cond_steps: int, spec: Mapping[str, Any]):
        super().__init__()
        spec = residual_spec(**dict(spec))
        if getattr(base, "ft_network", None) is not None:
            raise DpftError("The residual's base must be a plain pretrained diffusion model, not one made "
                            "fine-tunable (ft_denoising_steps > 0).")
        self.spec = spec
        self.base = base
        self.action_dim = int(base.action_dim)
        self.horizon_steps = int(base.horizon_steps)
        if spec["base_act_steps"] > self.horizon_steps:
            raise DpftError("residual base_act_steps=%d must be <= the base's horizon_steps=%d (the plan's length)."
                            % (spec["base_act_steps"], self.horizon_steps))
        self.obs_dim, self.cond_steps = int(obs_dim), int(cond_steps)
        self.input_dim = self.obs_dim * self.cond_steps + self.action_dim
        self.residual = ResidualActor(self.input_dim, self.action_dim, spec["hidden_dims"], spec["activation"],
                                      spec["init_logstd"], spec["learn_std"], spec["logstd_min"], spec["logstd_max"])
        self.action_scale = spec["action_scale"]
        self.obs_clip = spec["obs_clip"]
        self.base_act_steps = spec["base_act_steps"]
        self.set_base_trainable(False)

    # ------------------------------------------------------------------ parameter groups
    def set_base_trainable(self, flag: bool) -> None:
        """``requires_grad`` of the base's parameters (False for RL; IN-RIL's IL steps turn it on)."""
        for p in self.base.parameters():
            p.requires_grad_(bool(flag))

    def base_parameters(self) -> List[nn.Parameter]:
        return list(self.base.parameters())

    def residual_parameters(self) -> List[nn.Parameter]:
        """What the RL actor optimizer trains (the log-std only when ``learn_std``)."""
        return [p for p in self.residual.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> "ResidualModel":
        """Train mode for the residual; the base stays in eval mode (ResiP runs it under ``eval()``)."""
        super().train(mode)
        self.base.eval()
        return self

    def base_il_loss(self, batch: Mapping[str, Any], generator: Optional[torch.Generator] = None,
                     t_range: Optional[Tuple[int, int]] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The base's diffusion loss on a demo batch (``DiffusionModel.loss(network="base")``, in train mode, so
        images get their augmentation), for IL updates of the base. Needs :meth:`set_base_trainable` first."""
        if torch.is_grad_enabled() and not any(p.requires_grad for p in self.base.parameters()):
            raise DpftError("base_il_loss: the residual's base is frozen (requires_grad=False); call "
                            "model.set_base_trainable(True) before training it by imitation.")
        was = self.base.training
        self.base.train()
        try:
            return self.base.loss(batch, generator, network="base", t_range=t_range)
        finally:
            self.base.train(was)

    # ------------------------------------------------------------------ acting
    @torch.no_grad()
    def plan(self, model_obs: Mapping[str, torch.Tensor], generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The base's normalized chunk ``(B, Ta, Da)`` in [-1, 1] (deterministic sampler, noise from ``generator``)."""
        return self.base.sample(model_obs, deterministic=True, generator=generator)[0]

    def residual_input(self, state: torch.Tensor, base_action: torch.Tensor) -> torch.Tensor:
        """``[clamp(state (B, To, Do) flattened, +-obs_clip), base_action (B, Da)]`` -> ``(B, input_dim)``."""
        s = state.reshape(state.shape[0], -1).clamp(-self.obs_clip, self.obs_clip)
        return torch.cat([s, base_action.to(s.dtype)], dim=-1)

    def env_action(self, base_action: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Normalized env action ``clamp(base + action_scale * residual, -1, 1)`` ``(B, Da)``."""
        return (base_action + self.action_scale * residual).clamp(-1.0, 1.0)

    def sample_residual(self, x: torch.Tensor, deterministic: bool,
                        generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(residual (B, Da), log_prob (B,))``: the mean when ``deterministic``, else a Gaussian sample."""
        mean = self.residual(x)
        std = self.residual.std()
        if deterministic:
            res = mean
        else:
            noise = torch.randn(mean.shape, generator=generator, device="cpu" if generator is None else
                                generator.device, dtype=mean.dtype).to(mean.device)
            res = mean + std * noise
        z = (res - mean) / std
        logp = (-0.5 * z * z - torch.log(std) - 0.5 * math.log(2 * math.pi)).sum(-1)
        return res, logp


class BaseChunkCache:
    """Per-env cache of the base's normalized chunk: ``step`` returns each env's base action of this env step and
    re-plans (only) the envs whose episode started (:meth:`reset`) or that executed ``act_steps`` cached steps.

    State: ``chunk (N, Ta, Da)``, ``index (N,)`` (the next step of the chunk to use), ``valid (N,)``.
    """

    def __init__(self, act_steps: int):
        self.act_steps = int(act_steps)
        self.chunk = None  # type: Optional[torch.Tensor]
        self.index = None  # type: Optional[torch.Tensor]
        self.valid = None  # type: Optional[torch.Tensor]
        self.plans = 0  # rows planned so far (diagnostics, tests)

    def reset(self, rows: Optional[Sequence[int]] = None) -> None:
        """Episodes start in env ``rows`` (None: all, and the cache forgets its size)."""
        if rows is None or self.valid is None:
            self.chunk = self.index = self.valid = None
            return
        idx = torch.as_tensor([int(r) for r in rows], dtype=torch.long, device=self.valid.device)
        if idx.numel():
            if int(idx.max()) >= self.valid.shape[0] or int(idx.min()) < 0:
                raise DpftError("reset(rows=%s): rows must be env indices in [0, %d)." % (list(rows), self.valid.shape[0]))
            self.valid[idx] = False

    def _due(self, n: int, device: torch.device) -> torch.Tensor:
        if self.valid is None or self.valid.shape[0] != n:
            if self.valid is not None:
                raise DpftError("The base-chunk cache holds %d envs but got a batch of %d; call reset() (all rows) "
                                "when the number of envs changes." % (self.valid.shape[0], n))
            self.valid = torch.zeros(n, dtype=torch.bool, device=device)
            self.index = torch.zeros(n, dtype=torch.long, device=device)
        return (~self.valid) | (self.index >= self.act_steps)

    def step(self, model_obs: Mapping[str, torch.Tensor], plan_fn: Any, advance: bool = True) -> torch.Tensor:
        """Base actions ``(N, Da)`` for this env step. ``plan_fn(sub_obs) -> (M, Ta, Da)`` plans the due rows.

        ``advance=False`` peeks: the action the next ``step`` would give for these observations, planning due
        rows without storing the plan (used for bootstrap values of final observations).
        """
        n = int(next(iter(model_obs.values())).shape[0])
        device = next(iter(model_obs.values())).device
        due = self._due(n, device)
        rows = torch.nonzero(due).reshape(-1)
        fresh = None
        if rows.numel():
            fresh = plan_fn({k: v[rows] for k, v in model_obs.items()})
            if self.chunk is None:
                self.chunk = torch.zeros((n,) + tuple(fresh.shape[1:]), dtype=fresh.dtype, device=fresh.device)
        if not advance:
            out = self.chunk[torch.arange(n, device=device), self.index.clamp(max=self.chunk.shape[1] - 1)].clone()
            if fresh is not None:
                out[rows] = fresh[:, 0]
            return out
        if fresh is not None:
            self.chunk[rows] = fresh
            self.index[rows] = 0
            self.valid[rows] = True
            self.plans += int(rows.numel())
        out = self.chunk[torch.arange(n, device=device), self.index]
        self.index += 1
        return out


class ResidualPolicy(Policy):
    """Stateful evaluation/rollout policy of a :class:`ResidualModel` (``stateful = True``: row ``i`` is env ``i``).

    ``act(obs (B, To, ...)) -> np.ndarray (B, 1, Da)``: one env step (``meta["act_steps"] == 1``); the base
    re-plans per env as :class:`BaseChunkCache` says; ``deterministic=True`` uses the residual mean. Call
    :meth:`reset` (all rows) before the first step and ``reset(rows)`` when those envs start an episode.
    """

    stateful = True

    def __init__(self, model: ResidualModel, normalizer: Any, meta: Mapping[str, Any], **kw: Any):
        super().__init__(model, normalizer, meta, **kw)
        if self.act_steps != 1:
            raise DpftError("A residual policy executes one action per call; its meta.json has act_steps=%d, "
                            "expected 1." % self.act_steps)
        self.cache = BaseChunkCache(model.base_act_steps)

    def reset(self, rows: Optional[Sequence[int]] = None) -> None:
        self.cache.reset(rows)

    @torch.no_grad()
    def predict_chunk(self, obs: Any, deterministic: bool = True, generator: Optional[torch.Generator] = None,
                      seed: Optional[int] = None) -> np.ndarray:
        """Same as :meth:`act` (the residual acts one env step at a time): ``(B, 1, Da)``."""
        generator = self._generator(generator, seed)
        model_obs = self.normalize_obs(obs)
        m = self.model
        base = self.cache.step(model_obs, lambda o: m.plan(o, generator))
        res, _ = m.sample_residual(m.residual_input(model_obs["state"], base), deterministic, generator)
        a = self.normalizer.unnormalize("action", m.env_action(base, res))
        return a[:, None].detach().to("cpu", torch.float32).numpy()

    def act(self, obs: Any, deterministic: bool = True, generator: Optional[torch.Generator] = None,
            seed: Optional[int] = None) -> np.ndarray:
        return self.predict_chunk(obs, deterministic, generator, seed)


def residual_meta(base_meta: Mapping[str, Any], base_spec: Mapping[str, Any], spec: Mapping[str, Any]) -> Dict[str, Any]:
    """meta.json of a residual checkpoint from the base checkpoint's meta and the base's (DDIM) spec."""
    meta = dict(base_meta)
    meta.update({"policy_kind": "residual", "policy_spec": dict(base_spec), "residual_spec": residual_spec(**dict(spec)),
                 "act_steps": 1, "base_act_steps": int(residual_spec(**dict(spec))["base_act_steps"])})
    meta.pop("ft_denoising_steps", None)
    return meta


def build_residual_model(meta: Mapping[str, Any]) -> ResidualModel:
    """An (untrained) :class:`ResidualModel` from a residual checkpoint's metadata alone."""
    for key in ("policy_spec", "residual_spec", "obs_dim", "cond_steps", "image_keys"):
        if key not in meta:
            raise DpftError("A residual checkpoint's meta.json needs '%s' (written by dpft finetune "
                            "agent=residual_ppo)." % key)
    if meta["image_keys"]:
        raise DpftError("Residual policies read low-dim state; this checkpoint observes cameras %s."
                        % (list(meta["image_keys"]),))
    base = build_model_from_spec(meta)
    with torch.random.fork_rng(devices=[]):
        return ResidualModel(base, int(meta["obs_dim"]), int(meta["cond_steps"]), meta["residual_spec"])


def _build_policy(ckpt: Any, weights: str, device: Union[str, torch.device]) -> ResidualPolicy:
    from dpft.policy import load_weights

    model = build_residual_model(ckpt.meta)
    used = load_weights(model, ckpt, weights)
    return ResidualPolicy(model, ckpt.normalizer, ckpt.meta, weights=used, checkpoint_dir=ckpt.dir, device=device)


register_policy_kind("residual", _build_policy)

__all__ = ["ResidualActor", "ResidualModel", "ResidualPolicy", "BaseChunkCache", "residual_spec", "residual_meta",
           "build_residual_model", "RESIDUAL_DEFAULTS"]
