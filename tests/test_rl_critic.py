"""dpft.rl.critic: ValueNet / TwinQ shapes and architectures (residual honoured), Polyak update on hand values."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dpft.errors import DpftError
from dpft.models.mlp import MLP, ResidualMLP
from dpft.rl.critic import TwinQ, ValueNet, polyak_update, target_copy


def test_value_net_default_is_dppo_residual_mish_256x3():
    v = ValueNet(2 * 5)
    assert isinstance(v.net, ResidualMLP) and len(v.net.blocks) == 1
    assert v.net.input_layer.out_features == 256 and isinstance(v.net.out_act, nn.Mish)
    out = v(torch.randn(7, 2, 5))  # (B, To, Do) is flattened
    assert out.shape == (7,)
    torch.testing.assert_close(v(torch.zeros(7, 10)), v(torch.zeros(7, 2, 5)))  # same rows either way
    plain = ValueNet(10, hidden_dims=[64, 32], residual=False)
    assert isinstance(plain.net, MLP)
    assert [m.out_features for m in plain.net.layers if isinstance(m, nn.Linear)] == [64, 32, 1]


def test_value_net_errors_name_the_problem():
    with pytest.raises(DpftError, match=r"odd number of equal widths.*\[256, 128\]"):
        ValueNet(4, hidden_dims=[256, 128])
    with pytest.raises(DpftError, match="flattens to 6 features per row, but the network was built for 4"):
        ValueNet(4)(torch.zeros(3, 6))


def test_twin_q_honours_residual_and_heads_are_independent():
    torch.manual_seed(0)
    q = TwinQ(obs_dim=19, chunk_dim=4 * 7)
    assert isinstance(q.q1, ResidualMLP) and isinstance(q.q2, ResidualMLP)
    assert q.q1.input_layer.in_features == 47  # Lift: 19 + 4 * 7
    obs, chunk = torch.randn(5, 1, 19), torch.randn(5, 4, 7)
    q1, q2 = q(obs, chunk)
    assert q1.shape == q2.shape == (5,) and not torch.equal(q1, q2)
    torch.testing.assert_close(q.min_q(obs, chunk), torch.minimum(q1, q2))
    # the chunk matters (Q, not V)
    assert not torch.equal(q(obs, chunk + 1)[0], q1)
    assert isinstance(TwinQ(3, 2, residual=False).q1, MLP)


def test_polyak_update_hand_values_and_target_copy():
    src = nn.Linear(2, 1)
    tgt = target_copy(src)
    assert not any(p.requires_grad for p in tgt.parameters())
    with torch.no_grad():
        src.weight.copy_(torch.tensor([[1.0, 2.0]]))
        src.bias.fill_(4.0)
        tgt.weight.copy_(torch.tensor([[0.0, -2.0]]))
        tgt.bias.fill_(0.0)
    polyak_update(tgt, src, tau=0.25)  # 0.75 * target + 0.25 * source
    torch.testing.assert_close(tgt.weight, torch.tensor([[0.25, -1.0]]))
    torch.testing.assert_close(tgt.bias, torch.tensor([1.0]))
    polyak_update(tgt, src, tau=1.0)
    assert torch.equal(tgt.weight, src.weight) and torch.equal(tgt.bias, src.bias)
    before = tgt.weight.clone()
    with torch.no_grad():
        src.weight.add_(1.0)
    polyak_update(tgt, src, tau=0.0)
    assert torch.equal(tgt.weight, before)


def test_polyak_update_buffers_and_errors():
    src, tgt = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    with torch.no_grad():
        src.running_mean.fill_(2.0)
    src.num_batches_tracked.fill_(7)
    polyak_update(tgt, src, tau=0.5)
    torch.testing.assert_close(tgt.running_mean, torch.ones(2))
    assert tgt.num_batches_tracked.item() == 7
    with pytest.raises(DpftError, match="different parameter shapes"):
        polyak_update(nn.Linear(2, 1), nn.Linear(3, 1), 0.1)
    with pytest.raises(DpftError, match=r"tau must lie in \[0, 1\]"):
        polyak_update(tgt, src, 1.5)
