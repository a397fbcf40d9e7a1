"""DreamerV2-style world model for CMIL: conv encoder/decoder on 64x64 RGB, an ensemble RSSM, the model loss.

Follows DreamerV2 (``danijar/dreamerv2`` ``common/nets.py``, ``agent.py``) with the CMIL settings of the
reference ``victorkolev/cmil`` (``reference/inril_resip_furniture_cmil.md`` 5.1): Gaussian latents
(``discrete: False``), one GRU core, K prior heads (``img_out_k``) used for disagreement, a random member
driving each prior step, ``std = 2 * sigmoid(x / 2) + min_std`` (``sigmoid2``), ELU, no norm layers in the
conv/MLP stacks, a LayerNorm GRU with update bias -1, decoder the only gradient head, KL balance 0.8 and
free 1.0 (DreamerV2's ``free_avg=True``).

Action alignment (DreamerV2): ``action[:, t]`` is the action taken *before* observation t (it led to it); the
RSSM zeroes it, and the previous state, where ``is_first[:, t]``.

Images: uint8 ``(..., 64, 64, 3)`` -> float ``x / 255 - 0.5`` (DreamerV2's preprocess; not
:func:`dpft.models.vision.images_to_float`'s ``[-1, 1]`` because the unit-std image likelihood is scaled to
DreamerV2's range). The project's :class:`~dpft.models.vision.ConvEncoder` (soft-argmax keypoints, GroupNorm)
is not the DreamerV2 encoder and has no decoder, so it is not reused; :class:`~dpft.models.mlp.MLP` is.
"""
from __future__ import annotations

import contextlib
import math
import dataclasses
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from dpft.errors import DpftError
from dpft.models.mlp import MLP, make_activation
from dpft.models.rand import randint as _randint
from dpft.models.rand import randn as _randn
from dpft.rl.cmil_math import kl_balance

State = Dict[str, torch.Tensor]


def image_to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(..., H, W, C)`` -> float32 ``(..., C, H, W)`` = ``x / 255 - 0.5`` (DreamerV2)."""
    return (images.to(torch.float32) / 255.0 - 0.5).movedim(-1, -3)


def mlp_head(in_dim: int, out_dim: int, layers: int = 4, units: int = 400, act: str = "elu") -> MLP:
    """DreamerV2 MLP head: ``layers`` hidden Dense(units)+act, then Linear to ``out_dim``.

    Shapes: ``(..., in_dim) -> (..., out_dim)``. Use it for critics, actor, discriminator, discount.
    """
    return MLP([int(in_dim)] + [int(units)] * int(layers) + [int(out_dim)], activation=act)


@dataclasses.dataclass
class WorldModelConfig:
    """World-model sizes and loss settings (defaults = the reference CMIL/DreamerV2 ``configs.yaml``)."""

    image_shape: Tuple[int, int, int] = (64, 64, 3)
    proprio_dim: int = 0
    deter: int = 400
    stoch: int = 360
    hidden: int = 400
    ensemble: int = 10
    depth: int = 48
    act: str = "elu"
    std_act: str = "sigmoid2"
    min_std: float = 0.1
    encoder_kernels: Tuple[int, ...] = (4, 4, 4, 4)
    decoder_kernels: Tuple[int, ...] = (5, 5, 6, 6)
    mlp_layers: int = 4
    mlp_units: int = 400
    kl_balance: float = 0.8
    kl_free: float = 1.0
    kl_free_avg: bool = True
    kl_scale: float = 1.0
    image_scale: float = 1.0
    proprio_scale: float = 1.0
    discount_head: bool = False
    discount_scale: float = 1.0

    @classmethod
    def paper(cls, **overrides) -> "WorldModelConfig":
        """Reference sizes (5.1): deter 400, stoch 360, hidden 400, ensemble 10, depth 48."""
        return cls(**overrides)

    @classmethod
    def reduced(cls, **overrides) -> "WorldModelConfig":
        """A CPU-sized model: deter 200, stoch 32, hidden 200, ensemble 5, depth 16, MLP 200 units."""
        kw = dict(deter=200, stoch=32, hidden=200, ensemble=5, depth=16, mlp_units=200)
        kw.update(overrides)
        return cls(**kw)


class ConvEncoder64(nn.Module):
    """DreamerV2 conv encoder: uint8 ``(..., H, W, C)`` [+ proprio ``(..., P)``] -> ``(..., embed_dim)``.

    4 (= ``len(kernels)``) valid convs, stride 2, ``2**i * depth`` channels, ELU; 64 -> 31 -> 14 -> 6 -> 2, so
    the image embedding is ``32 * depth``. Proprio goes through an MLP (``mlp_layers`` x ``mlp_units``, the
    DreamerV2 ``mlp_keys`` path) and is concatenated: ``embed_dim = 32 * depth (+ mlp_units)``.
    """

    def __init__(self, image_shape: Sequence[int] = (64, 64, 3), depth: int = 48,
                 kernels: Sequence[int] = (4, 4, 4, 4), act: str = "elu", proprio_dim: int = 0,
                 mlp_layers: int = 4, mlp_units: int = 400):
        super().__init__()
        self.image_shape = tuple(int(s) for s in image_shape)
        h, w, c = self.image_shape
        layers = []
        in_ch = c
        for i, k in enumerate(kernels):
            layers += [nn.Conv2d(in_ch, (2 ** i) * int(depth), int(k), stride=2), make_activation(act)]
            in_ch = (2 ** i) * int(depth)
        self.convs = nn.Sequential(*layers)
        with torch.no_grad():
            n = self.convs(torch.zeros(1, c, h, w)).numel()
        self.image_dim = int(n)
        self.proprio_dim = int(proprio_dim)
        self.mlp = None  # type: Optional[nn.Module]
        if self.proprio_dim > 0:
            dims = [self.proprio_dim] + [int(mlp_units)] * int(mlp_layers)
            self.mlp = MLP(dims, activation=act, out_activation=act) if int(mlp_layers) > 0 else nn.Identity()
        self.embed_dim = self.image_dim + (
            (int(mlp_units) if int(mlp_layers) > 0 else self.proprio_dim) if self.proprio_dim > 0 else 0)

    def forward(self, image: torch.Tensor, proprio: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``image`` uint8 ``(..., H, W, C)``, ``proprio`` ``(..., P)`` -> ``(..., embed_dim)``."""
        if tuple(image.shape[-3:]) != self.image_shape:
            raise DpftError("ConvEncoder64 expected images (..., H, W, C) = (..., {}), got {}.".format(
                self.image_shape, tuple(image.shape)))
        lead = tuple(image.shape[:-3])
        x = image_to_float(image).reshape(-1, self.image_shape[2], self.image_shape[0], self.image_shape[1])
        out = self.convs(x).reshape(*lead, -1)
        if self.mlp is not None:
            if proprio is None:
                raise DpftError("ConvEncoder64 was built with proprio_dim={} but got no proprio.".format(
                    self.proprio_dim))
            out = torch.cat([out, self.mlp(proprio.to(out.dtype))], -1)
        return out


class ConvDecoder64(nn.Module):
    """DreamerV2 conv-transpose decoder: feat ``(..., F)`` -> means ``{"image": (..., H, W, C)[, "proprio": (..., P)]}``.

    ``Linear(F, 32 * depth)`` -> ``(32 * depth, 1, 1)`` -> ConvT kernels 5, 5, 6, 6 stride 2 with
    ``4d, 2d, d, C`` channels (1 -> 5 -> 13 -> 30 -> 64), ELU except the last. Image means are in the
    ``x / 255 - 0.5`` units; both outputs are unit-std Gaussian means.
    """

    def __init__(self, feat_dim: int, image_shape: Sequence[int] = (64, 64, 3), depth: int = 48,
                 kernels: Sequence[int] = (5, 5, 6, 6), act: str = "elu", proprio_dim: int = 0,
                 mlp_layers: int = 4, mlp_units: int = 400):
        super().__init__()
        self.image_shape = tuple(int(s) for s in image_shape)
        self.depth = int(depth)
        self.inp = nn.Linear(int(feat_dim), 32 * self.depth)
        layers = []
        in_ch = 32 * self.depth
        n = len(kernels)
        for i, k in enumerate(kernels):
            last = i == n - 1
            out_ch = self.image_shape[2] if last else (2 ** (n - i - 2)) * self.depth
            layers.append(nn.ConvTranspose2d(in_ch, out_ch, int(k), stride=2))
            if not last:
                layers.append(make_activation(act))
            in_ch = out_ch
        self.convs = nn.Sequential(*layers)
        with torch.no_grad():
            shp = self.convs(torch.zeros(1, 32 * self.depth, 1, 1)).shape
        if tuple(shp[2:]) != self.image_shape[:2]:
            raise DpftError("ConvDecoder64: kernels {} give {}x{} images, expected {}x{}.".format(
                list(kernels), shp[2], shp[3], self.image_shape[0], self.image_shape[1]))
        self.proprio = mlp_head(feat_dim, proprio_dim, mlp_layers, mlp_units, act) if int(proprio_dim) > 0 else None

    def forward(self, feat: torch.Tensor) -> Dict[str, torch.Tensor]:
        lead = tuple(feat.shape[:-1])
        x = self.inp(feat).reshape(-1, 32 * self.depth, 1, 1)
        img = self.convs(x).movedim(1, -1).reshape(*lead, *self.image_shape)
        out = {"image": img}
        if self.proprio is not None:
            out["proprio"] = self.proprio(feat)
        return out


class LayerNormGRUCell(nn.Module):
    """DreamerV2 ``GRUCell(norm=True, update_bias=-1)``: ``(B, I), (B, D) -> (B, D)``.

    ``parts = LN(W [x, h])``; ``r, c, u = split(parts)``; ``c = tanh(sigmoid(r) * c)``;
    ``u = sigmoid(u - 1)``; ``h' = u * c + (1 - u) * h``.
    """

    def __init__(self, input_dim: int, size: int, update_bias: float = -1.0):
        super().__init__()
        self.size = int(size)
        self.layer = nn.Linear(int(input_dim) + self.size, 3 * self.size)
        self.norm = nn.LayerNorm(3 * self.size)
        self.update_bias = float(update_bias)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        parts = self.norm(self.layer(torch.cat([x, h], -1)))
        reset, cand, update = parts.chunk(3, -1)
        cand = torch.tanh(torch.sigmoid(reset) * cand)
        update = torch.sigmoid(update + self.update_bias)
        return update * cand + (1.0 - update) * h


@contextlib.contextmanager
def frozen_params(*modules: nn.Module) -> Iterator[None]:
    """Inside: every parameter of ``modules`` has ``requires_grad=False``; each flag is restored after."""
    flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def detach_state(state: State) -> State:
    """Every tensor of ``state`` detached (the imagination start, as DreamerV2's ``stop_gradient(post)``)."""
    return {k: v.detach() for k, v in state.items()}


class RSSM(nn.Module):
    """Ensemble RSSM with Gaussian latents (DreamerV2 ``EnsembleRSSM``, ``discrete=False``).

    State dicts: ``mean``, ``std``, ``stoch`` ``(..., S)``, ``deter`` ``(..., D)``; priors also carry
    ``ens_mean``, ``ens_std`` ``(..., K, S)`` (all K heads, for :func:`dpft.rl.cmil_math.ensemble_disagreement`
    with ``member_dim=-2``). Prior step: ``x = act(Linear([stoch, action]))``, ``deter' = GRU(x, deter)``,
    head k: ``act(Linear(deter'))`` -> ``Linear -> (mean, std)``; one uniformly random member (one per call,
    shared over the batch) gives the prior. Posterior: ``act(Linear([deter', embed]))`` -> ``(mean, std)``.
    ``std = 2 sigmoid(x / 2) + min_std`` (``sigmoid2``) or ``softplus(x) + min_std``. Samples are
    reparameterised (``mean + std * eps``).
    """

    def __init__(self, action_dim: int, embed_dim: int, deter: int = 400, stoch: int = 360, hidden: int = 400,
                 ensemble: int = 10, act: str = "elu", std_act: str = "sigmoid2", min_std: float = 0.1):
        super().__init__()
        if int(ensemble) < 1:
            raise DpftError("RSSM ensemble must be >= 1, got {}.".format(ensemble))
        if std_act not in ("sigmoid2", "softplus", "sigmoid"):
            raise DpftError("RSSM std_act must be 'sigmoid2', 'sigmoid' or 'softplus', got {!r}.".format(std_act))
        self.action_dim, self.embed_dim = int(action_dim), int(embed_dim)
        self.deter, self.stoch, self.hidden, self.ensemble = int(deter), int(stoch), int(hidden), int(ensemble)
        self.std_act, self.min_std = std_act, float(min_std)
        self.feat_dim = self.stoch + self.deter
        self.img_in = nn.Sequential(nn.Linear(self.stoch + self.action_dim, self.hidden), make_activation(act))
        self.cell = LayerNormGRUCell(self.hidden, self.deter)
        self.img_out = nn.ModuleList(
            [nn.Sequential(nn.Linear(self.deter, self.hidden), make_activation(act)) for _ in range(self.ensemble)])
        self.img_dist = nn.ModuleList([nn.Linear(self.hidden, 2 * self.stoch) for _ in range(self.ensemble)])
        self.obs_out = nn.Sequential(nn.Linear(self.deter + self.embed_dim, self.hidden), make_activation(act))
        self.obs_dist = nn.Linear(self.hidden, 2 * self.stoch)

    def _stats(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        mean, std = x.chunk(2, -1)
        if self.std_act == "sigmoid2":
            std = 2.0 * torch.sigmoid(std / 2.0)
        elif self.std_act == "sigmoid":
            std = torch.sigmoid(std)
        else:
            std = F.softplus(std)
        return mean, std + self.min_std

    def initial(self, batch: int, device=None, dtype: torch.dtype = torch.float32) -> State:
        """Zero state: ``mean``, ``std``, ``stoch`` ``(batch, S)``, ``deter`` ``(batch, D)``."""
        z = lambda n: torch.zeros(int(batch), n, device=device, dtype=dtype)  # noqa: E731
        return {"mean": z(self.stoch), "std": z(self.stoch), "stoch": z(self.stoch), "deter": z(self.deter)}

    def get_feat(self, state: State) -> torch.Tensor:
        """``cat(stoch, deter)``: ``(..., S + D)``."""
        return torch.cat([state["stoch"], state["deter"]], -1)

    def ensemble_stats(self, deter: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """All K prior heads on ``deter`` ``(..., D)`` -> ``(mean, std)`` each ``(..., K, S)``."""
        outs = [self._stats(d(o(deter))) for o, d in zip(self.img_out, self.img_dist)]
        return torch.stack([m for m, _ in outs], -2), torch.stack([s for _, s in outs], -2)

    def _sample(self, mean: torch.Tensor, std: torch.Tensor, sample: bool,
                generator: Optional[torch.Generator]) -> torch.Tensor:
        if not sample:
            return mean
        return mean + std * _randn(mean.shape, generator, mean.device, mean.dtype)

    def img_step(self, prev_state: State, prev_action: torch.Tensor, sample: bool = True,
                 generator: Optional[torch.Generator] = None, member: Optional[int] = None) -> State:
        """Prior step ``(B, .)`` -> prior state with ``ens_mean``/``ens_std`` ``(B, K, S)``."""
        x = self.img_in(torch.cat([prev_state["stoch"], prev_action.to(prev_state["stoch"].dtype)], -1))
        deter = self.cell(x, prev_state["deter"])
        ens_mean, ens_std = self.ensemble_stats(deter)
        if member is None:
            member = int(_randint(self.ensemble, (), generator, "cpu").item()) if self.ensemble > 1 else 0
        mean, std = ens_mean[..., member, :], ens_std[..., member, :]
        stoch = self._sample(mean, std, sample, generator)
        return {"mean": mean, "std": std, "stoch": stoch, "deter": deter, "ens_mean": ens_mean, "ens_std": ens_std}

    def obs_step(self, prev_state: State, prev_action: torch.Tensor, embed: torch.Tensor, is_first: torch.Tensor,
                 sample: bool = True, generator: Optional[torch.Generator] = None) -> Tuple[State, State]:
        """One filtering step; zeroes ``prev_state`` and ``prev_action`` where ``is_first`` ``(B,)``."""
        keep = (~is_first.bool()).to(embed.dtype).unsqueeze(-1)
        prev_state = {k: prev_state[k] * keep for k in ("mean", "std", "stoch", "deter")}
        prior = self.img_step(prev_state, prev_action * keep, sample, generator)
        mean, std = self._stats(self.obs_dist(self.obs_out(torch.cat([prior["deter"], embed], -1))))
        post = {"mean": mean, "std": std, "stoch": self._sample(mean, std, sample, generator),
                "deter": prior["deter"]}
        return post, prior

    def observe(self, embed: torch.Tensor, action: torch.Tensor, is_first: torch.Tensor, state: Optional[State] = None,
                sample: bool = True, generator: Optional[torch.Generator] = None) -> Tuple[State, State]:
        """Filter a sequence: ``embed (B, T, E)``, ``action (B, T, A)``, ``is_first (B, T)`` -> ``(post, prior)``
        dicts of ``(B, T, ...)`` tensors."""
        b, t = embed.shape[:2]
        if tuple(action.shape[:2]) != (b, t) or tuple(is_first.shape) != (b, t):
            raise DpftError("RSSM.observe: embed {}, action {} and is_first {} must share (B, T).".format(
                tuple(embed.shape), tuple(action.shape), tuple(is_first.shape)))
        if state is None:
            state = self.initial(b, embed.device, embed.dtype)
        posts, priors = [], []
        for i in range(t):
            post, prior = self.obs_step(state, action[:, i], embed[:, i], is_first[:, i], sample, generator)
            posts.append(post)
            priors.append(prior)
            state = post
        stack = lambda xs: {k: torch.stack([x[k] for x in xs], 1) for k in xs[0]}  # noqa: E731
        return stack(posts), stack(priors)

    def imagine(self, actor_fn: Callable[[torch.Tensor], torch.Tensor], start_state: State, horizon: int,
                sample: bool = True, generator: Optional[torch.Generator] = None,
                stop_grad_actor_input: bool = True) -> State:
        """Roll the prior ``horizon`` steps from ``start_state`` (any leading dims, flattened to N).

        Returns a time-major dict ``(H + 1, N, ...)``: ``stoch``, ``deter``, ``mean``, ``std``, ``ens_mean``,
        ``ens_std``, ``feat``, ``action`` (``action[0]`` zeros; ``action[i]`` led to state i). ``actor_fn``
        maps ``feat (N, F) -> action (N, A)``; its input is detached when ``stop_grad_actor_input`` (DreamerV2),
        while the dynamics stay differentiable w.r.t. the action.
        """
        start = {k: start_state[k].reshape(-1, start_state[k].shape[-1])
                 for k in ("mean", "std", "stoch", "deter")}
        ens_mean, ens_std = self.ensemble_stats(start["deter"])
        start.update(ens_mean=ens_mean, ens_std=ens_std)
        start["feat"] = self.get_feat(start)
        seq = {k: [v] for k, v in start.items()}
        state = start
        actions = []
        for _ in range(int(horizon)):
            inp = state["feat"].detach() if stop_grad_actor_input else state["feat"]
            action = actor_fn(inp)
            actions.append(action)
            state = self.img_step(state, action, sample, generator)
            state["feat"] = self.get_feat(state)
            for k in seq:
                seq[k].append(state[k])
        n = start["deter"].shape[0]
        a0 = torch.zeros(n, self.action_dim, device=start["deter"].device, dtype=start["deter"].dtype)
        out = {k: torch.stack(v, 0) for k, v in seq.items()}
        out["action"] = torch.stack([a0] + actions, 0)
        return out

    def kl_loss(self, post: State, prior: State, balance: float = 0.8, free: float = 1.0,
                free_avg: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        """:func:`dpft.rl.cmil_math.kl_balance` on the posterior and the (sampled-member) prior."""
        return kl_balance(post["mean"], post["std"], prior["mean"], prior["std"], balance, free, free_avg)


def _normal_logprob_unit(x: torch.Tensor, mean: torch.Tensor, event_dims: int) -> torch.Tensor:
    """log N(x | mean, 1) summed over the last ``event_dims`` dims."""
    lp = -0.5 * (x - mean).pow(2) - 0.5 * math.log(2.0 * math.pi)
    return lp.flatten(lp.dim() - event_dims).sum(-1) if event_dims > 0 else lp


class WorldModel(nn.Module):
    """Encoder + RSSM + decoder (+ optional discount head) with DreamerV2's model loss.

    Batch: ``image`` uint8 ``(B, T, 64, 64, 3)``, ``action`` ``(B, T, A)``, ``is_first`` ``(B, T)`` bool,
    optional ``proprio`` ``(B, T, P)`` and ``is_terminal`` ``(B, T)`` (discount head target ``1 - is_terminal``).
    """

    def __init__(self, cfg: WorldModelConfig, action_dim: int):
        super().__init__()
        self.cfg = cfg
        self.action_dim = int(action_dim)
        self.encoder = ConvEncoder64(cfg.image_shape, cfg.depth, cfg.encoder_kernels, cfg.act, cfg.proprio_dim,
                                     cfg.mlp_layers, cfg.mlp_units)
        self.rssm = RSSM(action_dim, self.encoder.embed_dim, cfg.deter, cfg.stoch, cfg.hidden, cfg.ensemble,
                         cfg.act, cfg.std_act, cfg.min_std)
        self.feat_dim = self.rssm.feat_dim
        self.decoder = ConvDecoder64(self.feat_dim, cfg.image_shape, cfg.depth, cfg.decoder_kernels, cfg.act,
                                     cfg.proprio_dim, cfg.mlp_layers, cfg.mlp_units)
        self.discount = mlp_head(self.feat_dim, 1, cfg.mlp_layers, cfg.mlp_units, cfg.act) if cfg.discount_head else None

    def _check(self, batch: Dict[str, torch.Tensor]) -> None:
        for key in ("image", "action", "is_first"):
            if key not in batch:
                raise DpftError("WorldModel batch lacks {!r}; it needs image, action, is_first.".format(key))
        img = batch["image"]
        if img.dtype != torch.uint8 or img.dim() != 5:
            raise DpftError("WorldModel batch['image'] must be uint8 (B, T, H, W, C), got {} {}.".format(
                img.dtype, tuple(img.shape)))
        if batch["action"].shape[-1] != self.action_dim:
            raise DpftError("WorldModel batch['action'] has {} dims, the model was built for {}.".format(
                batch["action"].shape[-1], self.action_dim))

    def encode(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, T, E)`` embeddings."""
        self._check(batch)
        return self.encoder(batch["image"], batch.get("proprio"))

    def observe(self, batch: Dict[str, torch.Tensor], state: Optional[State] = None, sample: bool = True,
                generator: Optional[torch.Generator] = None) -> Tuple[State, State]:
        """Posterior and prior ``(B, T, ...)`` of a batch (expert latents: call under ``torch.no_grad()``)."""
        embed = self.encode(batch)
        return self.rssm.observe(embed, batch["action"].to(embed.dtype), batch["is_first"], state, sample, generator)

    def loss(self, batch: Dict[str, torch.Tensor], state: Optional[State] = None,
             generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], State]:
        """``(loss, metrics, post)``: ``kl_scale * KL_balanced + image_scale * E[-log N(img | dec, 1)]``
        (+ proprio, + discount BCE); log-likelihoods summed over pixels / dims and averaged over (B, T).
        Metrics are detached 0-d tensors."""
        post, prior = self.observe(batch, state, True, generator)
        cfg = self.cfg
        kl_loss, kl_value = self.rssm.kl_loss(post, prior, cfg.kl_balance, cfg.kl_free, cfg.kl_free_avg)
        feat = self.rssm.get_feat(post)
        dec = self.decoder(feat)
        target = image_to_float(batch["image"]).movedim(-3, -1)
        image_loss = -_normal_logprob_unit(target, dec["image"], 3).mean()
        loss = cfg.kl_scale * kl_loss + cfg.image_scale * image_loss
        metrics = {"kl_loss": kl_loss.detach(), "image_loss": image_loss.detach()}
        if "proprio" in dec:
            proprio_loss = -_normal_logprob_unit(batch["proprio"].to(feat.dtype), dec["proprio"], 1).mean()
            loss = loss + cfg.proprio_scale * proprio_loss
            metrics["proprio_loss"] = proprio_loss.detach()
        if self.discount is not None:
            term = batch.get("is_terminal")
            tgt = torch.ones_like(feat[..., 0]) if term is None else 1.0 - term.to(feat.dtype)
            disc_loss = F.binary_cross_entropy_with_logits(self.discount(feat).squeeze(-1), tgt)
            loss = loss + cfg.discount_scale * disc_loss
            metrics["discount_loss"] = disc_loss.detach()
        with torch.no_grad():
            ent = lambda s: (0.5 * (2.0 * math.pi * math.e * s.pow(2)).log()).sum(-1).mean()  # noqa: E731
            metrics.update(model_kl=kl_value.mean(), prior_ent=ent(prior["std"]), post_ent=ent(post["std"]),
                           model_loss=loss.detach())
        return loss, metrics, post

    def imagine(self, actor_fn: Callable[[torch.Tensor], torch.Tensor], start_state: State, horizon: int,
                gamma: float = 0.99, generator: Optional[torch.Generator] = None,
                is_terminal: Optional[torch.Tensor] = None) -> State:
        """:meth:`RSSM.imagine` plus ``discount`` ``(H + 1, N)`` and ``weight`` ``(H + 1, N)`` (DreamerV2):
        ``discount = gamma`` (or ``gamma * sigmoid(discount head)``, first row ``gamma * (1 - is_terminal)``
        when given), ``weight = cumprod([1, discount[:-1]])``."""
        seq = self.rssm.imagine(actor_fn, start_state, horizon, True, generator)
        if self.discount is not None:
            disc = gamma * torch.sigmoid(self.discount(seq["feat"]).squeeze(-1))
            if is_terminal is not None:
                first = gamma * (1.0 - is_terminal.reshape(-1).to(disc.dtype))
                disc = torch.cat([first.unsqueeze(0), disc[1:]], 0)
        else:
            disc = torch.full(seq["feat"].shape[:-1], float(gamma), device=seq["feat"].device,
                              dtype=seq["feat"].dtype)
        seq["discount"] = disc
        seq["weight"] = torch.cumprod(torch.cat([torch.ones_like(disc[:1]), disc[:-1]], 0), 0)
        return seq

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Inside: every world-model parameter has ``requires_grad=False`` (restored after)."""
        with frozen_params(self):
            yield


__all__ = ["ConvDecoder64", "ConvEncoder64", "frozen_params", "LayerNormGRUCell", "RSSM", "State", "WorldModel",
           "WorldModelConfig", "detach_state", "image_to_float", "mlp_head"]
