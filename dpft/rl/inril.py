"""IN-RIL and CAIR as pure math: the interleaving schedule, the reference direction, adaptive m(t), CAIR's lambda.

IN-RIL (Gao et al., arXiv 2505.10442) interleaves one imitation (IL) gradient step after every m RL gradient
steps; CAIR (TMLR submission 6891) trains on ``(1 - lambda) L_IL + lambda L_RL`` with an adaptive lambda and
combines the two weighted gradients with CAGrad. This module holds the parts that are math and state, with
no model, data or agent: the agents call them. Every stateful object has an exact ``state_dict`` of tensors
(safetensors-friendly; ints as int64, floats as float64), so a resumed run continues bit for bit.

- :func:`parse_m` / :class:`InterleaveSchedule`: one IL step after every m RL gradient steps
  (m = inf: RL only); counts carry across iterations.
- :class:`GradientEMA`: bias-corrected EMA of a stream of flat minibatch gradients with the running second
  moment. The RL one is the reference direction for gradient surgery at IL steps (IL and RL gradients never
  come from the same step); both give the noise and signal estimates of adaptive m(t).
- :func:`adaptive_m` / :class:`AdaptiveInterleave`: the break-even ratio of IN-RIL's Appendix D with the
  measured norms, ``rho = -cos(g_IL, g_RL)`` and noise terms, clipped to ``[m_min, m_max]``.
- :func:`separate_il_gradient`: the IL step's gradient under ``inril.separation`` none / pcgrad / upgrad.
- :func:`cair_lambda_step` / :class:`CairLambda` / :func:`cair_gradient`: CAIR's lambda rule and combination.

Derivations and every design choice with its reason: docs/inril.md.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple, Union

import torch

from dpft.errors import DpftError
from dpft.rl.grad import cagrad, pcgrad, upgrad

__all__ = [
    "parse_m",
    "InterleaveSchedule",
    "GradientEMA",
    "adaptive_m",
    "AdaptiveInterleave",
    "SEPARATION_MODES",
    "validate_separation",
    "separate_il_gradient",
    "cair_lambda_step",
    "CairLambda",
    "cair_gradient",
]

MValue = Union[int, float, str]


def _require_keys(state: Dict[str, torch.Tensor], keys, what: str) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise DpftError("{} state_dict is missing {} (has {}); was it saved by this version of dpft?".format(
            what, missing, sorted(state)))


def _f64(x: float) -> torch.Tensor:
    return torch.tensor(float(x), dtype=torch.float64)


def _i64(x: int) -> torch.Tensor:
    return torch.tensor(int(x), dtype=torch.int64)


# --------------------------------------------------------------------------------------------------------
# Interleaving schedule


def _check_fixed_m(m, key: str) -> Union[int, float]:
    if isinstance(m, bool):
        raise DpftError("{}={!r}: expected an integer >= 1, inf or 'adaptive'.".format(key, m))
    if isinstance(m, float) and math.isinf(m) and m > 0:
        return math.inf
    if isinstance(m, float) and m.is_integer():
        m = int(m)
    if not isinstance(m, int) or m < 1:
        raise DpftError("{}={!r}: expected an integer >= 1 (RL gradient steps per IL step), inf (RL only) or "
                        "'adaptive'.".format(key, m))
    return m


def parse_m(value: MValue, key: str = "inril.m") -> MValue:
    """The config value of the interleaving ratio: an int >= 1, ``math.inf`` (RL only) or ``"adaptive"``.

    Accepts ints, integral floats, ``inf`` (float or the strings ``"inf"``/``"infinity"``, any case) and
    ``"adaptive"``; anything else is a DpftError naming ``key``.
    """
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "adaptive":
            return "adaptive"
        if text in ("inf", "+inf", "infinity"):
            return math.inf
        try:
            value = int(text)
        except ValueError:
            raise DpftError("{}={!r}: expected an integer >= 1, inf (RL only) or 'adaptive'.".format(
                key, value)) from None
    return _check_fixed_m(value, key)


class InterleaveSchedule:
    """One IL step after every ``m`` RL gradient steps (IN-RIL); ``m = inf`` never asks for one.

    An *RL gradient step* is one optimizer step of the RL objective on the actor (one PPO minibatch update,
    one IDQL actor update). The agent calls :meth:`record_rl_step` after each; it returns True when an IL
    step is due, the agent then does exactly one IL step and calls :meth:`record_il_step`.

    Iteration boundaries: the counter is *not* reset at an iteration (rollout) boundary. With ``m = 10`` and
    8 RL steps per iteration the IL steps follow global RL steps 10, 20, 30, ... (iteration 2's 2nd, iteration
    3's 4th, ...). An IL step that becomes due on an iteration's last RL step runs right then, before the
    next rollout. :meth:`set_m` (adaptive m) takes effect at the next check: an IL step is due when
    ``rl_since_il >= m``, and an IL step resets ``rl_since_il`` to 0, so lowering m below the current count
    gives one IL step at once, never a burst.
    """

    def __init__(self, m: Union[int, float]) -> None:
        self._m = _check_fixed_m(m, "InterleaveSchedule m")
        self.rl_since_il = 0
        self.rl_steps = 0
        self.il_steps = 0

    @property
    def m(self) -> Union[int, float]:
        return self._m

    def set_m(self, m: Union[int, float]) -> None:
        self._m = _check_fixed_m(m, "InterleaveSchedule m")

    def il_due(self) -> bool:
        return self.rl_since_il >= self._m

    def record_rl_step(self) -> bool:
        """Count one RL gradient step; True if an IL step is now due."""
        self.rl_steps += 1
        self.rl_since_il += 1
        return self.il_due()

    def record_il_step(self) -> None:
        """Count the IL step that :meth:`il_due` asked for."""
        if not self.il_due():
            raise RuntimeError("InterleaveSchedule.record_il_step: no IL step is due ({} RL steps since the last "
                               "one, m={})".format(self.rl_since_il, self._m))
        self.il_steps += 1
        self.rl_since_il = 0

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """``{"m": float64 (inf allowed), "rl_since_il", "rl_steps", "il_steps": int64}``."""
        return {"m": _f64(self._m), "rl_since_il": _i64(self.rl_since_il), "rl_steps": _i64(self.rl_steps),
                "il_steps": _i64(self.il_steps)}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Restore counts and m (m too, since adaptive m changes it during training)."""
        _require_keys(state, ("m", "rl_since_il", "rl_steps", "il_steps"), "InterleaveSchedule")
        self._m = _check_fixed_m(float(state["m"]), "InterleaveSchedule state 'm'")
        self.rl_since_il = int(state["rl_since_il"])
        self.rl_steps = int(state["rl_steps"])
        self.il_steps = int(state["il_steps"])


# --------------------------------------------------------------------------------------------------------
# Running gradient statistics: reference direction and noise estimates


class GradientEMA:
    """Bias-corrected exponential moving average of flat minibatch gradients, with their squared norms.

    After the k-th :meth:`update` with gradient ``g_k``::

        a_k  = (1 - beta) / (1 - beta^k)           (a_1 = 1: no zero-initialization bias)
        M_k  = (1 - a_k) M_{k-1} + a_k g_k          mean vector = sum_i w_i g_i, weights w_i summing to 1
        S_k  = (1 - a_k) S_{k-1} + a_k |g_k|^2      mean squared norm, same weights
        W_k  = (1 - a_k)^2 W_{k-1} + a_k^2          sum_i w_i^2

    If the minibatch gradients are independent with mean ``G`` and noise ``v = E|g - G|^2``, then
    ``E S = |G|^2 + v`` and ``E |M|^2 = |G|^2 + W v``, so the unbiased estimates are
    ``v_hat = (S - |M|^2) / (1 - W)`` (:meth:`noise_var`, from the second gradient on) and
    ``|G|^2_hat = |M|^2 - W v_hat`` (:meth:`signal_sq_norm`). Gradients come from slowly moving parameters,
    so drift of G inside the window counts as noise (an overestimate of v that grows with the window,
    about ``(1 + beta) / (1 - beta)`` gradients).

    The RL instance's :attr:`mean` is IN-RIL's reference RL direction at IL steps (docs/inril.md). The mean
    is kept in the gradients' dtype and device; S is a 0-d float64 tensor on that device (no host sync per
    update); W and the count are Python numbers.
    """

    def __init__(self, beta: float = 0.9) -> None:
        if not (0.0 <= beta < 1.0):
            raise DpftError("GradientEMA beta={!r}: expected 0 <= beta < 1 (0 = the last gradient only).".format(
                beta))
        self.beta = float(beta)
        self.count = 0
        self.mean: Optional[torch.Tensor] = None
        self.sq_norm: Optional[torch.Tensor] = None
        self.weight_sq = 0.0

    def update(self, g: torch.Tensor) -> None:
        """Add one flat minibatch gradient (not modified; the first one is copied)."""
        if g.dim() != 1:
            raise DpftError("GradientEMA.update: expected a flat 1-D gradient, got shape {} (use "
                            "dpft.rl.grad.flatten_grads).".format(tuple(g.shape)))
        if self.mean is not None and g.shape != self.mean.shape:
            raise DpftError("GradientEMA.update: gradient of size {} after gradients of size {}; the parameter "
                            "set must stay the same.".format(g.numel(), self.mean.numel()))
        g = g.detach()
        if self.mean is not None:
            g = g.to(device=self.mean.device, dtype=self.mean.dtype)
        self.count += 1
        a = (1.0 - self.beta) / (1.0 - self.beta ** self.count)
        g_sq = torch.linalg.vector_norm(g, dtype=torch.float64) ** 2
        if self.mean is None:
            self.mean = g.clone()
            self.sq_norm = g_sq
        else:
            self.mean.lerp_(g, a)
            self.sq_norm = (1.0 - a) * self.sq_norm + a * g_sq
        self.weight_sq = (1.0 - a) ** 2 * self.weight_sq + a * a

    def mean_sq_norm(self) -> torch.Tensor:
        """``|M|^2`` as a 0-d float64 tensor."""
        self._need(1, "mean_sq_norm")
        return torch.linalg.vector_norm(self.mean, dtype=torch.float64) ** 2

    def noise_var(self) -> torch.Tensor:
        """``v_hat``: estimated ``E|g - G|^2`` of one minibatch gradient (0-d float64); needs 2 gradients."""
        self._need(2, "noise_var")
        return (self.sq_norm - self.mean_sq_norm()).clamp(min=0.0) / (1.0 - self.weight_sq)

    def signal_sq_norm(self) -> torch.Tensor:
        """``|G|^2_hat``: estimated squared norm of the true gradient (0-d float64, >= 0); needs 2 gradients."""
        return (self.mean_sq_norm() - self.weight_sq * self.noise_var()).clamp(min=0.0)

    def _need(self, n: int, what: str) -> None:
        if self.count < n:
            raise RuntimeError("GradientEMA.{} needs at least {} gradient(s), has {}".format(what, n, self.count))

    def to(self, device: Union[str, torch.device]) -> "GradientEMA":
        if self.mean is not None:
            self.mean = self.mean.to(device)
            self.sq_norm = self.sq_norm.to(device)
        return self

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """``{"beta", "weight_sq", "sq_norm": float64, "count": int64, "mean": the vector (empty if none)}``.

        CPU copies; the mean keeps its dtype.
        """
        empty = self.mean is None
        return {"beta": _f64(self.beta), "count": _i64(self.count), "weight_sq": _f64(self.weight_sq),
                "sq_norm": _f64(0.0) if empty else self.sq_norm.detach().cpu().clone(),
                "mean": torch.zeros(0) if empty else self.mean.detach().cpu().clone()}

    def load_state_dict(self, state: Dict[str, torch.Tensor], device: Optional[Union[str, torch.device]] = None
                        ) -> None:
        """Restore exactly; tensors go to ``device`` (default: the current mean's device, else CPU)."""
        _require_keys(state, ("beta", "count", "weight_sq", "sq_norm", "mean"), "GradientEMA")
        if device is None:
            device = self.mean.device if self.mean is not None else "cpu"
        beta = float(state["beta"])
        if beta != self.beta:
            raise DpftError("GradientEMA state has beta={} but this run uses beta={}; the EMA window cannot change "
                            "on resume.".format(beta, self.beta))
        count = int(state["count"])
        mean = torch.as_tensor(state["mean"])
        if (count == 0) != (mean.numel() == 0):
            raise DpftError("GradientEMA state is inconsistent: count={} with a mean of {} elements.".format(
                count, mean.numel()))
        if self.mean is not None and count > 0 and mean.shape != self.mean.shape:
            raise DpftError("GradientEMA state holds a gradient of {} elements, this run's has {} (a different "
                            "parameter set?).".format(mean.numel(), self.mean.numel()))
        self.count = count
        self.weight_sq = float(state["weight_sq"])
        if count == 0:
            self.mean, self.sq_norm = None, None
        else:
            self.mean = mean.to(device).clone()
            self.sq_norm = torch.as_tensor(state["sq_norm"]).to(device=device, dtype=torch.float64).clone()


# --------------------------------------------------------------------------------------------------------
# Adaptive interleaving ratio (IN-RIL Theorem 1 / Appendix D)


def _check_adaptive_params(lr_ratio: float, c: float, m_min: int, m_max: int) -> None:
    if not (lr_ratio > 0 and math.isfinite(lr_ratio)):
        raise DpftError("adaptive m: lr_ratio={!r}; expected a finite value > 0 (alpha_IL / alpha_RL).".format(
            lr_ratio))
    if not (0.0 <= c < 2.0):
        raise DpftError("adaptive m: c={!r}; expected 0 <= c < 2 (c = alpha_RL * L_RL, the RL step size in units "
                        "of 1/smoothness; the paper takes c in (0, 1)).".format(c))
    if isinstance(m_min, bool) or isinstance(m_max, bool) or int(m_min) != m_min or int(m_max) != m_max \
            or not (1 <= m_min <= m_max):
        raise DpftError("adaptive m: m_min={!r}, m_max={!r}; expected integers with 1 <= m_min <= m_max.".format(
            m_min, m_max))


#: rules of adaptive m(t): ``paper`` (IN-RIL Appendix D, the default) and ``noise`` (dpft's earlier rule with the RL
#: noise term and the full IL second-order term; docs/inril.md section 5.2)
ADAPTIVE_RULES = ("paper", "noise")


def adaptive_m(g_il_norm: float, g_rl_norm: float, rho: float, var_il: float = 0.0, var_rl: float = 0.0, *,
               lr_ratio: float = 1.0, c: float = 0.5, m_min: int = 1, m_max: int = 100,
               rule: str = "paper") -> Tuple[int, float]:
    """IN-RIL's interleaving ratio m(t): RL steps needed to win back one IL step's effect on the RL loss.

    With ``a = |grad L_IL|``, ``b = |grad L_RL|``, ``rho = -cos(grad L_IL, grad L_RL)``, minibatch noise
    ``v_IL, v_RL`` (``sigma^2 / N`` in the paper), ``q = lr_ratio = alpha_IL / alpha_RL`` and
    ``c = alpha_RL L_RL`` (docs/inril.md derives this from the paper's Appendix C/D bounds), ``m D = B`` with

    ``rule="paper"`` (IN-RIL Appendix D's balance ``m A = B``, the default)::

        B = q rho a b + (c/2) q^2 v_IL               expected rise of L_RL from one IL step   (/ alpha_RL)
        D = A = (1 - c/2) b^2                        expected fall of L_RL from one RL step   (/ alpha_RL)

    ``rule="noise"`` (dpft's earlier rule: the IL step's full second-order term and the RL noise)::

        B = q rho a b + (c/2) q^2 (a^2 + v_IL)
        D = (1 - c/2) b^2 - (c/2) v_RL               (noisy PPO minibatches make D <= 0, hence m = m_max)

    ``raw = B / D`` is the break-even m (paper: "equate the progress from RL updates with the negative impact
    of the IL update").

    ``m = clip(ceil(raw), m_min, m_max)``. Cases: ``B <= 0`` (the IL step does not hurt the RL loss, e.g.
    aligned gradients) gives ``m_min``; ``B > 0`` with ``D <= 0`` (RL steps make no expected progress at
    this noise level) gives ``m_max`` (raw = inf). Returns ``(m, raw)``; raw is -inf when B <= 0 and D <= 0.
    m grows with the conflict rho, the IL gradient and the IL noise, and shrinks as the RL gradient grows.
    """
    _check_adaptive_params(lr_ratio, c, m_min, m_max)
    a, b, rho, var_il, var_rl = float(g_il_norm), float(g_rl_norm), float(rho), float(var_il), float(var_rl)
    if a < 0 or b < 0 or var_il < 0 or var_rl < 0 or not all(map(math.isfinite, (a, b, rho, var_il, var_rl))):
        raise DpftError("adaptive m: norms ({}, {}) and noise variances ({}, {}) must be finite and >= 0.".format(
            a, b, var_il, var_rl))
    if not (-1.0 <= rho <= 1.0):
        raise DpftError("adaptive m: rho={!r}; expected -cos(g_IL, g_RL) in [-1, 1].".format(rho))
    if rule not in ADAPTIVE_RULES:
        raise DpftError("adaptive m: rule={!r}; expected one of {}.".format(rule, ", ".join(ADAPTIVE_RULES)))
    q = lr_ratio
    if rule == "paper":
        bump = q * rho * a * b + 0.5 * c * q * q * var_il
        gain = (1.0 - 0.5 * c) * b * b
    else:
        bump = q * rho * a * b + 0.5 * c * q * q * (a * a + var_il)
        gain = (1.0 - 0.5 * c) * b * b - 0.5 * c * var_rl
    if gain > 0:
        raw = bump / gain
    else:
        raw = math.inf if bump > 0 else -math.inf
    if bump <= 0:
        return int(m_min), raw
    if math.isinf(raw):
        return int(m_max), raw
    return int(min(max(math.ceil(raw), m_min), m_max)), raw


class AdaptiveInterleave:
    """m(t) from running IL and RL gradient statistics (:class:`GradientEMA`), for ``inril.m=adaptive``.

    The agent feeds every IL minibatch gradient it computes (IL steps, and the alignment monitor's IL
    gradients) to an IL :class:`GradientEMA` and every RL minibatch gradient to an RL one, then calls
    :meth:`update` (e.g. after each IL step) and passes :attr:`m` to :meth:`InterleaveSchedule.set_m`.
    Estimates (docs/inril.md): ``a^2 = il.signal_sq_norm()``, ``b^2 = rl.signal_sq_norm()``,
    ``rho = -<il.mean, rl.mean> / (a b)`` clipped to [-1, 1] (0 when a or b is 0; the inner product of
    the two means is unbiased for ``<grad L_IL, grad L_RL>`` because IL and RL noise are independent),
    ``v = noise_var()``. Until both have 2 gradients, m stays ``m_init``. :attr:`stats` holds the last
    estimates for logging.
    """

    def __init__(self, m_init: int = 10, m_min: int = 1, m_max: int = 100, lr_ratio: float = 1.0,
                 c: float = 0.5, rule: str = "paper") -> None:
        _check_adaptive_params(lr_ratio, c, m_min, m_max)
        if rule not in ADAPTIVE_RULES:
            raise DpftError("adaptive m: rule={!r}; expected one of {}.".format(rule, ", ".join(ADAPTIVE_RULES)))
        self.rule = rule
        if int(m_init) != m_init or not (m_min <= m_init <= m_max):
            raise DpftError("adaptive m: m_init={!r}; expected an integer in [m_min, m_max] = [{}, {}].".format(
                m_init, m_min, m_max))
        self.m_min, self.m_max, self.lr_ratio, self.c = int(m_min), int(m_max), float(lr_ratio), float(c)
        self.m = int(m_init)
        self.updates = 0
        self.stats: Dict[str, float] = {}

    def update(self, il: GradientEMA, rl: GradientEMA) -> int:
        """Recompute m from the two estimators (unchanged while either has fewer than 2 gradients)."""
        if il.count < 2 or rl.count < 2:
            return self.m
        if il.mean.shape != rl.mean.shape:
            raise DpftError("adaptive m: the IL gradients have {} elements and the RL gradients {}; both must be "
                            "over the same actor parameters.".format(il.mean.numel(), rl.mean.numel()))
        a_sq, b_sq = il.signal_sq_norm(), rl.signal_sq_norm()
        dot = torch.dot(il.mean.double(), rl.mean.to(il.mean.device).double())
        values = torch.stack([a_sq, b_sq, dot.to(a_sq.device), il.noise_var(), rl.noise_var()]).tolist()
        a_sq, b_sq, dot, var_il, var_rl = values
        a, b = math.sqrt(a_sq), math.sqrt(b_sq)
        rho = min(max(-dot / (a * b), -1.0), 1.0) if a > 0 and b > 0 else 0.0
        self.m, raw = adaptive_m(a, b, rho, var_il, var_rl, lr_ratio=self.lr_ratio, c=self.c,
                                 m_min=self.m_min, m_max=self.m_max, rule=self.rule)
        self.updates += 1
        self.stats = {"m": float(self.m), "m_raw": raw, "rho": rho, "g_il_norm": a, "g_rl_norm": b,
                      "var_il": var_il, "var_rl": var_rl}
        return self.m

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """``{"m", "updates": int64}`` (the estimators have their own state_dicts)."""
        return {"m": _i64(self.m), "updates": _i64(self.updates)}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        _require_keys(state, ("m", "updates"), "AdaptiveInterleave")
        m = int(state["m"])
        if not (self.m_min <= m <= self.m_max):
            raise DpftError("AdaptiveInterleave state has m={} outside this run's [m_min, m_max] = [{}, {}].".format(
                m, self.m_min, self.m_max))
        self.m = m
        self.updates = int(state["updates"])


# --------------------------------------------------------------------------------------------------------
# Gradient separation at IL steps

SEPARATION_MODES = ("none", "pcgrad", "upgrad", "network")


def validate_separation(mode: str, agent: str, key: str = "inril.separation") -> str:
    """Check ``inril.separation`` for ``agent``: one of SEPARATION_MODES, ``network`` only for residual_ppo."""
    if mode not in SEPARATION_MODES:
        raise DpftError("{}={!r}: expected one of {}.".format(key, mode, ", ".join(SEPARATION_MODES)))
    if mode == "network" and agent != "residual_ppo":
        raise DpftError("{}=network separates the networks (IL trains the base diffusion policy, RL the residual "
                        "policy), so it needs agent=residual_ppo; agent={} has one network. Use none, pcgrad or "
                        "upgrad.".format(key, agent))
    return mode


def separate_il_gradient(g_il: torch.Tensor, reference: Optional[torch.Tensor], mode: str,
                         backend: str = "exact") -> torch.Tensor:
    """The gradient an IL step applies under ``inril.separation=mode``, given the reference RL direction.

    ``none``: ``g_il``. ``pcgrad``: ``pcgrad(g_il, reference)`` (the IL step loses its component against the
    recent RL direction). ``upgrad``: ``upgrad(g_il, reference, backend)``, the dual-cone aggregation of
    ``[g_IL, r]`` (the step then also moves along r, by half when nothing conflicts; docs/inril.md).
    ``reference=None`` (no RL step yet) returns ``g_il`` for every mode. ``network`` is a parameter split,
    not a gradient rule: a DpftError here.
    """
    if mode not in ("none", "pcgrad", "upgrad"):
        raise DpftError("separate_il_gradient: mode={!r}; expected none, pcgrad or upgrad ('network' selects "
                        "parameters instead of changing the gradient).".format(mode))
    if mode == "none" or reference is None:
        return g_il
    if mode == "pcgrad":
        return pcgrad(g_il, reference.to(g_il.dtype))
    return upgrad(g_il, reference.to(g_il.dtype), backend=backend)


# --------------------------------------------------------------------------------------------------------
# CAIR

CAIR_MODES = ("linear", "sign")


def _check_cair(rate: float, mode: str, lam_min: float, lam_max: float, threshold: float) -> None:
    if not (rate >= 0 and math.isfinite(rate)):
        raise DpftError("cair.rate={!r}: expected a finite value >= 0 (lambda change per update).".format(rate))
    if mode not in CAIR_MODES:
        raise DpftError("cair.mode={!r}: expected one of {}.".format(mode, ", ".join(CAIR_MODES)))
    if not (0.0 <= lam_min <= lam_max <= 1.0):
        raise DpftError("cair lambda bounds [{!r}, {!r}]: expected 0 <= lam_min <= lam_max <= 1.".format(
            lam_min, lam_max))
    if not (0.0 <= threshold < 1.0):
        raise DpftError("cair.threshold={!r}: expected 0 <= threshold < 1 (|cos| dead zone).".format(threshold))


def cair_lambda_step(lam: float, cos: float, rate: float, monotone: bool = False, mode: str = "linear",
                     lam_min: float = 0.0, lam_max: float = 1.0, threshold: float = 0.0) -> float:
    """One update of CAIR's RL weight lambda from the cosine of the (unweighted) IL and RL gradients.

    ``delta = rate * cos`` (``mode="linear"``) or ``rate * sign(cos)`` (``mode="sign"``), and 0 when
    ``|cos| <= threshold``; ``monotone=True`` drops negative deltas (lambda only rises: the variant with
    CAIR's monotonic-improvement guarantee). Returns ``clip(lam + delta, lam_min, lam_max)``.
    """
    _check_cair(rate, mode, lam_min, lam_max, threshold)
    cos = float(cos)
    if not (math.isfinite(cos) and -1.0 - 1e-6 <= cos <= 1.0 + 1e-6):
        raise DpftError("cair: cos={!r}; expected a cosine in [-1, 1].".format(cos))
    if abs(cos) <= threshold:
        delta = 0.0
    elif mode == "linear":
        delta = rate * cos
    else:
        delta = math.copysign(rate, cos)
    if monotone:
        delta = max(delta, 0.0)
    return min(max(float(lam) + delta, lam_min), lam_max)


class CairLambda:
    """CAIR's adaptive convex weight: the loss is ``(1 - lambda) L_IL + lambda L_RL``.

    Per update the agent takes :meth:`weights` (from the current lambda), computes the two weighted
    gradients and combines them (:func:`cair_gradient`), then calls :meth:`update` with
    ``cos(g_IL, g_RL)`` of the unweighted gradients of that same update: lambda rises when they align,
    falls when they conflict (:func:`cair_lambda_step`), and is used from the next update on.
    """

    def __init__(self, start: float = 0.5, rate: float = 0.01, monotone: bool = False, mode: str = "linear",
                 lam_min: float = 0.0, lam_max: float = 1.0, threshold: float = 0.0) -> None:
        _check_cair(rate, mode, lam_min, lam_max, threshold)
        if not (lam_min <= start <= lam_max):
            raise DpftError("cair.start={!r}: expected a value in [lam_min, lam_max] = [{}, {}].".format(
                start, lam_min, lam_max))
        self.rate, self.monotone, self.mode = float(rate), bool(monotone), mode
        self.lam_min, self.lam_max, self.threshold = float(lam_min), float(lam_max), float(threshold)
        self.value = float(start)
        self.updates = 0

    def weights(self) -> Tuple[float, float]:
        """``(1 - lambda, lambda)``: the IL and RL loss weights."""
        return 1.0 - self.value, self.value

    def update(self, cos: Union[float, torch.Tensor]) -> float:
        self.value = cair_lambda_step(self.value, float(cos), self.rate, self.monotone, self.mode, self.lam_min,
                                      self.lam_max, self.threshold)
        self.updates += 1
        return self.value

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """``{"value": float64, "updates": int64}``."""
        return {"value": _f64(self.value), "updates": _i64(self.updates)}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        _require_keys(state, ("value", "updates"), "CairLambda")
        value = float(state["value"])
        if not (self.lam_min <= value <= self.lam_max):
            raise DpftError("CairLambda state has lambda={} outside this run's [{}, {}].".format(
                value, self.lam_min, self.lam_max))
        self.value = value
        self.updates = int(state["updates"])


def cair_gradient(g_il: torch.Tensor, g_rl: torch.Tensor, lam: float, c: float = 0.4,
                  rescale: bool = True) -> torch.Tensor:
    """CAIR's update direction: CAGrad of ``(1 - lam) g_il`` and ``lam g_rl`` (units of their sum).

    With ``c = 0`` it is exactly ``(1 - lam) g_il + lam g_rl``, the gradient of the convex combination.
    """
    if not (0.0 <= lam <= 1.0):
        raise DpftError("cair: lambda={!r}; expected a value in [0, 1].".format(lam))
    return cagrad((1.0 - lam) * g_il, lam * g_rl, c=c, rescale=rescale)
