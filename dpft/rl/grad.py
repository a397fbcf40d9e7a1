"""Gradient combination on flat vectors: the math of IN-RIL's gradient surgery and CAIR's CAGrad.

Everything here works on 1-D tensors (one entry per trainable parameter element) so that it is independent
of the model and can be tested on 2-D vectors drawn by hand. The derivations of the closed forms are in
``docs/inril.md`` ("Gradient combination").

- :func:`flatten_grads` / :func:`unflatten_grads` / :func:`set_flat_grad`: a parameter list's ``.grad``
  as one flat vector and back (views of the flat vector, no per-parameter copies).
- :func:`cosine`: cosine similarity, 0 when either vector is zero.
- :func:`pcgrad`: PCGrad's projection of ``g`` away from a reference ``r`` when ``g . r < 0``
  (Yu et al. 2020, arXiv 2001.06782), one-sided.
- :func:`upgrad`: UPGrad / dual-cone aggregation of the rows ``[g, r]`` (Quinton and Rey 2024,
  arXiv 2406.16232): the exact two-row closed form (default, any Python) or
  ``torchjd.aggregation.UPGrad`` (``backend="torchjd"``: the ``[jd]`` extra, Python >= 3.10).
- :func:`cagrad`: CAGrad of two gradients (Liu et al. 2021, arXiv 2110.14048), exact closed form of the
  two-task dual problem; no solver.

Design notes (details in docs/inril.md):

- torchjd's ``PCGrad`` is the symmetric multi-task rule (each row projected away from the others, then
  summed) and draws its order from torch's global RNG, which would shift every later random number of a
  seeded run; the one-sided projection needed here is one line, so it is implemented directly (and
  checked against torchjd's in the tests: for two rows ``torchjd.PCGrad([g, r]) = pcgrad(g, r) +
  pcgrad(r, g)``).
- torchjd's ``CAGrad`` needs cvxpy + clarabel (``torchjd[cagrad]``), a solver stack of seven packages
  whose newest release requires numpy >= 2 (dpft pins numpy < 2) and which round-trips every update
  through numpy on the CPU. For two gradients the dual problem is a one-dimensional convex problem with a
  closed-form minimizer, implemented here exactly.
- torchjd's ``UPGrad`` solves the projection as a QP after normalizing the Gramian by its trace and adding
  1e-4 to its diagonal. When the two rows have very different norms (the EMA reference direction is often
  much shorter than a minibatch IL gradient) that regularization is not small: measured relative error vs
  the exact projection 1e-4 at equal norms, 1e-3 at a norm ratio of 0.3, 1e-2 at 0.1, 0.1 at 0.03, 0.46 at
  0.01. The two-row closed form is exact, so it is the default; torchjd stays available as a backend.
- This module imports on Python 3.8 without torchjd; torchjd is imported inside :func:`upgrad` only.
"""
from __future__ import annotations

import math
import sys
from typing import Iterable, List, Optional, Tuple

import torch

from dpft.errors import DpftError

__all__ = [
    "flatten_grads",
    "unflatten_grads",
    "set_flat_grad",
    "cosine",
    "pcgrad",
    "upgrad",
    "cagrad",
    "cagrad_weights",
    "require_torchjd",
]


def _param_list(params: Iterable[torch.nn.Parameter]) -> List[torch.nn.Parameter]:
    params = list(params)
    if not params:
        raise DpftError("The parameter list is empty: there is no gradient to flatten (did the agent select "
                        "the trainable actor parameters?).")
    return params


def flatten_grads(params: Iterable[torch.nn.Parameter], out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The ``.grad`` of ``params`` (in order) concatenated into one 1-D tensor.

    A parameter whose ``.grad`` is None contributes zeros. With ``out`` (a 1-D tensor of the total size,
    e.g. the vector of the previous call) the gradients are copied into it and it is returned, so the
    flattening allocates nothing; otherwise a new tensor of the first parameter's dtype and device.
    A flat vector is one copy of the gradients: :func:`set_flat_grad` can later hand its pieces back to
    the parameters as views, without a second copy.
    """
    params = _param_list(params)
    total = sum(p.numel() for p in params)
    if out is None:
        out = torch.empty(total, dtype=params[0].dtype, device=params[0].device)
    elif out.dim() != 1 or out.numel() != total:
        raise DpftError("flatten_grads: `out` has shape {}, expected ({},) (the total number of elements of "
                        "the {} parameters).".format(tuple(out.shape), total, len(params)))
    offset = 0
    for p in params:
        n = p.numel()
        piece = out[offset:offset + n]
        if p.grad is None:
            piece.zero_()
        else:
            piece.copy_(p.grad.reshape(-1))
        offset += n
    return out


def unflatten_grads(flat: torch.Tensor, params: Iterable[torch.nn.Parameter]) -> List[torch.Tensor]:
    """Views of the 1-D ``flat`` shaped like each parameter of ``params`` (no copies).

    Writing into a returned tensor writes into ``flat`` and vice versa.
    """
    params = _param_list(params)
    total = sum(p.numel() for p in params)
    if flat.dim() != 1 or flat.numel() != total:
        raise DpftError("unflatten_grads: the flat gradient has shape {}, expected ({},) (the total number of "
                        "elements of the {} parameters).".format(tuple(flat.shape), total, len(params)))
    views = []
    offset = 0
    for p in params:
        n = p.numel()
        views.append(flat[offset:offset + n].view(p.shape))
        offset += n
    return views


def set_flat_grad(params: Iterable[torch.nn.Parameter], flat: torch.Tensor, copy: bool = False) -> None:
    """Make the flat vector the parameters' gradient (inverse of :func:`flatten_grads`).

    ``copy=False`` (default) sets each ``p.grad`` to a view of ``flat``: no copy, but ``flat`` then *is*
    the gradient storage, and in-place gradient ops (``clip_grad_norm_``, a later ``backward`` that
    accumulates) change it. ``copy=True`` copies into the existing ``.grad`` tensors (allocating those
    that are None) and leaves ``flat`` untouched. ``flat`` must have the parameters' dtype and device.
    """
    params = _param_list(params)
    if flat.dtype != params[0].dtype or flat.device != params[0].device:
        raise DpftError("set_flat_grad: the flat gradient is {} on {}, the parameters are {} on {}; convert it "
                        "first.".format(flat.dtype, flat.device, params[0].dtype, params[0].device))
    for p, view in zip(params, unflatten_grads(flat, params)):
        if not copy:
            p.grad = view
        elif p.grad is None:
            p.grad = view.clone()
        else:
            p.grad.copy_(view)


def _check_pair(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.dim() != 1 or a.shape != b.shape:
        raise DpftError("{}: expected two 1-D gradients of the same size, got shapes {} and {} (flatten them "
                        "with dpft.rl.grad.flatten_grads).".format(what, tuple(a.shape), tuple(b.shape)))


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity ``a . b / (|a| |b|)`` of two 1-D tensors as a 0-d tensor; 0 if either is zero.

    No host synchronization (the zero case is a ``torch.where``).
    """
    _check_pair(a, b, "cosine")
    denom = a.norm() * b.norm()
    dot = torch.dot(a, b)
    return torch.where(denom > 0, dot / torch.where(denom > 0, denom, torch.ones_like(denom)),
                       torch.zeros_like(dot))


def pcgrad(g: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """PCGrad: ``g`` with its component along ``r`` removed when they conflict.

    ``g - (g . r / |r|^2) r`` if ``g . r < 0``, else ``g`` (a new tensor either way; ``r = 0`` gives ``g``).
    The result satisfies ``result . r >= 0`` (``= 0`` when projected) and ``result . g >= 0``. It is also
    the Euclidean projection of ``g`` onto the dual cone ``{d : g.d >= 0, r.d >= 0}`` (docs/inril.md).
    No host synchronization.
    """
    _check_pair(g, r, "pcgrad")
    rr = torch.dot(r, r)
    coef = torch.where(rr > 0, torch.dot(g, r).clamp(max=0) / torch.where(rr > 0, rr, torch.ones_like(rr)),
                       torch.zeros_like(rr))
    return g - coef * r


def require_torchjd(what: str):
    """Import torchjd for ``what``, or raise a DpftError that names the Python version and the pip extra."""
    if sys.version_info < (3, 10):
        raise DpftError("{} uses torchjd, which needs Python >= 3.10; this is Python {}.{}. Run on Python >= "
                        "3.10 with `pip install 'dpft[jd]'`, or use the exact two-gradient closed form "
                        "(backend='exact'), which needs nothing extra.".format(what, *sys.version_info[:2]))
    try:
        import torchjd  # noqa: F401
        from torchjd import aggregation
    except ImportError as exc:
        raise DpftError("{} uses torchjd, which is not installed ({}). Install the extra with `pip install "
                        "'dpft[jd]'` (torchjd with its quadprog projector), or use backend='exact', which "
                        "needs nothing extra.".format(what, exc)) from None
    return aggregation


def upgrad(g: torch.Tensor, r: torch.Tensor, backend: str = "exact") -> torch.Tensor:
    """UPGrad (dual-cone) aggregation of the two rows ``[g, r]``.

    Each row is projected onto the dual cone ``{d : g.d >= 0, r.d >= 0}`` and the two projections are
    averaged (torchjd's default, uniform preference), so the result never conflicts with either row.
    For two rows the projections are exactly PCGrad's: ``upgrad(g, r) = (pcgrad(g, r) + pcgrad(r, g)) / 2``
    (derived in docs/inril.md); with no conflict it is ``(g + r) / 2``.

    backend:
        ``"exact"`` (default): the closed form above, any Python, no host synchronization.
        ``"torchjd"``: ``torchjd.aggregation.UPGrad`` (``pip install 'dpft[jd]'``, Python >= 3.10;
        otherwise a DpftError says so). Its quadprog projector adds 1e-4 to the diagonal of the
        trace-normalized Gramian, so it is off by ~1e-4 relative at equal norms but by ~1e-2 at a norm
        ratio |r|/|g| of 0.1 and ~0.5 at 0.01 (module docstring); it solves on the CPU in float64 (one
        device-to-host copy of the 2x2 Gramian per call).
    """
    _check_pair(g, r, "upgrad")
    if backend == "exact":
        return 0.5 * (pcgrad(g, r) + pcgrad(r, g))
    if backend != "torchjd":
        raise DpftError("upgrad: backend={!r} is not one of 'torchjd', 'exact'.".format(backend))
    aggregation = require_torchjd("The 'upgrad' gradient aggregation")
    try:
        aggregator = aggregation.UPGrad()
    except ImportError as exc:  # the quadprog projector's optional dependencies
        raise DpftError("The 'upgrad' gradient aggregation needs torchjd's quadprog projector ({}). Install "
                        "it with `pip install 'dpft[jd]'`.".format(exc)) from None
    return aggregator(torch.stack([g, r]))


def cagrad_weights(g11: float, g12: float, g22: float, c: float = 0.4) -> Tuple[float, float, float]:
    """The CAGrad dual solution for two gradients from their Gram entries.

    Returns ``(x, coef1, coef2)`` where ``w = (x, 1 - x)`` minimizes
    ``F(x) = g_w . g0 + c |g0| |g_w|`` over ``[0, 1]`` (``g_w = x g1 + (1 - x) g2``, ``g0 = (g1 + g2) / 2``)
    and the CAGrad direction is ``d = coef1 g1 + coef2 g2 = g0 + (c |g0| / |g_w|) g_w`` (no rescaling).
    The minimizer is the closed form derived in docs/inril.md. When ``g_w = 0`` (the two gradients are
    opposite and some convex combination of them vanishes: a Pareto-stationary point) ``d = g0``, as in
    CAGrad's reference code.
    """
    if c < 0 or not math.isfinite(c):
        raise DpftError("cagrad: c={!r}; expected a finite value >= 0 (CAGrad's reference uses 0.4).".format(c))
    q = g11 + g22 - 2.0 * g12          # |g1 - g2|^2
    s = g12 - g22                      # g2 . (g1 - g2)
    p = 0.5 * (g11 - g22)              # g0 . (g1 - g2)
    g0_sq = max(0.25 * (g11 + g22 + 2.0 * g12), 0.0)
    k = c * math.sqrt(g0_sq)           # c |g0|
    scale = max(g11, g22, 0.0)
    if q <= 1e-30 * scale or q <= 0.0:
        x = 0.5                        # g1 == g2: F is constant in x
    else:
        h = max(g22 - s * s / q, 0.0)  # squared distance from 0 to the line through g1 and g2
        disc = k * k * q - p * p
        if disc <= 0.0:
            x = 0.0 if p > 0 else 1.0  # F is monotone on [0, 1]: the sign of p decides
        else:
            u = -math.copysign(math.sqrt(p * p * h / (q * disc)), p) if p != 0 else 0.0
            x = min(max(-s / q + u, 0.0), 1.0)
    gw_sq = max(x * x * g11 + (1.0 - x) ** 2 * g22 + 2.0 * x * (1.0 - x) * g12, 0.0)
    lam = 0.0 if gw_sq <= 1e-24 * scale else k / math.sqrt(gw_sq)
    return x, 0.5 + lam * x, 0.5 + lam * (1.0 - x)


def cagrad(g1: torch.Tensor, g2: torch.Tensor, c: float = 0.4, rescale: bool = True) -> torch.Tensor:
    """CAGrad of two gradients, exact, in the units of ``g1 + g2``.

    CAGrad picks the direction ``d`` within ``|d - g0| <= c |g0|`` of the average ``g0 = (g1 + g2) / 2``
    that maximizes the worse of the two first-order improvements ``min(g1 . d, g2 . d)``; its dual gives
    ``d = g0 + (c |g0| / |g_w|) g_w`` with ``g_w`` the convex combination of :func:`cagrad_weights`.

    Returned: ``2 d / (1 + c^2)`` (``rescale=True``, CAGrad's reference setting ``rescale=1``) or ``2 d``
    (``rescale=False``). The factor 2 makes ``c = 0`` return exactly ``g1 + g2``, the gradient of the
    summed losses: for CAIR's weighted gradients ``(1 - lambda) g_IL`` and ``lambda g_RL`` that is the
    gradient of the convex combination, so the learning rate keeps its meaning. Gram entries are computed
    in float64 (one host synchronization); the result has ``g1``'s dtype.
    """
    _check_pair(g1, g2, "cagrad")
    g11, g12, g22 = torch.stack([torch.dot(g1, g1), torch.dot(g1, g2), torch.dot(g2, g2)]).double().tolist()
    _, a1, a2 = cagrad_weights(g11, g12, g22, c)
    factor = 2.0 / (1.0 + c * c) if rescale else 2.0
    return (factor * a1) * g1 + (factor * a2) * g2
