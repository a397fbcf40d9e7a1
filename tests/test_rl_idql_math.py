"""dpft.rl.idql_math: expectile loss, twin-Q target (terminated vs truncated), candidate selection."""
from __future__ import annotations

import pytest
import torch

from dpft.errors import DpftError
from dpft.rl.critic import TwinQ
from dpft.rl.idql_math import (
    candidate_scores,
    expectile_loss,
    gather_candidates,
    select_candidates,
    twin_q_loss,
    twin_q_target,
)


def test_expectile_loss_hand_values():
    diff = torch.tensor([2.0, -1.0, 0.0, -3.0])
    # tau = 0.8: 0.8*4 + 0.2*1 + 0 + 0.2*9 = 5.2, mean 1.3
    assert expectile_loss(diff, 0.8).item() == pytest.approx(1.3)
    assert expectile_loss(diff, 0.5).item() == pytest.approx(0.5 * (4 + 1 + 9) / 4)
    with pytest.raises(DpftError, match=r"\(0, 1\)"):
        expectile_loss(diff, 1.0)


def test_expectile_loss_minimizer_is_the_expectile():
    # the V minimizing the loss over samples x is the tau-expectile: sum |tau - 1[x<v]| (x - v) = 0
    x = torch.tensor([0.0, 1.0, 5.0])
    v = torch.zeros((), requires_grad=True)
    opt = torch.optim.SGD([v], lr=0.2)
    for _ in range(500):
        opt.zero_grad()
        expectile_loss(x - v, 0.9).backward()
        opt.step()
    w = torch.where(x < v.detach(), 0.1, 0.9)
    assert (w * (x - v.detach())).sum().item() == pytest.approx(0.0, abs=1e-5)
    assert v.item() > x.mean().item()  # tau > 0.5 sits above the mean


def test_twin_q_target_terminated_vs_truncated():
    reward = torch.tensor([1.0, 1.0, 1.0])
    next_v = torch.tensor([10.0, 10.0, 10.0], requires_grad=True)
    terminated = torch.tensor([False, True, False])
    # row 2 is truncated (time limit): it still bootstraps, so truncated is not an input at all
    y = twin_q_target(reward, next_v, terminated, gamma=0.9)
    torch.testing.assert_close(y, torch.tensor([10.0, 1.0, 10.0]))
    assert not y.requires_grad
    with pytest.raises(DpftError, match="same shape"):
        twin_q_target(reward, next_v[:2], terminated, 0.9)


def test_twin_q_loss_sums_both_heads():
    y = torch.tensor([1.0, 2.0])
    assert twin_q_loss(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 4.0]), y).item() == pytest.approx(0.5 + 2.0)


def _fixed_twin():
    """TwinQ over a 1-d obs and a 1-d chunk whose heads are Q1 = a + s, Q2 = 2a (plain linear heads)."""
    q = TwinQ(1, 1, hidden_dims=[1], residual=False, activation="identity")
    with torch.no_grad():
        for head, (wa, ws) in ((q.q1, (1.0, 1.0)), (q.q2, (2.0, 0.0))):
            first, last = head.layers[0], head.layers[-1]
            first.weight.copy_(torch.tensor([[ws, wa]]))  # input = [obs, chunk]
            first.bias.zero_()
            last.weight.fill_(1.0)
            last.bias.zero_()
    return q


def test_select_argmax_on_fixed_critics():
    q = _fixed_twin()
    obs = torch.tensor([[0.0], [5.0]])
    cands = torch.tensor([-1.0, 0.5, 2.0, 1.0, 3.0, -2.0]).reshape(6, 1, 1)  # B=2, N=3, row-major by obs
    flat = q.min_q(obs.repeat_interleave(3, dim=0), cands)
    # obs 0: min(a, 2a) -> [-2, 0.5, 2]; obs 1: min(a + 5, 2a) -> [2, 6, -4]
    scores, n = candidate_scores(flat, 2)
    assert n == 3
    torch.testing.assert_close(scores, torch.tensor([[-2.0, 0.5, 2.0], [2.0, 6.0, -4.0]]))
    idx = select_candidates(scores, rule="argmax")
    assert idx.tolist() == [2, 1]
    torch.testing.assert_close(gather_candidates(cands, idx), torch.tensor([[[2.0]], [[3.0]]]))
    torch.testing.assert_close(gather_candidates(cands.reshape(2, 3, 1, 1), idx), torch.tensor([[[2.0]], [[3.0]]]))


def test_select_expectile_weights_are_dppo_07_03():
    scores = torch.tensor([[1.0, -1.0, -2.0, -3.0]]).repeat(20000, 1)
    v = torch.zeros(20000)
    g = torch.Generator().manual_seed(0)
    idx = select_candidates(scores, v, rule="expectile", expectile=0.7, generator=g)
    freq = torch.bincount(idx, minlength=4).double() / idx.numel()
    # one candidate above V (0.7), three below (0.3 each): probabilities 0.7/1.6 and 0.3/1.6
    torch.testing.assert_close(freq, torch.tensor([0.4375, 0.1875, 0.1875, 0.1875], dtype=torch.float64),
                               atol=0.015, rtol=0)
    # all candidates on one side of V: uniform; the same generator state gives the same draws
    same = select_candidates(scores[:8], v[:8] - 10, rule="expectile", generator=torch.Generator().manual_seed(3))
    again = select_candidates(scores[:8], v[:8] - 10, rule="expectile", generator=torch.Generator().manual_seed(3))
    assert torch.equal(same, again)
    with pytest.raises(DpftError, match="needs v"):
        select_candidates(scores, rule="expectile")


def test_select_softmax_temperature():
    scores = torch.tensor([[0.0, 1.0]]).repeat(20000, 1)
    g = torch.Generator().manual_seed(1)
    idx = select_candidates(scores, torch.full((20000,), 5.0), rule="softmax", temperature=0.5, generator=g)
    p1 = torch.exp(torch.tensor(2.0)) / (1 + torch.exp(torch.tensor(2.0)))  # V cancels
    assert idx.double().mean().item() == pytest.approx(p1.item(), abs=0.015)
    cold = select_candidates(torch.tensor([[0.0, 1.0, 0.5]]), rule="softmax", temperature=1e-4)
    assert cold.tolist() == [1]
    with pytest.raises(DpftError, match="rule must be one of"):
        select_candidates(scores, rule="greedy")
