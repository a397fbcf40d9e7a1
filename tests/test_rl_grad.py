"""dpft.rl.grad: flat gradients, cosine, PCGrad, UPGrad (dual cone) and CAGrad against hand and closed forms.

The independent references are written here, by a different method than the library's: the dual-cone
projection by enumerating the active sets of its KKT conditions, CAGrad's dual by a dense grid over the
simplex, and its primal value by strong duality. torchjd's aggregators are compared where installed.
"""
from __future__ import annotations

import importlib.util
import math
import sys

import pytest
import torch

from dpft.errors import DpftError
from dpft.rl import grad as G

DT = torch.float64


def t(*xs):
    return torch.tensor(xs, dtype=DT)


def _rand_pair(gen, n, conflict):
    g = torch.randn(n, generator=gen, dtype=DT)
    r = torch.randn(n, generator=gen, dtype=DT) * (0.2 + 3 * torch.rand(1, generator=gen, dtype=DT).item())
    if conflict:  # make g . r clearly negative
        r = r - (1.5 * torch.dot(g, r).abs() / torch.dot(g, g) + 0.3) * g
    return g, r


# ---------------------------------------------------------------------------------------------- flatten

def _params():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(2, 3))
    b = torch.nn.Parameter(torch.randn(4))
    c = torch.nn.Parameter(torch.randn(1, 1, 2))
    return [a, b, c]


def test_flatten_order_none_grads_and_out_buffer():
    ps = _params()
    ps[0].grad = torch.arange(6.0).view(2, 3)
    ps[2].grad = torch.tensor([[[7.0, 8.0]]])
    flat = G.flatten_grads(ps)
    assert flat.tolist() == [0, 1, 2, 3, 4, 5, 0, 0, 0, 0, 7, 8]
    buf = torch.full((12,), -1.0)
    out = G.flatten_grads(ps, out=buf)
    assert out is buf and buf.tolist() == flat.tolist()
    with pytest.raises(DpftError, match=r"expected \(12,\)"):
        G.flatten_grads(ps, out=torch.zeros(11))
    with pytest.raises(DpftError, match="empty"):
        G.flatten_grads([])


def test_unflatten_views_share_storage_and_set_flat_grad():
    ps = _params()
    flat = torch.arange(12.0)
    views = G.unflatten_grads(flat, ps)
    assert [v.shape for v in views] == [p.shape for p in ps]
    assert views[1].tolist() == [6.0, 7.0, 8.0, 9.0]
    views[1][0] = 100.0
    assert flat[6] == 100.0  # a view, not a copy
    G.set_flat_grad(ps, flat)  # views: no copy
    base = flat.data_ptr()
    assert ps[2].grad.data_ptr() == base + 10 * flat.element_size()
    assert G.flatten_grads(ps).tolist() == flat.tolist()
    other = torch.zeros(12)
    G.set_flat_grad(ps, other, copy=True)  # copies into the existing grads, which still live in `flat`
    assert flat.abs().sum() == 0 and other.data_ptr() != ps[0].grad.data_ptr()
    with pytest.raises(DpftError, match="float64"):
        G.set_flat_grad(ps, torch.zeros(12, dtype=DT))
    with pytest.raises(DpftError, match=r"expected \(12,\)"):
        G.unflatten_grads(torch.zeros(3, 4), ps)


def test_flatten_round_trip_through_backward():
    ps = _params()
    loss = (ps[0] ** 2).sum() + (3 * ps[1]).sum() + ps[2].sum()
    loss.backward()
    flat = G.flatten_grads(ps)
    want = torch.cat([(2 * ps[0]).reshape(-1), torch.full((4,), 3.0), torch.ones(2)]).detach()
    assert torch.equal(flat, want)


# ---------------------------------------------------------------------------------------------- cosine

def test_cosine_hand_values_and_zero():
    assert G.cosine(t(1, 0), t(1, 1)).item() == pytest.approx(1 / math.sqrt(2), abs=1e-15)
    assert G.cosine(t(1, 0), t(-3, 0)).item() == pytest.approx(-1.0, abs=1e-15)
    assert G.cosine(t(0, 0), t(1, 2)).item() == 0.0
    assert G.cosine(t(0, 0), t(0, 0)).item() == 0.0
    with pytest.raises(DpftError, match="same size"):
        G.cosine(t(1, 0), t(1, 0, 0))


def test_cosine_random_high_dim():
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        a, b = torch.randn(500, generator=gen, dtype=DT), torch.randn(500, generator=gen, dtype=DT)
        want = sum(x * y for x, y in zip(a.tolist(), b.tolist())) / math.sqrt(
            sum(x * x for x in a.tolist()) * sum(y * y for y in b.tolist()))
        assert G.cosine(a, b).item() == pytest.approx(want, abs=1e-12)


# ---------------------------------------------------------------------------------------------- PCGrad

def test_pcgrad_hand_2d():
    # g = (1, 0), r = (-1, 1): g.r = -1 < 0, |r|^2 = 2: g + r/2 = (0.5, 0.5), which is orthogonal to r
    assert G.pcgrad(t(1, 0), t(-1, 1)).tolist() == [0.5, 0.5]
    assert G.pcgrad(t(1, 0), t(1, 1)).tolist() == [1.0, 0.0]   # no conflict: unchanged
    assert G.pcgrad(t(1, 0), t(0, 1)).tolist() == [1.0, 0.0]   # orthogonal: unchanged
    assert G.pcgrad(t(1, 2), t(0, 0)).tolist() == [1.0, 2.0]   # zero reference: unchanged
    assert G.pcgrad(t(2, 0), t(-1, 0)).tolist() == [0.0, 0.0]  # opposite: nothing left


def _halfspace_projection(g, r):
    """argmin |d - g| s.t. r.d >= 0, by Lagrange: d = g + mu r with mu >= 0 and complementary slackness."""
    gr, rr = float(g @ r), float(r @ r)
    mu = max(-gr / rr, 0.0)
    return g + mu * r


def test_pcgrad_random_high_dim_is_the_halfspace_projection():
    gen = torch.Generator().manual_seed(2)
    for i in range(40):
        g, r = _rand_pair(gen, 300, conflict=i % 2 == 0)
        d = G.pcgrad(g, r)
        torch.testing.assert_close(d, _halfspace_projection(g, r), rtol=0, atol=1e-12)
        assert float(d @ r) >= -1e-10 and float(d @ g) >= -1e-10
        if i % 2 == 0:
            assert abs(float(d @ r)) < 1e-10  # projected onto r's orthogonal plane


# ---------------------------------------------------------------------------------------------- dual cone

def _dual_cone_projection(x, g, r):
    """argmin |d - x| s.t. g.d >= 0, r.d >= 0, by enumerating the KKT active sets (independent of the library)."""
    J = torch.stack([g, r])
    best = None
    for active in ([], [0], [1], [0, 1]):
        if active:
            A = J[active]
            gram = A @ A.T
            if torch.linalg.matrix_rank(gram) < len(active):
                continue
            mult = torch.linalg.solve(gram, -(A @ x))
            if (mult < -1e-12).any():
                continue
            d = x + A.T @ mult
        else:
            d = x.clone()
        if (J @ d >= -1e-9 * (1 + J.norm() * x.norm())).all():
            dist = float((d - x).norm())
            if best is None or dist < best[0]:
                best = (dist, d)
    return best[1]


def test_upgrad_exact_hand_2d():
    # the rows (1, 0) and (-1, 1): g projects onto the cone's edge r.d = 0 -> (0.5, 0.5); r onto g.d = 0 -> (0, 1)
    assert G.upgrad(t(1, 0), t(-1, 1), backend="exact").tolist() == [0.25, 0.75]
    assert G.upgrad(t(1, 0), t(1, 1), backend="exact").tolist() == [1.0, 0.5]  # no conflict: the mean


def test_upgrad_exact_random_high_dim_against_kkt_projection():
    gen = torch.Generator().manual_seed(3)
    for i in range(30):
        g, r = _rand_pair(gen, 40, conflict=i % 3 != 0)
        want = 0.5 * (_dual_cone_projection(g, g, r) + _dual_cone_projection(r, g, r))
        got = G.upgrad(g, r, backend="exact")
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
        assert float(got @ g) >= -1e-10 and float(got @ r) >= -1e-10


def test_upgrad_backend_errors(monkeypatch):
    with pytest.raises(DpftError, match="'torchjd', 'exact'"):
        G.upgrad(t(1, 0), t(0, 1), backend="qp")
    monkeypatch.setattr(sys, "version_info", (3, 8, 18, "final", 0))
    with pytest.raises(DpftError, match=r"Python >= 3.10; this is Python 3.8.*dpft\[jd\].*backend='exact'"):
        G.upgrad(t(1, 0), t(0, 1), backend="torchjd")
    assert G.upgrad(t(1, 0), t(-1, 1)).tolist() == [0.25, 0.75]  # the default (exact) needs nothing
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "torchjd", None)  # makes `import torchjd` raise ImportError
    with pytest.raises(DpftError, match=r"not installed.*pip install 'dpft\[jd\]'"):
        G.upgrad(t(1, 0), t(0, 1), backend="torchjd")


needs_torchjd = pytest.mark.skipif(
    sys.version_info < (3, 10) or importlib.util.find_spec("torchjd") is None
    or importlib.util.find_spec("quadprog") is None or importlib.util.find_spec("qpsolvers") is None,
    reason="torchjd with its quadprog projector (pip install 'dpft[jd]', Python >= 3.10)")


@needs_torchjd
def test_upgrad_torchjd_hand_and_random():
    torch.testing.assert_close(G.upgrad(t(1, 0), t(-1, 1), backend="torchjd"), t(0.25, 0.75), rtol=0, atol=1e-3)
    gen = torch.Generator().manual_seed(4)
    for i in range(20):
        g, r = _rand_pair(gen, 60, conflict=i % 2 == 0)
        exact = G.upgrad(g, r, backend="exact")
        got = G.upgrad(g, r, backend="torchjd")
        # torchjd adds 1e-4 to the diagonal of the trace-normalized Gramian: ~1e-3 relative at these norm
        # ratios (0.2 to 3.2), growing as the ratio shrinks (test below)
        assert float((got - exact).norm() / exact.norm()) < 5e-3


@needs_torchjd
def test_upgrad_torchjd_error_grows_with_norm_ratio():
    """Why backend='exact' is the default: torchjd's regularization dominates when |r| << |g|."""
    gen = torch.Generator().manual_seed(9)
    g, r = _rand_pair(gen, 100, conflict=True)
    errors = []
    for ratio in (1.0, 0.1, 0.01):
        rr = r / r.norm() * g.norm() * ratio
        exact = G.upgrad(g, rr)
        errors.append(float((G.upgrad(g, rr, backend="torchjd") - exact).norm() / exact.norm()))
    assert errors[0] < 1e-3 and errors[2] > 0.05 and errors == sorted(errors)


@needs_torchjd
def test_pcgrad_matches_torchjd_two_rows():
    from torchjd.aggregation import PCGrad

    gen = torch.Generator().manual_seed(5)
    for i in range(10):
        g, r = _rand_pair(gen, 50, conflict=i % 2 == 0)
        with torch.random.fork_rng():  # torchjd's PCGrad draws its order from the global RNG
            theirs = PCGrad()(torch.stack([g, r]))
        torch.testing.assert_close(theirs, G.pcgrad(g, r) + G.pcgrad(r, g), rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------- CAGrad

def test_cagrad_hand_2d():
    c = 0.4
    # orthogonal, equal norms: by symmetry w = (1/2, 1/2), g_w = g0, d = (1 + c) g0; returned 2 d / (1 + c^2)
    want = (1 + c) / (1 + c * c)
    torch.testing.assert_close(G.cagrad(t(1, 0), t(0, 1), c), t(want, want), rtol=0, atol=1e-12)
    # c = 0: plain sum of the two gradients
    torch.testing.assert_close(G.cagrad(t(1, 0), t(-1, 3), c=0.0), t(0, 3), rtol=0, atol=1e-12)
    # g1 = (2, 0), g2 = (0, 1): g0 = (1, 0.5); the weaker task is g2, and the best point of the ball
    # |d - g0| <= c |g0| for min(g1.d, g2.d) is its top: d = g0 + c |g0| e2 (g1.d = 2 stays larger)
    d = g0 = t(1.0, 0.5)
    d = g0 + t(0.0, c * g0.norm().item())
    torch.testing.assert_close(G.cagrad(t(2, 0), t(0, 1), c, rescale=False), 2 * d, rtol=0, atol=1e-12)
    # opposite gradients (2, 0) and (-1, 0): max min(2 d1, -d1) over d1 in [0.5 - 0.2, 0.5 + 0.2] is at d1 = 0.3
    torch.testing.assert_close(G.cagrad(t(2, 0), t(-1, 0), c, rescale=False), t(0.6, 0.0), rtol=0, atol=1e-12)
    # identical gradients: d = (1 + c) g
    torch.testing.assert_close(G.cagrad(t(3, 4), t(3, 4), c, rescale=False), 2 * 1.4 * t(3, 4), rtol=0,
                               atol=1e-12)
    # c > 1 and exactly opposite equal gradients: a convex combination vanishes, d = g0 = 0
    assert G.cagrad(t(1, 1), t(-1, -1), c=2.0).abs().max().item() == 0.0
    assert G.cagrad(t(0, 0), t(0, 0)).tolist() == [0.0, 0.0]


def _grid_dual(g1, g2, c, n=200001):
    """min over a grid of w = (x, 1 - x) of F = g_w.g0 + c |g0| |g_w| (from the Gram entries)."""
    g0 = 0.5 * (g1 + g2)
    k = c * g0.norm()
    g11, g12, g22 = g1 @ g1, g1 @ g2, g2 @ g2
    xs = torch.linspace(0, 1, n, dtype=DT)
    gw_norm = (xs ** 2 * g11 + (1 - xs) ** 2 * g22 + 2 * xs * (1 - xs) * g12).clamp(min=0).sqrt()
    F = xs * (g1 @ g0) + (1 - xs) * (g2 @ g0) + k * gw_norm
    i = int(F.argmin())
    return xs[i].item(), F[i].item()


@pytest.mark.parametrize("c", [0.0, 0.4, 0.9, 1.5])
def test_cagrad_random_high_dim_against_grid_dual_and_strong_duality(c):
    gen = torch.Generator().manual_seed(int(10 * c) + 6)
    for i in range(12):
        g1, g2 = _rand_pair(gen, 64, conflict=i % 2 == 0)
        g11, g12, g22 = float(g1 @ g1), float(g1 @ g2), float(g2 @ g2)
        x, _, _ = G.cagrad_weights(g11, g12, g22, c)
        x_grid, f_min = _grid_dual(g1, g2, c)
        if c > 0:
            assert x == pytest.approx(x_grid, abs=2e-5)
        d = G.cagrad(g1, g2, c, rescale=False) / 2
        g0 = 0.5 * (g1 + g2)
        assert float((d - g0).norm()) <= c * float(g0.norm()) * (1 + 1e-9) + 1e-12  # inside the ball
        # strong duality: the primal value min_i g_i.d equals the dual minimum min_w F(w)
        assert min(float(g1 @ d), float(g2 @ d)) == pytest.approx(f_min, rel=1e-6, abs=1e-9)
        torch.testing.assert_close(G.cagrad(g1, g2, c), 2 * d / (1 + c * c), rtol=1e-12, atol=1e-12)


def test_cagrad_beats_random_points_of_the_ball():
    gen = torch.Generator().manual_seed(7)
    c = 0.4
    for _ in range(5):
        g1, g2 = _rand_pair(gen, 10, conflict=True)
        d = G.cagrad(g1, g2, c, rescale=False) / 2
        g0 = 0.5 * (g1 + g2)
        best = min(float(g1 @ d), float(g2 @ d))
        u = torch.randn(2000, 10, generator=gen, dtype=DT)
        u = u / u.norm(dim=1, keepdim=True) * torch.rand(2000, 1, generator=gen, dtype=DT) ** 0.1
        pts = g0 + c * g0.norm() * u
        assert best >= torch.minimum(pts @ g1, pts @ g2).max().item() - 1e-12


def test_cagrad_errors():
    with pytest.raises(DpftError, match="c=-0.1"):
        G.cagrad(t(1, 0), t(0, 1), c=-0.1)
    with pytest.raises(DpftError, match="same size"):
        G.cagrad(t(1, 0), t(0, 1, 2))


@pytest.mark.skipif(sys.version_info < (3, 10) or importlib.util.find_spec("torchjd") is None
                    or importlib.util.find_spec("cvxpy") is None or importlib.util.find_spec("clarabel") is None,
                    reason="torchjd[cagrad] (cvxpy + clarabel) not installed")
def test_cagrad_matches_torchjd_solver():
    from torchjd.aggregation import CAGrad

    gen = torch.Generator().manual_seed(8)
    for i in range(10):
        g1, g2 = _rand_pair(gen, 30, conflict=i % 2 == 0)
        theirs = CAGrad(c=0.4)(torch.stack([g1, g2]))  # g0 + lambda g_w, no rescaling, solved by clarabel
        ours = G.cagrad(g1, g2, 0.4, rescale=False) / 2
        assert float((theirs - ours).norm() / ours.norm()) < 1e-4


def test_grad_module_imports_without_torchjd(monkeypatch):
    """The library imports torchjd lazily: with it unimportable, everything but upgrad(backend='torchjd') works."""
    import importlib

    monkeypatch.setitem(sys.modules, "torchjd", None)
    mod = importlib.reload(G)
    try:
        assert mod.cagrad(t(1, 0), t(0, 1), c=0.0).tolist() == [1.0, 1.0]
        assert mod.upgrad(t(1, 0), t(-1, 1), backend="exact").tolist() == [0.25, 0.75]
    finally:
        monkeypatch.undo()
        importlib.reload(G)
