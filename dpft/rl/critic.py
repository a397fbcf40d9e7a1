"""Critics for RL fine-tuning: V(s) (:class:`ValueNet`), twin Q(s, chunk) (:class:`TwinQ`), Polyak targets.

Both critics take the observation history flattened, ``(B, To, Do) -> (B, To*Do)`` (DPPO's
``cond["state"]`` flattened; no denoising index, no action for V), and are built from dpft's MLP blocks
(:mod:`dpft.models.mlp`): with ``residual=True`` the hidden widths ``[h] * (1 + 2m)`` become
``ResidualMLP(in, h, m blocks, 1)`` exactly as the diffusion MLP maps ``mlp_dims``; otherwise a plain
``MLP([in, *hidden_dims, 1])``.
"""
from __future__ import annotations

import copy
from typing import Sequence, Tuple

import torch
from torch import nn

from dpft.errors import DpftError
from dpft.models.mlp import MLP, ResidualMLP


def mlp_head(in_dim: int, hidden_dims: Sequence[int], out_dim: int, activation: str, residual: bool,
             layer_norm: bool, what: str) -> nn.Module:
    """``ResidualMLP`` when ``residual`` (odd count of equal widths: input layer + 2 per block), else ``MLP``."""
    dims = [int(d) for d in hidden_dims]
    if not dims:
        raise DpftError("{}: hidden_dims must list at least one width, got [].".format(what))
    if not residual:
        return MLP([int(in_dim)] + dims + [int(out_dim)], activation=activation, layer_norm=layer_norm)
    if len(set(dims)) != 1 or len(dims) % 2 == 0:
        raise DpftError(
            "{} with residual=True needs an odd number of equal widths in hidden_dims (input layer + 2 layers "
            "per residual block, e.g. [256, 256, 256]), got {}; set residual=false for other shapes.".format(what, dims)
        )
    return ResidualMLP(int(in_dim), dims[0], (len(dims) - 1) // 2, int(out_dim), activation=activation,
                       layer_norm=layer_norm)


def _flatten(x: torch.Tensor, width: int, name: str, what: str) -> torch.Tensor:
    flat = x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(1, -1)
    if flat.shape[1] != width:
        raise DpftError("{}: {} of shape {} flattens to {} features per row, but the network was built for {}."
                        .format(what, name, tuple(x.shape), flat.shape[1], width))
    return flat


class ValueNet(nn.Module):
    """State value ``V(s)``: ``obs (B, ...) -> (B,)`` (DPPO ``CriticObs``).

    Args:
        input_dim: flattened observation width ``To * Do``.
        hidden_dims: hidden widths; DPPO default ``[256] * 3`` (furniture ``[512] * 3``).
        activation: hidden activation (DPPO: Mish).
        residual: residual MLP (DPPO ``residual_style: True`` for ``CriticObs``).
        layer_norm: LayerNorm in the hidden layers (DPPO ``use_layernorm``, off by default).

    ``forward(obs)`` flattens every dim after the first and returns ``(B,)`` (DPPO returns ``(B, 1)``;
    ``(B,)`` matches the ``(T, N)`` rollout tensors after a reshape). Deviation: dpft's ``ResidualMLP``
    applies the activation once more before the output layer than DPPO's (the shared block of
    :mod:`dpft.models.mlp`, also used by the actor).
    """

    def __init__(self, input_dim: int, hidden_dims: Sequence[int] = (256, 256, 256), activation: str = "mish",
                 residual: bool = True, layer_norm: bool = False):
        super().__init__()
        if int(input_dim) < 1:
            raise DpftError("ValueNet input_dim must be >= 1, got {}.".format(input_dim))
        self.input_dim = int(input_dim)
        self.net = mlp_head(self.input_dim, hidden_dims, 1, activation, residual, layer_norm, "ValueNet")

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """``obs (B, To, Do)`` or ``(B, To*Do)`` -> ``V (B,)``."""
        return self.net(_flatten(obs, self.input_dim, "obs", "ValueNet")).squeeze(-1)


class TwinQ(nn.Module):
    """Two independent Q heads over ``[flattened obs, flattened executed chunk]`` (DPPO ``CriticObsAct``).

    Args:
        obs_dim: flattened observation width ``To * Do``.
        chunk_dim: flattened executed chunk width ``act_steps * Da`` (the buffer keeps only the executed
            actions; DPPO's IDQL configs all have horizon = act_steps).
        hidden_dims, activation, layer_norm: as :class:`ValueNet` (DPPO IDQL: ``[256] * 3``, Mish).
        residual: residual heads. Deviation: DPPO's ``CriticObsAct`` receives the misspelled
            ``residual_tyle`` and silently builds plain MLPs whatever the config asks
            (``rl_recipes.md`` 7.3); here ``residual=True`` is honoured. Use ``residual=False`` to match
            DPPO's actual networks.

    ``forward(obs, chunk) -> (q1 (B,), q2 (B,))``; :meth:`min_q` gives ``min(q1, q2)`` (the pessimistic
    estimate IDQL uses for V's target and for candidate scoring).
    """

    def __init__(self, obs_dim: int, chunk_dim: int, hidden_dims: Sequence[int] = (256, 256, 256),
                 activation: str = "mish", residual: bool = True, layer_norm: bool = False):
        super().__init__()
        if int(obs_dim) < 1 or int(chunk_dim) < 1:
            raise DpftError("TwinQ needs obs_dim >= 1 and chunk_dim >= 1, got {} and {}.".format(obs_dim, chunk_dim))
        self.obs_dim = int(obs_dim)
        self.chunk_dim = int(chunk_dim)
        width = self.obs_dim + self.chunk_dim
        self.q1 = mlp_head(width, hidden_dims, 1, activation, residual, layer_norm, "TwinQ")
        self.q2 = mlp_head(width, hidden_dims, 1, activation, residual, layer_norm, "TwinQ")

    def forward(self, obs: torch.Tensor, chunk: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``obs (B, To, Do)``/``(B, To*Do)``, ``chunk (B, act_steps, Da)``/``(B, act_steps*Da)`` -> two ``(B,)``."""
        x = torch.cat([_flatten(obs, self.obs_dim, "obs", "TwinQ"),
                       _flatten(chunk, self.chunk_dim, "chunk", "TwinQ").to(obs.dtype)], dim=-1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)

    def min_q(self, obs: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
        """``min(Q1, Q2)(obs, chunk)``, ``(B,)``."""
        q1, q2 = self(obs, chunk)
        return torch.minimum(q1, q2)


def target_copy(module: nn.Module) -> nn.Module:
    """A deep copy for use as a Polyak target: no gradients (``requires_grad_(False)``)."""
    target = copy.deepcopy(module)
    target.requires_grad_(False)
    return target


@torch.no_grad()
def polyak_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """In place ``theta' <- (1 - tau) * theta' + tau * theta`` over parameters and floating buffers.

    Shapes: ``target`` and ``source`` must have the same parameter list (same architecture). Implemented as
    one fused ``torch._foreach_lerp_(theta', theta, tau)`` (= ``theta' + tau * (theta - theta')``), as in
    DPPO/IDQL ``critic_tau`` (DPPO 0.001, IDQL 0.005). ``tau = 1`` copies; ``tau = 0`` leaves the target.
    Integer buffers (counters) are copied.
    """
    if not 0.0 <= float(tau) <= 1.0:
        raise DpftError("polyak_update: tau must lie in [0, 1], got {}.".format(tau))
    t_params = list(target.parameters()) + [b for b in target.buffers() if b.is_floating_point()]
    s_params = list(source.parameters()) + [b for b in source.buffers() if b.is_floating_point()]
    if len(t_params) != len(s_params) or any(a.shape != b.shape for a, b in zip(t_params, s_params)):
        raise DpftError("polyak_update: target and source have different parameter shapes ({} vs {} tensors); "
                        "the target must be a copy of the source network.".format(len(t_params), len(s_params)))
    if t_params:
        if hasattr(torch, "_foreach_lerp_"):
            torch._foreach_lerp_(t_params, s_params, float(tau))
        else:  # older torch: same formula in two fused ops
            torch._foreach_mul_(t_params, 1.0 - float(tau))
            torch._foreach_add_(t_params, s_params, alpha=float(tau))
    for a, b in zip((b for b in target.buffers() if not b.is_floating_point()),
                    (b for b in source.buffers() if not b.is_floating_point())):
        a.copy_(b)
