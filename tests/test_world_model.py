"""World model: shapes through observe/imagine, reset at is_first, loss terms, gradient routing."""
from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Independent, Normal

from dpft.errors import DpftError
from dpft.models.world_model import (RSSM, ConvDecoder64, ConvEncoder64, WorldModel, WorldModelConfig,
                                     detach_state, image_to_float)
from dpft.rl.cmil_math import ensemble_disagreement, gaussian_kl

B, T, A, P = 2, 5, 3, 4


def _cfg(**kw):
    base = dict(deter=16, stoch=6, hidden=16, ensemble=3, depth=2, mlp_layers=1, mlp_units=8)
    base.update(kw)
    return WorldModelConfig(**base)


def _batch(proprio=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = {
        "image": torch.randint(0, 256, (B, T, 64, 64, 3), generator=g, dtype=torch.uint8),
        "action": torch.randn(B, T, A, generator=g),
        "is_first": torch.zeros(B, T, dtype=torch.bool),
    }
    batch["is_first"][:, 0] = True
    if proprio:
        batch["proprio"] = torch.randn(B, T, P, generator=g)
    return batch


def test_encoder_decoder_shapes():
    enc = ConvEncoder64(depth=2, proprio_dim=P, mlp_layers=1, mlp_units=8)
    assert enc.image_dim == 32 * 2 and enc.embed_dim == 64 + 8
    img = torch.zeros(B, T, 64, 64, 3, dtype=torch.uint8)
    assert enc(img, torch.zeros(B, T, P)).shape == (B, T, 72)
    with pytest.raises(DpftError, match="no proprio"):
        enc(img)
    dec = ConvDecoder64(10, depth=2, proprio_dim=P, mlp_layers=1, mlp_units=8)
    out = dec(torch.zeros(B, T, 10))
    assert out["image"].shape == (B, T, 64, 64, 3) and out["proprio"].shape == (B, T, P)
    x = image_to_float(torch.tensor([[[[0, 255, 51]]]], dtype=torch.uint8))
    assert x.shape == (1, 3, 1, 1) and torch.allclose(x.flatten(), torch.tensor([-0.5, 0.5, 0.2 - 0.5]))


def test_observe_and_imagine_shapes():
    torch.manual_seed(0)
    rssm = RSSM(A, 10, deter=16, stoch=6, hidden=16, ensemble=3)
    post, prior = rssm.observe(torch.randn(B, T, 10), torch.randn(B, T, A), torch.zeros(B, T, dtype=torch.bool))
    assert post["stoch"].shape == (B, T, 6) and post["deter"].shape == (B, T, 16)
    assert prior["ens_mean"].shape == (B, T, 3, 6)
    assert rssm.get_feat(post).shape == (B, T, 22)
    assert bool((post["std"] > 0.1).all()) and bool((post["std"] < 2.1).all())  # sigmoid2 + min_std
    actor = torch.nn.Linear(22, A)
    seq = rssm.imagine(lambda f: torch.tanh(actor(f)), detach_state(post), horizon=4)
    for k, shape in [("stoch", (5, B * T, 6)), ("deter", (5, B * T, 16)), ("feat", (5, B * T, 22)),
                     ("action", (5, B * T, A)), ("ens_mean", (5, B * T, 3, 6))]:
        assert seq[k].shape == shape, k
    assert torch.count_nonzero(seq["action"][0]) == 0
    assert torch.allclose(seq["stoch"][0], post["stoch"].reshape(-1, 6))
    assert ensemble_disagreement(seq["ens_mean"], member_dim=-2).shape == (5, B * T)
    # the action gradient flows through the dynamics to the actor
    seq["feat"][1:].sum().backward()
    assert actor.weight.grad is not None and actor.weight.grad.abs().sum() > 0


def test_reset_at_is_first_equals_initial_path():
    torch.manual_seed(1)
    rssm = RSSM(A, 10, deter=16, stoch=6, hidden=16, ensemble=3)
    embed, action = torch.randn(B, T, 10), torch.randn(B, T, A)
    is_first = torch.zeros(B, T, dtype=torch.bool)
    is_first[:, 0] = True
    is_first[0, 3] = True
    post, _ = rssm.observe(embed, action, is_first, sample=False, generator=torch.Generator().manual_seed(0))
    # sample 0 from step 3 on == a fresh sequence from the initial state
    fresh, _ = rssm.observe(embed[:1, 3:], action[:1, 3:], is_first[:1, 3:], sample=False,
                            generator=torch.Generator().manual_seed(0))
    for k in ("mean", "std", "deter"):
        assert torch.allclose(post[k][0, 3:], fresh[k][0], atol=1e-6), k
    # and the reset does not depend on the action given at is_first
    action2 = action.clone()
    action2[0, 3] = 100.0
    post2, _ = rssm.observe(embed, action2, is_first, sample=False)
    assert torch.allclose(post2["deter"][0, 3:], post["deter"][0, 3:], atol=1e-6)
    # without the reset, the state at 3 differs
    post3, _ = rssm.observe(embed, action, torch.zeros_like(is_first), sample=False)
    assert not torch.allclose(post3["deter"][0, 3], post["deter"][0, 3])


def test_world_model_loss_terms_match_formulas():
    torch.manual_seed(2)
    wm = WorldModel(_cfg(proprio_dim=P, kl_free=0.0), A)
    batch = _batch(proprio=True)
    loss, m, post = wm.loss(batch, generator=torch.Generator().manual_seed(3))
    assert post["stoch"].shape == (B, T, 6)
    dec = wm.decoder(wm.rssm.get_feat(post))
    target = batch["image"].float() / 255.0 - 0.5
    want_img = -Independent(Normal(dec["image"], 1.0), 3).log_prob(target).mean()
    assert m["image_loss"].item() == pytest.approx(want_img.item(), rel=1e-5)
    want_prop = -Independent(Normal(dec["proprio"], 1.0), 1).log_prob(batch["proprio"]).mean()
    assert m["proprio_loss"].item() == pytest.approx(want_prop.item(), rel=1e-5)
    total = m["kl_loss"] + m["image_loss"] + m["proprio_loss"]
    assert loss.item() == pytest.approx(total.item(), rel=1e-5)
    assert m["model_kl"].item() == pytest.approx(m["kl_loss"].item(), rel=1e-5)  # free 0: both sides equal
    loss.backward()
    assert wm.encoder.convs[0].weight.grad.abs().sum() > 0
    with pytest.raises(DpftError, match="uint8"):
        wm.loss(dict(batch, image=batch["image"].float()))


def test_world_model_kl_gradient_side():
    """Only the KL term, one step (a later prior depends on the earlier posterior sample through the GRU):
    with balance 1 the posterior head gets no gradient, the prior heads do."""
    torch.manual_seed(4)
    wm = WorldModel(_cfg(kl_free=0.0, kl_balance=1.0, image_scale=0.0), A)
    loss, _, _ = wm.loss({k: v[:, :1] for k, v in _batch().items()})
    loss.backward()
    assert wm.rssm.obs_dist.weight.grad is None or wm.rssm.obs_dist.weight.grad.abs().sum() == 0
    assert sum(float(d.weight.grad.abs().sum()) for d in wm.rssm.img_dist if d.weight.grad is not None) > 0


def test_world_model_imagine_discount_and_frozen():
    torch.manual_seed(5)
    wm = WorldModel(_cfg(discount_head=True), A)
    batch = _batch()
    batch["is_terminal"] = torch.zeros(B, T, dtype=torch.bool)
    loss, m, post = wm.loss(batch)
    assert "discount_loss" in m
    actor = torch.nn.Linear(wm.feat_dim, A)
    with wm.frozen():
        assert not any(p.requires_grad for p in wm.parameters())
        seq = wm.imagine(actor, detach_state(post), 3, gamma=0.9, is_terminal=batch["is_terminal"])
        seq["feat"].sum().backward()
    assert all(p.requires_grad for p in wm.parameters())
    assert all(p.grad is None for p in wm.rssm.parameters())
    assert actor.weight.grad is not None
    assert seq["discount"].shape == (4, B * T) and torch.allclose(seq["discount"][0], torch.full((B * T,), 0.9))
    w = seq["weight"]
    assert torch.allclose(w[0], torch.ones(B * T)) and torch.allclose(w[2], seq["discount"][0] * seq["discount"][1])


def test_kl_in_rssm_matches_closed_form():
    torch.manual_seed(6)
    rssm = RSSM(A, 10, deter=16, stoch=6, hidden=16, ensemble=2)
    post, prior = rssm.observe(torch.randn(B, T, 10), torch.randn(B, T, A), torch.zeros(B, T, dtype=torch.bool))
    _, kl = rssm.kl_loss(post, prior, free=0.0)
    want = gaussian_kl(post["mean"], post["std"], prior["mean"], prior["std"])
    assert torch.allclose(kl, want) and kl.shape == (B, T)
    assert math.isfinite(kl.detach().mean().item())
