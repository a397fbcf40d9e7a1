"""dpft.rl.inril: interleaving schedule, gradient EMA (reference direction, noise), adaptive m(t), CAIR lambda."""
from __future__ import annotations

import math

import pytest
import torch

from dpft.errors import DpftError
from dpft.rl import inril as I

DT = torch.float64


def t(*xs):
    return torch.tensor(xs, dtype=DT)


def _same_state(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------------- parse_m

@pytest.mark.parametrize("value,want", [(10, 10), (1, 1), (10.0, 10), ("7", 7), ("inf", math.inf),
                                        ("Infinity", math.inf), (math.inf, math.inf), ("adaptive", "adaptive"),
                                        (" Adaptive ", "adaptive")])
def test_parse_m_accepts(value, want):
    assert I.parse_m(value) == want


@pytest.mark.parametrize("value", [0, -3, 2.5, "abc", True, "-inf", -math.inf, None])
def test_parse_m_rejects_with_key(value):
    with pytest.raises(DpftError, match=r"inril\.m=.*expected an integer >= 1"):
        I.parse_m(value)


# ---------------------------------------------------------------------------------------------- schedule

def _run(schedule, iterations, steps_per_iteration):
    """Simulate an agent: a list of (iteration, step) after which an IL step ran."""
    il_after = []
    for it in range(iterations):
        for step in range(steps_per_iteration):
            if schedule.record_rl_step():
                schedule.record_il_step()
                il_after.append((it, step))
    return il_after


def test_schedule_m_rl_steps_then_one_il_across_iteration_boundaries():
    s = I.InterleaveSchedule(3)
    # 4 iterations of 5 RL steps: IL after global RL steps 3, 6, 9, 12, 15, 18 (0-based 2, 5, 8, ...)
    assert _run(s, 4, 5) == [(0, 2), (1, 0), (1, 3), (2, 1), (2, 4), (3, 2)]
    assert (s.rl_steps, s.il_steps, s.rl_since_il) == (20, 6, 2)
    # m equal to the steps per iteration: the IL step is each iteration's last update
    assert _run(I.InterleaveSchedule(4), 3, 4) == [(0, 3), (1, 3), (2, 3)]
    assert _run(I.InterleaveSchedule(1), 1, 3) == [(0, 0), (0, 1), (0, 2)]


def test_schedule_inf_is_rl_only():
    s = I.InterleaveSchedule(math.inf)
    assert _run(s, 10, 50) == []
    assert (s.rl_steps, s.il_steps) == (500, 0)
    assert not s.il_due()


def test_schedule_set_m_and_misuse():
    s = I.InterleaveSchedule(10)
    for _ in range(5):
        assert not s.record_rl_step()
    s.set_m(3)  # count 5 >= 3: one IL step right away, then the count restarts (no burst)
    assert s.il_due()
    s.record_il_step()
    assert [s.record_rl_step() for _ in range(3)] == [False, False, True]
    s.record_il_step()
    with pytest.raises(RuntimeError, match="no IL step is due"):
        s.record_il_step()
    with pytest.raises(DpftError, match="expected an integer >= 1"):
        s.set_m(0)


def test_schedule_state_dict_round_trip_exact():
    a = I.InterleaveSchedule(4)
    _run(a, 2, 3)
    a.set_m(5)
    b = I.InterleaveSchedule(2)
    b.load_state_dict(a.state_dict())
    _same_state(a.state_dict(), b.state_dict())
    assert b.m == 5 and b.rl_since_il == a.rl_since_il
    assert _run(a, 3, 7) == _run(b, 3, 7)
    c = I.InterleaveSchedule(math.inf)
    d = I.InterleaveSchedule(1)
    d.load_state_dict(c.state_dict())
    assert d.m == math.inf
    with pytest.raises(DpftError, match="missing"):
        d.load_state_dict({"m": torch.tensor(1.0)})


# ---------------------------------------------------------------------------------------------- GradientEMA

def test_gradient_ema_matches_direct_weighted_sums():
    gen = torch.Generator().manual_seed(0)
    beta = 0.8
    grads = [torch.randn(7, generator=gen, dtype=DT) for _ in range(6)]
    ema = I.GradientEMA(beta)
    for g in grads:
        ema.update(g)
    k = len(grads)
    w = [(1 - beta) * beta ** (k - 1 - i) / (1 - beta ** k) for i in range(k)]
    assert sum(w) == pytest.approx(1.0)
    torch.testing.assert_close(ema.mean, sum(wi * g for wi, g in zip(w, grads)), rtol=1e-12, atol=1e-12)
    assert ema.sq_norm.item() == pytest.approx(sum(wi * float(g @ g) for wi, g in zip(w, grads)), rel=1e-12)
    assert ema.weight_sq == pytest.approx(sum(wi * wi for wi in w), rel=1e-12)
    # beta = 0: the last gradient only; the first update copies
    last = I.GradientEMA(0.0)
    g0 = t(1, 2)
    last.update(g0)
    g0[0] = 99.0
    assert last.mean.tolist() == [1.0, 2.0]
    last.update(t(3, 4))
    assert last.mean.tolist() == [3.0, 4.0]


def test_gradient_ema_two_gradients_by_hand():
    ema = I.GradientEMA(0.5)
    ema.update(t(1, 0))
    with pytest.raises(RuntimeError, match="at least 2"):
        ema.noise_var()
    ema.update(t(3, 0))
    # a_2 = 0.5 / 0.75 = 2/3: M = (1/3)(1,0) + (2/3)(3,0) = (7/3, 0); S = 1/3 + 6 = 19/3; W = 1/9 + 4/9 = 5/9
    assert ema.mean.tolist() == pytest.approx([7 / 3, 0.0])
    assert ema.weight_sq == pytest.approx(5 / 9)
    # v = (S - |M|^2) / (1 - W) = (19/3 - 49/9) / (4/9) = (8/9) / (4/9) = 2 = the sample variance of {1, 3}
    assert ema.noise_var().item() == pytest.approx(2.0)
    assert ema.signal_sq_norm().item() == pytest.approx(49 / 9 - 5 / 9 * 2)


def test_gradient_ema_noise_and_signal_estimates_on_synthetic_stream():
    gen = torch.Generator().manual_seed(1)
    n, sigma = 200, 0.5
    true = torch.randn(n, generator=gen, dtype=DT)
    true = 2.0 * true / true.norm()            # |G| = 2
    ema = I.GradientEMA(0.995)
    for _ in range(3000):
        ema.update(true + sigma * torch.randn(n, generator=gen, dtype=DT))
    v = sigma ** 2 * n                           # E|g - G|^2 = 50
    assert ema.noise_var().item() == pytest.approx(v, rel=0.03)
    assert ema.signal_sq_norm().item() == pytest.approx(4.0, rel=0.1)
    assert ema.mean_sq_norm().item() > 4.0        # the raw EMA norm is inflated by noise; the estimate is not


def test_gradient_ema_state_dict_round_trip_exact_and_checks():
    gen = torch.Generator().manual_seed(2)
    a = I.GradientEMA(0.9)
    for _ in range(5):
        a.update(torch.randn(11, generator=gen))  # float32 gradients: the mean stays float32
    b = I.GradientEMA(0.9)
    b.load_state_dict(a.state_dict())
    _same_state(a.state_dict(), b.state_dict())
    assert b.mean.dtype == torch.float32
    for _ in range(4):
        g = torch.randn(11, generator=gen)
        a.update(g)
        b.update(g)
    _same_state(a.state_dict(), b.state_dict())
    assert torch.equal(a.noise_var(), b.noise_var())
    a.update(torch.ones(11, dtype=DT))  # a float64 gradient joins the float32 mean in its dtype
    assert a.mean.dtype == torch.float32 and a.count == 10
    empty = I.GradientEMA(0.9)
    fresh = I.GradientEMA(0.9)
    fresh.load_state_dict(empty.state_dict())
    assert fresh.count == 0 and fresh.mean is None
    with pytest.raises(DpftError, match="beta=0.9 but this run uses beta=0.5"):
        I.GradientEMA(0.5).load_state_dict(a.state_dict())
    with pytest.raises(DpftError, match="size 3 after gradients of size 11"):
        a.update(torch.zeros(3))
    with pytest.raises(DpftError, match="beta"):
        I.GradientEMA(1.0)


# ---------------------------------------------------------------------------------------------- adaptive m

def test_adaptive_m_hand_values():
    """rule="noise" (dpft's earlier rule): B = q rho a b + (c/2) q^2 (a^2 + v_IL), D = (1 - c/2) b^2 - (c/2) v_RL."""
    for rule in ("paper", "noise"):  # first order (c = 0): both rules are raw = q rho a / b
        assert I.adaptive_m(2.0, 0.5, 1.0, c=0.0, rule=rule) == (4, 4.0)
        assert I.adaptive_m(1.0, 1.0, 0.5, c=0.0, rule=rule) == (1, 0.5)          # ceil(0.5) = 1
        assert I.adaptive_m(1.0, 1.0, 0.5, c=0.0, lr_ratio=5.0, rule=rule) == (3, 2.5)
    # with curvature: a = 4, b = 1, rho = 0.5, c = 0.5: B = 2 + 0.25 * 16 = 6, D = 0.75 -> 8
    m, raw = I.adaptive_m(4.0, 1.0, 0.5, c=0.5, rule="noise")
    assert m == 8 and raw == pytest.approx(8.0)
    # noise: a = 1, b = 2, rho = 0.5, c = 0.5, v_IL = 1, v_RL = 4: B = 1 + 0.25 * 2 = 1.5, D = 3 - 1 = 2
    assert I.adaptive_m(1.0, 2.0, 0.5, 1.0, 4.0, c=0.5, rule="noise") == (1, 0.75)
    # the same with v_RL = 10: D = 3 - 2.5 = 0.5 -> raw 3
    assert I.adaptive_m(1.0, 2.0, 0.5, 1.0, 10.0, c=0.5, rule="noise") == (3, pytest.approx(3.0))
    # noisy RL minibatches (v_RL > (2/c - 1) b^2 = 3 * 4): D < 0 -> m_max, whatever the conflict
    assert I.adaptive_m(1.0, 2.0, 0.01, 0.0, 13.0, c=0.5, m_max=100, rule="noise") == (100, math.inf)


def test_adaptive_m_paper_rule_hand_values():
    """IN-RIL Appendix D: m A = B, B = q rho a b + (c/2) q^2 v_IL, A = (1 - c/2) b^2 (the default rule)."""
    # a = 4, b = 1, rho = 0.5, c = 0.5, no noise: B = 2, A = 0.75 -> raw 8/3, m = 3
    m, raw = I.adaptive_m(4.0, 1.0, 0.5, c=0.5)
    assert m == 3 and raw == pytest.approx(8.0 / 3.0)
    # a = 1, b = 2, rho = 0.5, c = 0.5, v_IL = 1: B = 1 + 0.25 * 1 = 1.25, A = 0.75 * 4 = 3 -> raw 5/12, m = 1
    assert I.adaptive_m(1.0, 2.0, 0.5, 1.0, 4.0, c=0.5) == (1, pytest.approx(5.0 / 12.0))
    # v_RL does not enter: the same with v_RL = 13 (where rule="noise" saturates at m_max)
    assert I.adaptive_m(1.0, 2.0, 0.5, 1.0, 13.0, c=0.5) == (1, pytest.approx(5.0 / 12.0))
    # q = 2, a = 3, b = 0.5, rho = 0.6, c = 0.2, v_IL = 1: B = 2*0.6*3*0.5 + 0.1*4*1 = 2.2, A = 0.9*0.25 = 0.225
    m, raw = I.adaptive_m(3.0, 0.5, 0.6, 1.0, 0.16, c=0.2, lr_ratio=2.0, m_max=1000, rule="paper")
    assert raw == pytest.approx(2.2 / 0.225) and m == 10
    with pytest.raises(DpftError, match="rule='sqrt'"):
        I.adaptive_m(1.0, 1.0, 0.5, rule="sqrt")


def test_adaptive_m_regimes_and_clipping():
    assert I.adaptive_m(1.0, 1.0, -0.5, c=0.0, m_min=2) == (2, -0.5)    # aligned: IL helps RL -> m_min
    assert I.adaptive_m(1.0, 0.0, 0.5, c=0.5, m_max=40, rule="noise") == (40, math.inf)  # no RL progress -> m_max
    assert I.adaptive_m(1.0, 0.0, 0.5, 1.0, c=0.5, m_max=40) == (40, math.inf)  # paper: IL noise, no RL gradient
    assert I.adaptive_m(1.0, 0.0, 0.5, c=0.0, m_min=2)[0] == 2  # first order, no RL gradient: IL is harmless
    assert I.adaptive_m(1.0, 1.0, 0.5, 0.0, 100.0, c=0.5, m_max=40, rule="noise")[0] == 40  # RL noise-dominated
    assert I.adaptive_m(1.0, 1.0, 0.5, 0.0, 100.0, c=0.5, m_max=40) == (1, pytest.approx(2.0 / 3.0))  # paper
    assert I.adaptive_m(0.0, 0.0, 0.0, c=0.0, m_min=3)[0] == 3
    assert I.adaptive_m(100.0, 1.0, 1.0, c=0.0, m_max=50) == (50, 100.0)


def test_adaptive_m_monotone_in_conflict_il_norm_and_rl_norm():
    base = dict(c=0.3, m_min=1, m_max=10 ** 6)
    raws = [I.adaptive_m(1.0, 0.2, rho, 0.1, 0.1, **base)[1] for rho in (-0.5, 0.0, 0.3, 0.9)]
    assert raws == sorted(raws) and raws[0] < raws[-1]
    by_a = [I.adaptive_m(a, 0.2, 0.5, 0.1, 0.1, **base)[1] for a in (0.5, 1.0, 2.0)]
    assert by_a == sorted(by_a)
    by_b = [I.adaptive_m(1.0, b, 0.5, 0.1, 0.1, **base)[1] for b in (0.2, 0.4, 0.8)]
    assert by_b == sorted(by_b, reverse=True)
    by_vil = [I.adaptive_m(1.0, 0.2, 0.5, v, 0.1, **base)[1] for v in (0.0, 1.0, 4.0)]
    assert by_vil == sorted(by_vil)


@pytest.mark.parametrize("kwargs,match", [
    (dict(c=2.0), "0 <= c < 2"), (dict(lr_ratio=0.0), "lr_ratio"), (dict(m_min=0), "1 <= m_min <= m_max"),
    (dict(m_min=5, m_max=4), "1 <= m_min <= m_max"), (dict(rho=1.5), r"rho=1.5"), (dict(a=-1.0), ">= 0"),
])
def test_adaptive_m_rejects(kwargs, match):
    args = dict(a=1.0, b=1.0, rho=0.5)
    args.update({k: kwargs.pop(k) for k in ("a", "b", "rho") if k in kwargs})
    with pytest.raises(DpftError, match=match):
        I.adaptive_m(args["a"], args["b"], args["rho"], **kwargs)


def _stream(gen, mean, sigma, count, ema):
    for _ in range(count):
        ema.update(mean + sigma * torch.randn(mean.numel(), generator=gen, dtype=DT))


def test_adaptive_interleave_on_synthetic_gradients():
    gen = torch.Generator().manual_seed(3)
    n = 400
    e1, e2 = torch.zeros(n, dtype=DT), torch.zeros(n, dtype=DT)
    e1[0], e2[1] = 1.0, 1.0
    cos = -0.6                                              # conflicting: rho = 0.6
    g_il = 3.0 * e1                                         # |grad L_IL| = 3
    g_rl = 0.5 * (cos * e1 + math.sqrt(1 - cos ** 2) * e2)  # |grad L_RL| = 0.5
    il, rl = I.GradientEMA(0.995), I.GradientEMA(0.995)
    ctl = I.AdaptiveInterleave(m_init=10, m_min=1, m_max=1000, lr_ratio=1.0, c=0.2)
    il.update(g_il)
    rl.update(g_rl)
    assert ctl.update(il, rl) == 10 and ctl.updates == 0   # warm-up: fewer than 2 gradients each
    s_il, s_rl = 0.05, 0.02                                  # v_IL = 1.0, v_RL = 0.16
    _stream(gen, g_il, s_il, 3000, il)
    _stream(gen, g_rl, s_rl, 3000, rl)
    m = ctl.update(il, rl)
    st = ctl.stats
    assert st["rho"] == pytest.approx(0.6, abs=0.03)
    assert st["g_il_norm"] == pytest.approx(3.0, rel=0.02) and st["g_rl_norm"] == pytest.approx(0.5, rel=0.05)
    assert st["var_il"] == pytest.approx(s_il ** 2 * n, rel=0.05)
    assert st["var_rl"] == pytest.approx(s_rl ** 2 * n, rel=0.05)
    want_m, want_raw = I.adaptive_m(3.0, 0.5, 0.6, s_il ** 2 * n, s_rl ** 2 * n, c=0.2, m_max=1000)
    assert st["m_raw"] == pytest.approx(want_raw, rel=0.1)
    assert abs(m - want_m) <= max(1, 0.1 * want_m)
    # aligned gradients: m drops to m_min
    il2, rl2 = I.GradientEMA(0.9), I.GradientEMA(0.9)
    _stream(gen, g_il, 0.01, 50, il2)
    _stream(gen, 0.5 * e1, 0.01, 50, rl2)
    assert ctl.update(il2, rl2) == 1 and ctl.stats["rho"] == pytest.approx(-1.0, abs=0.02)
    back = I.AdaptiveInterleave(m_init=10, m_min=1, m_max=1000, lr_ratio=1.0, c=0.2)
    back.load_state_dict(ctl.state_dict())
    _same_state(back.state_dict(), ctl.state_dict())
    assert back.m == 1 and back.updates == 2
    with pytest.raises(DpftError, match="outside"):
        I.AdaptiveInterleave(m_init=5, m_min=5, m_max=6).load_state_dict(ctl.state_dict())
    with pytest.raises(DpftError, match="m_init"):
        I.AdaptiveInterleave(m_init=0)


# ---------------------------------------------------------------------------------------------- separation

def test_validate_separation():
    assert I.validate_separation("network", "residual_ppo") == "network"
    assert I.validate_separation("pcgrad", "dppo") == "pcgrad"
    with pytest.raises(DpftError, match=r"inril\.separation=network .*agent=residual_ppo; agent=dppo"):
        I.validate_separation("network", "dppo")
    with pytest.raises(DpftError, match="expected one of none, pcgrad, upgrad, network"):
        I.validate_separation("surgery", "dppo")


def test_separate_il_gradient_modes():
    g, r = t(1, 0), t(-1, 1)
    assert I.separate_il_gradient(g, r, "none") is g
    assert I.separate_il_gradient(g, r, "pcgrad").tolist() == [0.5, 0.5]
    assert I.separate_il_gradient(g, r, "upgrad", backend="exact").tolist() == [0.25, 0.75]
    assert I.separate_il_gradient(g, None, "pcgrad") is g
    # a float32 reference (the EMA's dtype) against a float64 gradient
    assert I.separate_il_gradient(g, r.float(), "pcgrad").dtype == DT
    with pytest.raises(DpftError, match="'network' selects parameters"):
        I.separate_il_gradient(g, r, "network")


# ---------------------------------------------------------------------------------------------- CAIR

def test_cair_lambda_step_rules():
    assert I.cair_lambda_step(0.5, 0.5, rate=0.1) == pytest.approx(0.55)      # aligned: rises by rate * cos
    assert I.cair_lambda_step(0.5, -0.5, rate=0.1) == pytest.approx(0.45)     # opposed: falls
    assert I.cair_lambda_step(0.5, -0.5, rate=0.1, monotone=True) == 0.5      # monotone: never falls
    assert I.cair_lambda_step(0.5, 0.5, rate=0.1, monotone=True) == pytest.approx(0.55)
    assert I.cair_lambda_step(0.5, 0.01, rate=0.1, mode="sign") == pytest.approx(0.6)
    assert I.cair_lambda_step(0.5, -0.01, rate=0.1, mode="sign") == pytest.approx(0.4)
    assert I.cair_lambda_step(0.5, 0.01, rate=0.1, mode="sign", threshold=0.05) == 0.5  # dead zone
    assert I.cair_lambda_step(0.98, 1.0, rate=0.1) == 1.0                      # clipped
    assert I.cair_lambda_step(0.3, -1.0, rate=0.5, lam_min=0.1) == 0.1
    with pytest.raises(DpftError, match="cair.mode"):
        I.cair_lambda_step(0.5, 0.1, rate=0.1, mode="exp")
    with pytest.raises(DpftError, match="cair.rate"):
        I.cair_lambda_step(0.5, 0.1, rate=-1.0)
    with pytest.raises(DpftError, match="cosine"):
        I.cair_lambda_step(0.5, 2.0, rate=0.1)


def _lambda_path(lam, g_il, g_rl, updates):
    from dpft.rl.grad import cosine

    path = []
    for _ in range(updates):
        lam.update(cosine(g_il, g_rl))
        path.append(lam.value)
    return path


def test_cair_lambda_on_aligned_and_opposed_gradients():
    gen = torch.Generator().manual_seed(4)
    g_il = torch.randn(50, generator=gen, dtype=DT)
    aligned = g_il + 0.5 * torch.randn(50, generator=gen, dtype=DT)    # cos > 0
    opposed = -g_il + 0.5 * torch.randn(50, generator=gen, dtype=DT)   # cos < 0
    up = _lambda_path(I.CairLambda(start=0.2, rate=0.05), g_il, aligned, 40)
    assert all(b > a for a, b in zip([0.2] + up, up[:16])) and up[-1] == 1.0
    down = _lambda_path(I.CairLambda(start=0.8, rate=0.05), g_il, opposed, 40)
    assert all(b < a for a, b in zip([0.8] + down, down[:16])) and down[-1] == 0.0
    flat = _lambda_path(I.CairLambda(start=0.8, rate=0.05, monotone=True), g_il, opposed, 40)
    assert flat == [0.8] * 40
    lam = I.CairLambda(start=0.3, rate=0.05)
    assert lam.weights() == (0.7, 0.3)
    _lambda_path(lam, g_il, aligned, 3)
    back = I.CairLambda(start=0.3, rate=0.05)
    back.load_state_dict(lam.state_dict())
    _same_state(back.state_dict(), lam.state_dict())
    assert back.value == lam.value and back.updates == 3
    with pytest.raises(DpftError, match="outside"):
        I.CairLambda(start=0.5, lam_max=0.5).load_state_dict({"value": torch.tensor(0.9, dtype=DT),
                                                              "updates": torch.tensor(1)})
    with pytest.raises(DpftError, match="cair.start"):
        I.CairLambda(start=1.5)


def test_cair_gradient():
    g_il, g_rl = t(1, 0), t(-1, 1)
    torch.testing.assert_close(I.cair_gradient(g_il, g_rl, 0.25, c=0.0), 0.75 * g_il + 0.25 * g_rl)
    # lambda = 0: only IL is left; CAGrad of (g, 0) is g0 = g / 2, returned in sum units and rescaled
    torch.testing.assert_close(I.cair_gradient(g_il, g_rl, 0.0, c=0.4), g_il / 1.16)
    # orthogonal equal weighted gradients: (1 + c) / (1 + c^2) times their sum
    torch.testing.assert_close(I.cair_gradient(t(2, 0), t(0, 2), 0.5, c=0.4), t(1, 1) * 1.4 / 1.16)
    with pytest.raises(DpftError, match="lambda"):
        I.cair_gradient(g_il, g_rl, 1.2)
