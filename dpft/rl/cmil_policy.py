"""The CMIL policy: world model + actor as one module, and a stateful acting policy (policy kind ``"cmil"``).

:class:`CmilModel` holds the :class:`~dpft.models.world_model.WorldModel` and the :class:`CmilActor`; its
``state_dict`` is the checkpoint's ``model.safetensors``, and ``meta["cmil_spec"]`` rebuilds it
(:func:`build_cmil_model`), so a CMIL checkpoint is self-sufficient.

:class:`CmilPolicy` acts one env step per call (``act_steps == 1``; CMIL is not action-chunked). It keeps the
RSSM posterior and the previous action of each env row across calls: each call filters the new observation
(``obs_step``: prior from the previous latent and action, posterior with the new embedding), reads the feature
``cat(stoch, deter)`` and asks the actor. ``reset(rows)`` marks those rows' next step as ``is_first``, which
zeroes their latent and previous action (the RSSM's own reset rule). ``stateful = True``: the rollout always
passes every env row, so row ``i`` is env ``i``.

Actions: the actor works in the normalized action box ``[-1, 1]`` (the dataset's min/max, as ``dpft pretrain``
normalizes); :meth:`CmilPolicy.act` unnormalizes. ``deterministic=True`` uses the actor's mean (DreamerV2's
mode), otherwise a clipped Gaussian sample.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from dpft.errors import DpftError
from dpft.models.rand import randn as _randn
from dpft.models.world_model import RSSM, WorldModel, WorldModelConfig, mlp_head
from dpft.policy import Policy, load_weights, register_policy_kind

_TUPLE_FIELDS = ("image_shape", "encoder_kernels", "decoder_kernels")


class CmilActor(nn.Module):
    """DreamerV2 actor head: feat ``(..., F)`` -> Gaussian over normalized actions ``(..., A)``.

    ``mean = tanh(m)``, ``std = 2 sigmoid(s / 2) + min_std`` (DreamerV2's ``trunc_normal`` parameters). The
    truncated normal is replaced by a Gaussian whose samples are clipped to ``[-1, 1]`` with a straight-through
    gradient (``x + (clip(x) - x).detach()``); log-probs and entropy are the Gaussian's.
    """

    def __init__(self, feat_dim: int, action_dim: int, layers: int = 4, units: int = 400, act: str = "elu",
                 min_std: float = 0.1):
        super().__init__()
        self.action_dim = int(action_dim)
        self.min_std = float(min_std)
        self.net = mlp_head(feat_dim, 2 * self.action_dim, layers, units, act)

    def forward(self, feat: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        m, s = self.net(feat).chunk(2, -1)
        return torch.tanh(m), 2.0 * torch.sigmoid(s / 2.0) + self.min_std

    def sample(self, feat: torch.Tensor, deterministic: bool = False,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """A reparameterised action ``(..., A)`` in ``[-1, 1]`` (the mean when ``deterministic``)."""
        mean, std = self(feat)
        if deterministic:
            return mean
        x = mean + std * _randn(mean.shape, generator, mean.device, mean.dtype)
        return x + (x.clamp(-1.0, 1.0) - x).detach()

    def log_prob(self, feat: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Gaussian log-density of ``action`` (clipped to ``[-1, 1]``), summed over action dims: ``(...)``."""
        mean, std = self(feat)
        return torch.distributions.Normal(mean, std).log_prob(action.clamp(-1.0, 1.0)).sum(-1)

    def entropy(self, feat: torch.Tensor) -> torch.Tensor:
        _, std = self(feat)
        return torch.distributions.Normal(torch.zeros_like(std), std).entropy().sum(-1)


class CmilModel(nn.Module):
    """``wm`` (world model) + ``actor``; built from a spec (:func:`cmil_spec`)."""

    def __init__(self, spec: Mapping[str, Any]):
        super().__init__()
        self.spec = dict(spec)
        self.wm_cfg = world_model_config(spec["world_model"])
        self.action_dim = int(spec["action_dim"])
        self.wm = WorldModel(self.wm_cfg, self.action_dim)
        self.actor = CmilActor(self.wm.feat_dim, self.action_dim, int(spec["actor_layers"]), int(spec["actor_units"]),
                               str(self.wm_cfg.act), float(spec["actor_min_std"]))

    @property
    def rssm(self) -> RSSM:
        return self.wm.rssm


def world_model_config(d: Mapping[str, Any]) -> WorldModelConfig:
    """A :class:`WorldModelConfig` from a JSON dict (lists become the config's tuples)."""
    names = {f.name for f in dataclasses.fields(WorldModelConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise DpftError("cmil_spec.world_model has unknown key(s) %s; known: %s." % (unknown, sorted(names)))
    kw = {k: (tuple(int(x) for x in v) if k in _TUPLE_FIELDS else v) for k, v in d.items()}
    return WorldModelConfig(**kw)


def world_model_dict(cfg: WorldModelConfig) -> Dict[str, Any]:
    """JSON-ready dict of a :class:`WorldModelConfig` (tuples as lists)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}


def cmil_spec(wm_cfg: WorldModelConfig, action_dim: int, actor_layers: int, actor_units: int,
              actor_min_std: float, image_key: str, proprio_keys: Sequence[str]) -> Dict[str, Any]:
    """The ``meta["cmil_spec"]`` a checkpoint needs to rebuild :class:`CmilModel`."""
    return {"world_model": world_model_dict(wm_cfg), "action_dim": int(action_dim), "actor_layers": int(actor_layers),
            "actor_units": int(actor_units), "actor_min_std": float(actor_min_std), "image_key": str(image_key),
            "proprio_keys": [str(k) for k in proprio_keys]}


def build_cmil_model(meta: Mapping[str, Any]) -> CmilModel:
    """The (untrained) :class:`CmilModel` of ``meta["cmil_spec"]``; the global torch RNG is left untouched."""
    if "cmil_spec" not in meta:
        raise DpftError("A CMIL checkpoint's meta.json needs 'cmil_spec' (world-model sizes, actor, camera key); "
                        "this one has keys %s." % sorted(meta))
    with torch.random.fork_rng(devices=[]):
        return CmilModel(meta["cmil_spec"])


class CmilPolicy(Policy):
    """Stateful one-step policy of a :class:`CmilModel` (see the module docstring)."""

    stateful = True

    def __init__(self, model: CmilModel, normalizer: Any, meta: Mapping[str, Any], **kw: Any):
        super().__init__(model, normalizer, meta, **kw)
        if self.act_steps != 1 or self.cond_steps != 1:
            raise DpftError("A CMIL policy acts one step per call from the current observation; its meta.json has "
                            "act_steps=%d, cond_steps=%d, expected 1 and 1." % (self.act_steps, self.cond_steps))
        spec = model.spec
        self.image_key = str(spec["image_key"])
        self.has_proprio = bool(spec["proprio_keys"])
        self.state = None  # type: Optional[Dict[str, torch.Tensor]]
        self.prev_action = None  # type: Optional[torch.Tensor]
        self.first = None  # type: Optional[torch.Tensor]

    def reset(self, rows: Optional[Sequence[int]] = None) -> None:
        """Episodes start in env ``rows`` (all when None): their next step is ``is_first``."""
        if rows is None or self.first is None:
            self.state = self.prev_action = self.first = None
            return
        idx = torch.as_tensor([int(r) for r in rows], dtype=torch.long)
        if len(idx) and int(idx.max()) >= self.first.shape[0]:
            raise DpftError("CmilPolicy.reset: row %d is beyond the %d env rows this policy has seen."
                            % (int(idx.max()), self.first.shape[0]))
        self.first[idx.to(self.first.device)] = True

    def model_inputs(self, obs: Any) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(image uint8 (B, H, W, C), proprio (B, P) or None)`` of raw observations."""
        m = self.normalize_obs(obs)
        image = m[self.image_key][:, -1]
        proprio = m["state"][:, -1] if self.has_proprio else None
        return image, proprio

    @torch.no_grad()
    def step_latent(self, image: torch.Tensor, proprio: Optional[torch.Tensor],
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Filter one observation per row; returns the feature ``(B, F)`` the actor reads."""
        model = self.model
        b = image.shape[0]
        dev = self.device
        if self.state is None or self.state["deter"].shape[0] != b:
            self.state = model.rssm.initial(b, dev)
            self.prev_action = torch.zeros(b, model.action_dim, device=dev)
            self.first = torch.ones(b, dtype=torch.bool, device=dev)
        embed = model.wm.encoder(image.to(dev), None if proprio is None else proprio.to(dev))
        post, _ = model.rssm.obs_step(self.state, self.prev_action, embed, self.first, True, generator)
        self.state = post
        self.first = torch.zeros_like(self.first)
        return model.rssm.get_feat(post)

    @torch.no_grad()
    def act_normalized(self, obs: Any, deterministic: bool = True,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The normalized action ``(B, A)`` in ``[-1, 1]``; advances the latent and remembers the action."""
        image, proprio = self.model_inputs(obs)
        feat = self.step_latent(image, proprio, generator)
        a = self.model.actor.sample(feat, deterministic, generator).clamp(-1.0, 1.0)
        self.prev_action = a
        return a

    def predict_chunk(self, obs: Any, deterministic: bool = True, generator: Optional[torch.Generator] = None,
                      seed: Optional[int] = None) -> np.ndarray:
        """Same as :meth:`act`: ``(B, 1, Da)`` unnormalized actions."""
        generator = self._generator(generator, seed)
        a = self.act_normalized(obs, deterministic, generator)
        a = self.normalizer.unnormalize("action", a)
        return a[:, None].detach().to("cpu", torch.float32).numpy()

    def act(self, obs: Any, deterministic: bool = True, generator: Optional[torch.Generator] = None,
            seed: Optional[int] = None) -> np.ndarray:
        return self.predict_chunk(obs, deterministic, generator, seed)


def _build_policy(ckpt: Any, weights: str, device: Union[str, torch.device]) -> CmilPolicy:
    model = build_cmil_model(ckpt.meta)
    used = load_weights(model, ckpt, weights)
    return CmilPolicy(model, ckpt.normalizer, ckpt.meta, weights=used, checkpoint_dir=ckpt.dir, device=device)


register_policy_kind("cmil", _build_policy)

__all__ = ["CmilActor", "CmilModel", "CmilPolicy", "build_cmil_model", "cmil_spec", "world_model_config",
           "world_model_dict"]
