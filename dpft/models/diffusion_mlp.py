"""DPPO's MLP denoiser: epsilon from the flattened noisy action chunk, the timestep and the condition.

``input = [x.flatten() (Ta*Da), time_mlp(SinusoidalPosEmb(t)) (time_dim), cond (cond_dim)]`` goes through a
:class:`~dpft.models.mlp.ResidualMLP` (``residual_style=True``) or a plain :class:`~dpft.models.mlp.MLP`
and is reshaped to ``(B, Ta, Da)``.

``arch="dppo"`` is DPPO's ``model/diffusion/mlp_diffusion.py`` ``DiffusionMLP`` exactly (so its checkpoints load with
:mod:`dpft.dppo_import`): no activation between the last residual block and the output layer, Mish in the time MLP
whatever ``activation`` is, LayerNorm epsilon 1e-6 in the residual blocks. ``arch="dpft"`` (the default, dpft's
layout since its first release) has the activation before the output layer and ``activation`` in the time MLP.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from dpft.errors import DpftError
from dpft.models.embeddings import SinusoidalPosEmb
from dpft.models.mlp import MLP, ResidualMLP, make_activation


#: layouts of :class:`DiffusionMLP` (``policy.mlp_arch``)
MLP_ARCHS = ("dpft", "dppo")


class DiffusionMLP(nn.Module):
    """Epsilon network ``(x (B,Ta,Da), t (B,), cond (B,cond_dim)) -> (B,Ta,Da)``.

    Args:
        action_dim: ``Da``.
        horizon_steps: ``Ta``.
        cond_dim: width of the observation encoding.
        time_dim: width of the timestep embedding (even, >= 4).
        mlp_dims: hidden widths. With ``residual_style`` they must all be equal and their count odd
            (``1 + 2 * num_blocks``): ``[h, h, h]`` = input layer + one residual block of two layers.
        residual_style: ResidualMLP (True) or plain MLP (False).
        layer_norm: LayerNorm in hidden layers.
        activation: hidden activation name.
        arch: ``"dpft"`` or ``"dppo"`` (DPPO's network exactly; see the module docstring).
    """

    def __init__(
        self,
        action_dim: int,
        horizon_steps: int,
        cond_dim: int,
        time_dim: int = 16,
        mlp_dims: Sequence[int] = (512, 512, 512),
        residual_style: bool = True,
        layer_norm: bool = False,
        activation: str = "mish",
        arch: str = "dpft",
    ):
        super().__init__()
        if arch not in MLP_ARCHS:
            raise DpftError("DiffusionMLP arch={!r}: expected one of {}.".format(arch, ", ".join(MLP_ARCHS)))
        self.arch = arch
        dppo = arch == "dppo"
        mlp_dims = [int(d) for d in mlp_dims]
        if int(action_dim) < 1 or int(horizon_steps) < 1 or int(cond_dim) < 0:
            raise DpftError(
                "The MLP diffusion policy needs action_dim >= 1, horizon_steps >= 1, cond_dim >= 0; got {}, {}, {}.".format(
                    action_dim, horizon_steps, cond_dim
                )
            )
        if not mlp_dims:
            raise DpftError("policy.mlp_dims must list at least one hidden width, e.g. [512,512,512].")
        self.action_dim = int(action_dim)
        self.horizon_steps = int(horizon_steps)
        self.cond_dim = int(cond_dim)
        time_dim = int(time_dim)
        self.time_mlp = nn.Sequential(
            SinusoidalPosEmb(time_dim),
            nn.Linear(time_dim, 2 * time_dim),
            make_activation("mish" if dppo else activation),
            nn.Linear(2 * time_dim, time_dim),
        )
        in_dim = self.horizon_steps * self.action_dim + time_dim + self.cond_dim
        out_dim = self.horizon_steps * self.action_dim
        if residual_style:
            if len(set(mlp_dims)) != 1 or len(mlp_dims) % 2 == 0:
                raise DpftError(
                    "policy.mlp_dims={} does not fit policy.residual_style=true: residual MLP blocks need an odd "
                    "number of equal widths (input layer + 2 layers per residual block, e.g. [512,512,512]); "
                    "change policy.mlp_dims or pass policy.residual_style=false.".format(
                        "[" + ",".join(str(d) for d in mlp_dims) + "]")
                )
            self.mlp = ResidualMLP(
                in_dim, mlp_dims[0], (len(mlp_dims) - 1) // 2, out_dim, activation=activation, layer_norm=layer_norm,
                out_activation=not dppo, ln_eps=1e-6 if dppo else 1e-5,
            )
        else:
            self.mlp = MLP([in_dim] + mlp_dims + [out_dim], activation=activation, layer_norm=layer_norm)

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """``t (B,)`` -> ``(B, time_dim)``: what :meth:`forward` computes for ``t`` (samplers may cache it)."""
        return self.time_mlp(t)

    def _hook_free(self) -> bool:
        from torch.nn.modules import module as _m

        if _m._global_forward_hooks or _m._global_forward_pre_hooks:
            return False
        leaves = self.__dict__.get("_leaves")
        if leaves is None:
            leaves = self.__dict__["_leaves"] = [self.mlp] + list(self.mlp.modules())
        return not any(m._forward_hooks or m._forward_pre_hooks for m in leaves)

    def _mlp_no_grad(self, h: torch.Tensor) -> torch.Tensor:
        """``self.mlp(h)`` with each layer's ``forward`` called directly (no per-module call overhead; the same
        operations, so the same numbers). Used without autograd and only while no hooks are registered."""
        mlp = self.mlp
        if isinstance(mlp, ResidualMLP):
            h = mlp.input_layer.forward(h)
            for blk in mlp.blocks:
                y = blk.linear1.forward(blk.act1.forward(blk.norm1.forward(h)))
                y = blk.linear2.forward(blk.act2.forward(blk.norm2.forward(y)))
                h = h + y
            return mlp.output_layer.forward(mlp.out_act.forward(h))
        for layer in mlp.layers:
            h = layer.forward(h)
        return h

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, t_emb: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """``x (B, Ta, Da)``, ``t (B,)`` long, ``cond (B, cond_dim)`` -> epsilon ``(B, Ta, Da)``.

        ``t_emb``: ``time_embedding(t)`` when the caller has it already (the result is the same).
        """
        b = x.shape[0]
        if t_emb is None:
            t_emb = self.time_mlp(t)
        h = torch.cat([x.reshape(b, -1), t_emb, cond.reshape(b, -1)], dim=-1)
        if not torch.is_grad_enabled() and self._hook_free():
            out = self._mlp_no_grad(h)
        else:
            out = self.mlp(h)
        return out.reshape(b, self.horizon_steps, self.action_dim)
