"""Data-parallel RL fine-tuning (``torchrun ... -m dpft.cli finetune``): the collectives the on-policy update needs.

Under ``torchrun --nproc_per_node W`` each rank steps ``envs / W`` of the run's ``envs`` environments (rank ``r``
holds the global env indices ``r * envs / W ... (r + 1) * envs / W - 1``). A rank's rollout is therefore the
column block ``[:, r * N_l:(r + 1) * N_l]`` of the ``(T, N)`` rollout a single process with all N envs would hold,
and its flat sample ``s_l = (t * N_l + n_l) * S + k`` (``S`` samples per env step: 1 for PPO, ``K'`` denoising
steps for DPPO) is the global sample ``s = (t * N + r * N_l + n_l) * S + k``.

:class:`DataParallel` makes the update of :class:`dpft.agents.onpolicy.OnPolicyAgent` the single-process update
over the union of the ranks' rollouts, in exact arithmetic:

* one permutation of the GLOBAL samples per epoch (drawn by rank 0, broadcast), so a minibatch is the same set
  of ``batch_size`` global samples as in a single process; each rank computes the members it holds
  (:meth:`SampleLayout.local`), which may be any number from 0 to ``batch_size``;
* each rank's mean losses are weighted by ``n_local / batch_size`` and the gradients are SUMMED over ranks
  (:meth:`DataParallel.all_reduce_grads`): the sum is the gradient of the full minibatch's mean loss;
* advantage normalization uses the minibatch's global mean and std (``(n, sum A, sum A^2)`` summed), the
  target-KL stop the global minibatch KL (one decision for every rank), the logged losses/KL/clip fraction
  their global minibatch means, explained variance the whole ``(T, N)`` batch;
* the running reward scaler and PPO's running observation statistics merge the global batch moments on every
  rank (:meth:`all_reduce_sum` as their ``reduce``), so all ranks scale alike.

What is not the single-process computation: float summation order (agreement to ~1e-6, not bit-exact), and the
actions, since each rank samples from its own stream (seeded per ``(seed, rank, iteration)``, see
:func:`rank_stream_seed`). Every rank applies the same reduced gradients to the same weights, so the replicas
stay bit-identical.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch

from dpft.train_utils import DistInfo, all_gather_objects, barrier


def rank_stream_seed(seed: int, rank: int, iteration: int) -> int:
    """Seed of rank ``rank``'s sampler generator at the start of training iteration ``iteration`` under DDP
    (derived, so a resumed run needs no per-rank state; distinct per (seed, rank) for < 1000003 iterations)."""
    return (int(seed) * 1000 + int(rank)) * 1000003 + int(iteration)


class SampleLayout:
    """Where the global samples of a ``(T, N)`` rollout live: ``rank`` holds env columns ``rank * n_local ...``."""

    def __init__(self, steps: int, n_local: int, samples_per_row: int, rank: int, world_size: int):
        self.steps, self.n_local, self.spr = int(steps), int(n_local), int(samples_per_row)
        self.rank, self.world_size = int(rank), int(world_size)
        self.n_global = self.n_local * self.world_size
        self.total = self.steps * self.n_global * self.spr

    def local(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's local sample indices of the global samples ``idx`` (order kept)."""
        row, k = torch.div(idx, self.spr, rounding_mode="floor"), idx % self.spr
        t, n = torch.div(row, self.n_global, rounding_mode="floor"), row % self.n_global
        mine = torch.div(n, self.n_local, rounding_mode="floor") == self.rank
        local_row = t[mine] * self.n_local + n[mine] % self.n_local
        return local_row * self.spr + k[mine]


class DataParallel:
    """The process group as the RL update uses it (see the module docstring). ``device``: where collectives run
    (the agent's device: CPU tensors with gloo, CUDA tensors with NCCL)."""

    def __init__(self, info: DistInfo, device: torch.device):
        self.info = info
        self.rank = int(info.rank)
        self.world_size = int(info.world_size)
        self.device = torch.device(device)

    def layout(self, shape: Sequence[int], local_samples: int) -> SampleLayout:
        t, n = int(shape[0]), int(shape[1])
        return SampleLayout(t, n, int(local_samples) // max(1, t * n), self.rank, self.world_size)

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of ``x`` over ranks (a new tensor of ``x``'s dtype and device)."""
        import torch.distributed as dist

        y = x.detach().to(self.device).clone()
        dist.all_reduce(y)
        return y.to(x.device)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank ``src``'s ``x`` on every rank (same shape and dtype everywhere)."""
        import torch.distributed as dist

        y = x.to(self.device).clone()
        dist.broadcast(y, src)
        return y.to(x.device)

    def all_gather_cat(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's ``x`` (equal shapes) concatenated along ``dim`` in rank order."""
        import torch.distributed as dist

        y = x.detach().to(self.device).contiguous()
        parts = [torch.empty_like(y) for _ in range(self.world_size)]
        dist.all_gather(parts, y)
        return torch.cat(parts, dim=dim).to(x.device)

    def gather_objects(self, obj: Any) -> List[Any]:
        return all_gather_objects(obj, self.info)

    def barrier(self) -> None:
        barrier(self.info)

    def all_reduce_grads(self, params: List[torch.nn.Parameter],
                         extra: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """Replace every ``p.grad`` by its sum over ranks in one collective (a rank without a gradient for ``p``
        contributes zeros; ``p.grad`` stays None only where no rank has one). ``extra`` (1-d) rides along; its
        sum is returned."""
        ref = next(iter(params)).detach()
        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(ref.dtype) for p in params]
        has = torch.tensor([float(p.grad is not None) for p in params], dtype=ref.dtype, device=ref.device)
        ex = extra.detach().reshape(-1).to(ref.device, ref.dtype) if extra is not None else ref.new_zeros(0)
        flat = self.all_reduce_sum(torch.cat(parts + [has, ex]))
        total = sum(p.numel() for p in params)
        present = flat[total:total + len(params)].tolist()  # one host read
        offset = 0
        for p, count in zip(params, present):
            n = p.numel()
            if count > 0:
                g = flat[offset:offset + n].view_as(p).to(p.dtype)
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
            offset += n
        tail = flat[total + len(params):]
        return tail if extra is not None else None


def weighted_means(dp: DataParallel, values: List[Tuple[str, Optional[float]]], weight: float,
                   device: torch.device) -> dict:
    """Global minibatch means of per-rank means ``values`` (``None``: the rank has no such value) weighted by
    each rank's share ``weight``: ``{name: sum_r w_r v_r}`` for names at least one rank has."""
    vec = []
    for _, v in values:
        vec.extend([weight * float(v) if v is not None else 0.0, 1.0 if v is not None else 0.0])
    red = dp.all_reduce_sum(torch.tensor(vec, dtype=torch.float64, device=device))
    return {name: float(red[2 * i]) for i, (name, _) in enumerate(values) if float(red[2 * i + 1]) > 0}


__all__ = ["DataParallel", "SampleLayout", "rank_stream_seed", "weighted_means"]
