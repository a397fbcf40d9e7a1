"""Exponential moving average (EMA) of a model's weights.

After every optimizer step the shadow weights move towards the live ones::

    decay_t = min(decay, (1 + t) / (10 + t))        (warm-up; t = updates done before this one)
    shadow  = decay_t * shadow + (1 - decay_t) * param

With warm-up the average forgets its (random) initialization quickly: ``decay_t`` is 0.1 at the first
update, 0.5 after 8, 0.9 after 80 and reaches ``decay`` after ``(10 * decay - 1) / (1 - decay)`` updates
(about 1,000 for 0.999). What ``decay`` means: the average spans roughly the last ``1 / (1 - decay)``
updates, so 0.995 (DPPO's pretraining value) averages ~200 steps and 0.999 ~1,000. ``decay = 0`` turns the
EMA into an exact copy of the live weights. Without ``warmup`` the decay is constant from the start.

Floating-point parameters are averaged (frozen ones too: they simply stay equal); buffers (e.g. norm
statistics, integer counters) are copied, not averaged, as diffusion_policy's EMAModel does. Updates use
``torch._foreach`` kernels: one fused call over all tensors.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Tuple

import torch
from torch import nn

from dpft.errors import DpftError


class EMA:
    """Shadow copy of ``model``'s parameters and buffers, updated with :meth:`update`.

    Args:
        model: the live model (its ``state_dict`` keys name the shadow tensors).
        decay: long-run decay in [0, 1).
        warmup: use ``min(decay, (1 + t) / (10 + t))`` instead of a constant decay.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        decay = float(decay)
        if not 0.0 <= decay < 1.0:
            raise DpftError("EMA decay must be in [0, 1) (e.g. 0.995 or 0.999; 0 = copy), got %r." % decay)
        self.decay = decay
        self.warmup = bool(warmup)
        self.step = 0
        self._param_names = []  # type: List[str]
        self._buffer_names = []  # type: List[str]
        self._avg = []  # type: List[torch.Tensor]  # shadows of floating-point parameters
        self._copy = []  # type: List[torch.Tensor]  # shadows of buffers and non-float parameters
        for name, p in model.named_parameters():
            if p.is_floating_point():
                self._param_names.append(name)
                self._avg.append(p.detach().clone())
            else:
                self._buffer_names.append(name)
                self._copy.append(p.detach().clone())
        for name, b in model.named_buffers():
            self._buffer_names.append(name)
            self._copy.append(b.detach().clone())
        # state_dict keys (persistent tensors, tied weights under every name) -> shadow tensor
        shadow_of = {}  # type: Dict[int, torch.Tensor]
        for name, t in zip(self._param_names + self._buffer_names, self._avg + self._copy):
            live = _named_tensor(model, name)
            shadow_of[id(live)] = t
        self._state = []  # type: List[Tuple[str, torch.Tensor]]
        for key, live in model.state_dict(keep_vars=True).items():
            if id(live) in shadow_of:
                self._state.append((key, shadow_of[id(live)]))
        # id(model) -> (model, live averaged tensors, live copied tensors); typically the training model and
        # an evaluation copy, so an update after a copy_to does no name lookups either
        self._live_cache = {}  # type: Dict[int, Tuple[nn.Module, List[torch.Tensor], List[torch.Tensor]]]

    # ------------------------------------------------------------------ update
    def current_decay(self) -> float:
        """The decay the next :meth:`update` will use."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + self.step) / (10.0 + self.step))

    def _live(self, model: nn.Module) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        # The live tensor lists are cached per model object (parameters are updated in place by optimizers
        # and load_state_dict), so a training step does no per-call name lookups.
        hit = self._live_cache.get(id(model))
        if hit is not None and hit[0] is model:
            return hit[1], hit[2]
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        try:
            avg = [params[n].detach() for n in self._param_names]
            copy = [(params[n] if n in params else buffers[n]).detach() for n in self._buffer_names]
        except KeyError as e:
            raise DpftError("EMA was built for a different model: the model has no tensor %s." % e) from None
        if len(self._live_cache) >= 4:
            self._live_cache.clear()
        self._live_cache[id(model)] = (model, avg, copy)
        return avg, copy

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the shadow towards ``model``'s current weights (call after each optimizer step)."""
        avg, copy = self._live(model)
        decay = self.current_decay()
        if self._avg:
            if decay == 0.0:
                _foreach_copy(self._avg, avg)
            else:
                torch._foreach_lerp_(self._avg, avg, 1.0 - decay)
        if self._copy:
            _foreach_copy(self._copy, copy)
        self.step += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s parameters and buffers with the shadow weights."""
        avg, copy = self._live(model)
        if self._avg:
            _foreach_copy(avg, self._avg)
        if self._copy:
            _foreach_copy(copy, self._copy)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Shadow tensors keyed exactly like ``model.state_dict()`` (loadable into the model strictly).

        The update count lives in :attr:`step` (saved separately, e.g. in a checkpoint's step.json).
        """
        return {key: t for key, t in self._state}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor], step: int) -> None:
        """Restore shadow tensors (the keys of :meth:`state_dict`, exactly) and the update count ``step``."""
        names = [key for key, _ in self._state]
        known = set(names)
        missing = [n for n in names if n not in state]
        unexpected = [n for n in state if n not in known]
        if missing or unexpected:
            raise DpftError("EMA state does not match the model: missing keys %s, unexpected keys %s."
                            % (missing[:10], unexpected[:10]))
        for n, t in self._state:
            src = state[n]
            if tuple(src.shape) != tuple(t.shape):
                raise DpftError("EMA state key '%s' has shape %s; the model expects %s."
                                % (n, tuple(src.shape), tuple(t.shape)))
            t.copy_(src)
        self.step = int(step)


def _named_tensor(model: nn.Module, name: str) -> torch.Tensor:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return getattr(module, attr)


def _foreach_copy(dst: List[torch.Tensor], src: List[torch.Tensor]) -> None:
    if hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_(dst, src)
    else:  # torch < 2.1
        for d, s in zip(dst, src):
            d.copy_(s)


__all__ = ["EMA"]
