"""Multi-layer perceptrons: a plain :class:`MLP` and the residual :class:`ResidualMLP` used by DPPO/D3IL.

Both map ``(..., in_dim) -> (..., out_dim)``. Activations are named by string (``"mish"``, ``"relu"``,
``"gelu"``, ``"silu"``, ``"tanh"``, ``"elu"``, ``"identity"``) so configs can choose them.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import torch
from torch import nn

from dpft.errors import DpftError

_ACTIVATIONS: Dict[str, Callable[[], nn.Module]] = {
    "mish": nn.Mish,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "identity": nn.Identity,
}


def make_activation(name: str) -> nn.Module:
    """Return a fresh activation module for ``name`` (case-insensitive); see the module docstring."""
    key = str(name).lower()
    if key not in _ACTIVATIONS:
        raise DpftError(
            "Unknown activation {!r}: expected one of {}.".format(name, ", ".join(sorted(_ACTIVATIONS)))
        )
    return _ACTIVATIONS[key]()


def _check_dims(dims: Sequence[int], what: str) -> None:
    for d in dims:
        if int(d) != d or int(d) < 1:
            raise DpftError("{}: every layer width must be a positive integer, got {}.".format(what, list(dims)))


class MLP(nn.Module):
    """Linear layers ``dims[0] -> dims[1] -> ... -> dims[-1]``.

    Each hidden layer is ``Linear -> [LayerNorm] -> activation``; the last layer is ``Linear`` followed by
    ``out_activation`` when given.

    Args:
        dims: layer widths including input and output, at least two entries.
        activation: hidden activation name.
        layer_norm: LayerNorm after every hidden Linear (before the activation).
        out_activation: optional activation name after the last Linear (``None`` = identity).

    Shapes: ``(..., dims[0]) -> (..., dims[-1])``.
    """

    def __init__(
        self,
        dims: Sequence[int],
        activation: str = "mish",
        layer_norm: bool = False,
        out_activation: Optional[str] = None,
    ):
        super().__init__()
        dims = [int(d) for d in dims]
        if len(dims) < 2:
            raise DpftError("MLP dims must list at least an input and an output width, got {}.".format(dims))
        _check_dims(dims, "MLP dims")
        make_activation(activation)  # validate the name even when there is no hidden layer
        layers = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                if layer_norm:
                    layers.append(nn.LayerNorm(dims[i + 1]))
                layers.append(make_activation(activation))
        if out_activation is not None:
            layers.append(make_activation(out_activation))
        self.layers = nn.Sequential(*layers)
        self.in_dim = dims[0]
        self.out_dim = dims[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in_dim) -> (..., out_dim)``."""
        return self.layers(x)


class ResidualBlock(nn.Module):
    """Two pre-activation Linear layers with a skip: ``x + L2(act([LN] L1(act([LN] x))))`` (D3IL/DPPO).

    Shapes: ``(..., dim) -> (..., dim)``.
    """

    def __init__(self, dim: int, activation: str = "mish", layer_norm: bool = False, ln_eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=ln_eps) if layer_norm else nn.Identity()
        self.act1 = make_activation(activation)
        self.linear1 = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=ln_eps) if layer_norm else nn.Identity()
        self.act2 = make_activation(activation)
        self.linear2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear1(self.act1(self.norm1(x)))
        h = self.linear2(self.act2(self.norm2(h)))
        return x + h


class ResidualMLP(nn.Module):
    """``Linear(in, hidden) -> num_blocks x ResidualBlock(hidden) -> act -> Linear(hidden, out)``.

    With ``num_blocks = 1`` this has as many Linear layers (4) as ``MLP([in, h, h, h, out])``, which is how DPPO
    maps ``mlp_dims=[h, h, h]`` to a residual network. ``out_activation=False`` drops the ``act`` before the output
    layer and ``ln_eps=1e-6`` is the blocks' LayerNorm epsilon: DPPO's ``ResidualMLP`` exactly.

    Shapes: ``(..., in_dim) -> (..., out_dim)``.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        num_blocks: int,
        out_dim: int,
        activation: str = "mish",
        layer_norm: bool = False,
        out_activation: bool = True,
        ln_eps: float = 1e-5,
    ):
        super().__init__()
        _check_dims([in_dim, hidden_dim, out_dim], "ResidualMLP widths")
        if int(num_blocks) < 0:
            raise DpftError("ResidualMLP num_blocks must be >= 0, got {}.".format(num_blocks))
        self.input_layer = nn.Linear(int(in_dim), int(hidden_dim))
        self.blocks = nn.Sequential(
            *[ResidualBlock(int(hidden_dim), activation, layer_norm, ln_eps) for _ in range(int(num_blocks))]
        )
        self.out_act = make_activation(activation if out_activation else "identity")
        self.output_layer = nn.Linear(int(hidden_dim), int(out_dim))
        self.in_dim = int(in_dim)
        self.out_dim = int(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in_dim) -> (..., out_dim)``."""
        return self.output_layer(self.out_act(self.blocks(self.input_layer(x))))


def check_action_chunk(horizon_steps: int, action_dim: int, actions: torch.Tensor, what: str) -> None:
    """Raise :class:`DpftError` unless ``actions`` is a float ``(B, horizon_steps, action_dim)`` tensor."""
    want = (horizon_steps, action_dim)
    if actions.dim() != 3 or tuple(actions.shape[1:]) != want or not actions.is_floating_point():
        raise DpftError(
            "{} must be float (B, horizon_steps={}, action_dim={}), got dtype {} shape {}.".format(
                what, want[0], want[1], actions.dtype, tuple(actions.shape)
            )
        )
