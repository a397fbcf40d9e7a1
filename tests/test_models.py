"""Networks, encoders, the Gaussian policy and the config builder."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.distributions import Normal
from torch.nn import functional as F

from dpft.errors import DpftError
from dpft.models import (
    MLP,
    POLICY_NAMES,
    ConditionalUnet1D,
    ConvEncoder,
    DiffusionMLP,
    GaussianModel,
    ObsEncoder,
    RandomShiftsAug,
    ResidualMLP,
    SinusoidalPosEmb,
    build_policy_model,
    images_to_float,
)
from dpft.models.mlp import ResidualBlock


def _images(shape, seed=0):
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


# ---------------------------------------------------------------- MLPs and embeddings


def test_mlp_structure_and_shapes():
    mlp = MLP([5, 8, 8, 3], activation="relu", layer_norm=True, out_activation="tanh")
    linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(5, 8), (8, 8), (8, 3)]
    assert sum(isinstance(m, nn.LayerNorm) for m in mlp.modules()) == 2
    with torch.no_grad():
        out = mlp(torch.randn(2, 7, 5) * 100)
    assert out.shape == (2, 7, 3) and float(out.abs().max()) <= 1.0
    with pytest.raises(DpftError, match="Unknown activation 'swishy'"):
        MLP([2, 2], activation="swishy")


def test_residual_block_is_identity_plus_branch():
    block = ResidualBlock(6, activation="mish")
    x = torch.randn(4, 6)
    with torch.no_grad():
        block.linear2.weight.zero_()
        block.linear2.bias.zero_()
    torch.testing.assert_close(block(x), x)
    with torch.no_grad():
        block.linear2.bias.fill_(0.5)
    torch.testing.assert_close(block(x), x + 0.5)
    res = ResidualMLP(5, 16, 2, 3)
    assert res(torch.randn(4, 5)).shape == (4, 3)
    assert sum(isinstance(m, nn.Linear) for m in res.modules()) == 6


def test_sinusoidal_embedding_values():
    emb = SinusoidalPosEmb(4)(torch.tensor([0, 3]))
    # dim 4: frequencies 1 and 10000^-1
    expected = torch.tensor(
        [[0.0, 0.0, 1.0, 1.0], [math.sin(3), math.sin(3e-4), math.cos(3), math.cos(3e-4)]]
    )
    torch.testing.assert_close(emb, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(DpftError, match="even"):
        SinusoidalPosEmb(5)


# ---------------------------------------------------------------- vision


def test_images_to_float_range_and_layout():
    img = torch.zeros(1, 2, 3, 3, dtype=torch.uint8)
    img[..., 1] = 255
    x = images_to_float(img)
    assert x.shape == (1, 3, 2, 3)
    assert float(x[:, 0].max()) == -1.0 and float(x[:, 1].min()) == 1.0


def test_random_shift_is_an_integer_shift_of_the_padded_image():
    pad = 2
    aug = RandomShiftsAug(pad)
    x = images_to_float(_images((5, 10, 12, 3)))
    out = aug(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    for n in range(5):
        matches = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if torch.equal(out[n], padded[n, :, dy : dy + 10, dx : dx + 12])
        ]
        assert matches, "sample {} is not a crop of the padded image".format(n)
    assert not torch.equal(out, x)
    torch.testing.assert_close(out, aug(x, torch.Generator().manual_seed(0)))
    assert not torch.equal(out, aug(x, torch.Generator().manual_seed(1)))
    assert torch.equal(RandomShiftsAug(0)(x), x)


def test_conv_encoder_shapes_augmentation_and_errors():
    enc = ConvEncoder((16, 20, 3), feature_dim=12)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in enc.modules())
    imgs = _images((2, 3, 16, 20, 3))
    plain = enc(imgs)
    assert plain.shape == (2, 3, 12)
    assert enc(imgs[:, 0]).shape == (2, 12)
    torch.testing.assert_close(enc(imgs), plain)  # no augmentation: deterministic
    a1 = enc(imgs, torch.Generator().manual_seed(0), augment=True)
    a2 = enc(imgs, torch.Generator().manual_seed(0), augment=True)
    torch.testing.assert_close(a1, a2)
    assert not torch.allclose(a1, plain)
    with pytest.raises(DpftError, match=r"\(16, 20, 3\)"):
        enc(_images((2, 16, 16, 3)))
    with pytest.raises(DpftError, match="8x8"):
        ConvEncoder((4, 4, 3))


# ---------------------------------------------------------------- observation encoder


def test_obs_encoder_state_only_is_the_flattened_history():
    enc = ObsEncoder({"robot0_eef_pos": (3,)}, low_dim_dim=4, cond_steps=2, image_keys=[])
    state = torch.randn(3, 2, 4)
    assert enc.cond_dim == 8
    torch.testing.assert_close(enc({"state": state}), state.reshape(3, 8))
    enc_mlp = ObsEncoder({}, 4, 2, [], cond_mlp_dims=[16, 6])
    assert enc_mlp.cond_dim == 6 and enc_mlp({"state": state}).shape == (3, 6)


def test_obs_encoder_with_cameras():
    shapes = {"agentview_image": (16, 16, 3), "wrist_image": (12, 12, 1)}
    enc = ObsEncoder(shapes, 5, 2, ["agentview_image", "wrist_image"], image_feature_dim=7)
    assert enc.cond_dim == 2 * 5 + 2 * 2 * 7
    obs = {
        "state": torch.randn(3, 2, 5),
        "agentview_image": _images((3, 2, 16, 16, 3)),
        "wrist_image": _images((3, 2, 12, 12, 1), seed=1),
    }
    out = enc(obs)
    assert out.shape == (3, enc.cond_dim)
    torch.testing.assert_close(out[:, :10], obs["state"].reshape(3, 10))
    aug = enc(obs, torch.Generator().manual_seed(3), augment=True)
    torch.testing.assert_close(aug, enc(obs, torch.Generator().manual_seed(3), augment=True))
    assert not torch.allclose(aug[:, 10:], out[:, 10:])
    torch.testing.assert_close(aug[:, :10], out[:, :10])

    bad = dict(obs)
    del bad["wrist_image"]
    with pytest.raises(DpftError, match="'wrist_image' is missing"):
        enc(bad)
    bad = dict(obs, agentview_image=obs["agentview_image"].float())
    with pytest.raises(DpftError, match="uint8"):
        enc(bad)
    bad = dict(obs, state=torch.randn(3, 1, 5))
    with pytest.raises(DpftError, match=r"float \(B, 2, 5\)"):
        enc(bad)
    with pytest.raises(DpftError, match="'cam' has no entry in obs_shapes"):
        ObsEncoder(shapes, 5, 2, ["cam"])


# ---------------------------------------------------------------- denoisers


def test_denoiser_shapes():
    x, t, c = torch.randn(3, 8, 2), torch.tensor([0, 5, 19]), torch.randn(3, 10)
    assert DiffusionMLP(2, 8, 10, mlp_dims=[32, 32, 32])(x, t, c).shape == (3, 8, 2)
    assert DiffusionMLP(2, 8, 10, mlp_dims=[32, 16], residual_style=False)(x, t, c).shape == (3, 8, 2)
    with pytest.raises(DpftError, match="odd number of equal widths"):
        DiffusionMLP(2, 8, 10, mlp_dims=[32, 32])
    for scale in (True, False):
        unet = ConditionalUnet1D(2, 10, diffusion_step_embed_dim=16, down_dims=[16, 32], cond_predict_scale=scale)
        assert unet(x, t, c).shape == (3, 8, 2)
    with pytest.raises(DpftError, match="n_groups = 8 must divide"):
        ConditionalUnet1D(2, 10, down_dims=[12, 24])


def test_unet_uses_condition_and_time():
    torch.manual_seed(0)
    unet = ConditionalUnet1D(2, 4, diffusion_step_embed_dim=16, down_dims=[16, 32])
    x, t, c = torch.randn(2, 4, 2), torch.tensor([3, 3]), torch.randn(2, 4)
    base = unet(x, t, c)
    assert not torch.allclose(base, unet(x, t, c + 1.0))
    assert not torch.allclose(base, unet(x, t + 7, c))
    with pytest.raises(DpftError, match="horizon_steps = 5"):
        unet(torch.randn(2, 5, 2), t, c)


# ---------------------------------------------------------------- Gaussian policy


def _gauss(**kw):
    return GaussianModel(ObsEncoder({}, 3, 1, []), action_dim=2, horizon_steps=2, mlp_dims=[32, 32], **kw)


def test_gaussian_log_prob_matches_torch_normal():
    model = _gauss(init_std=0.3)
    with torch.no_grad():
        model.log_std.copy_(torch.log(torch.tensor([0.2, 0.5])))
    state = torch.randn(4, 1, 3)
    actions = torch.rand(4, 2, 2) * 2 - 1
    mean = torch.tanh(model.mlp(state.reshape(4, 3))).reshape(4, 2, 2)
    expected = Normal(mean, torch.tensor([0.2, 0.5])).log_prob(actions).sum(dim=(1, 2))
    torch.testing.assert_close(model.log_prob({"state": state}, actions), expected)
    det, none = model.sample({"state": state}, deterministic=True)
    assert none is None
    torch.testing.assert_close(det, mean)
    s1, _ = model.sample({"state": state}, generator=torch.Generator().manual_seed(0))
    s2, _ = model.sample({"state": state}, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(s1, s2)
    z = torch.randn(4, 2, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(s1, mean + torch.tensor([0.2, 0.5]) * z)
    expected_entropy = Normal(mean, torch.tensor([0.2, 0.5])).entropy().sum(dim=(1, 2))
    torch.testing.assert_close(model.entropy().expand(4), expected_entropy)


def test_gaussian_std_stays_in_bounds():
    model = _gauss(std_min=0.05, std_max=0.8)
    with torch.no_grad():
        model.log_std.copy_(torch.tensor([10.0, -10.0]))
    torch.testing.assert_close(model.std(), torch.tensor([0.8, 0.05]))
    with torch.no_grad():
        dist = model.distribution({"state": torch.randn(3, 1, 3)})
    assert float(dist.scale.max()) == pytest.approx(0.8) and float(dist.scale.min()) == pytest.approx(0.05)
    with pytest.raises(DpftError, match="std_min <= init_std <= std_max"):
        _gauss(std_min=0.5, init_std=0.1)


def test_gaussian_loss_falls_on_a_learnable_mapping():
    torch.manual_seed(0)
    model = build_policy_model({"name": "gaussian_mlp", "mlp_dims": [64, 64]}, {}, 3, [], 2, 2, 1)
    w = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def batch(n, g):
        s = torch.rand(n, 1, 3, generator=g) * 2 - 1
        return {"obs": {"state": s}, "actions": torch.tanh(s.reshape(n, 3) @ w).reshape(n, 2, 2) * 0.9}

    eval_batch = batch(512, torch.Generator().manual_seed(9))
    with torch.no_grad():
        nll0, info0 = model.loss(eval_batch)
    for _ in range(200):
        loss, _ = model.loss(batch(64, gen), gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        nll1, info1 = model.loss(eval_batch)
    assert float(info1["action_mse"]) < 0.5 * float(info0["action_mse"])
    assert float(nll1) < float(nll0) - 1.0


# ---------------------------------------------------------------- builder


def test_build_policy_model_names_and_keys():
    from dpft.diffusion import DiffusionModel

    shapes = {"agentview_image": (16, 16, 3)}
    for name in POLICY_NAMES:
        model = build_policy_model({"name": name, "mlp_dims": [16, 16, 16], "down_dims": [16, 32]}, shapes, 4, [
            "agentview_image"
        ], 2, 4, 2)
        assert isinstance(model, GaussianModel if name == "gaussian_mlp" else DiffusionModel)
        assert model.obs_encoder.cond_dim == 2 * 4 + 2 * 64
    with pytest.raises(DpftError) as err:
        build_policy_model({"name": "transformer"}, {}, 4, [], 2, 4, 1)
    assert "'transformer'" in str(err.value) and all(n in str(err.value) for n in POLICY_NAMES)
    with pytest.raises(DpftError, match="mlp_dim"):
        build_policy_model({"name": "diffusion_mlp", "mlp_dim": [8]}, {}, 4, [], 2, 4, 1)


def test_build_policy_model_from_omegaconf_with_ddim_and_ft():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {
            "name": "diffusion_mlp",
            "mlp_dims": [16, 16, 16],
            "denoising_steps": 100,
            "use_ddim": True,
            "ddim_steps": 5,
            "ft_denoising_steps": 5,
            "std_min": 0.01,  # a Gaussian-only key is ignored for a diffusion policy
            "down_dims": None,
        }
    )
    model = build_policy_model(cfg, {}, 4, [], 2, 4, 1)
    assert model.num_sampling_steps == 5 and model.ft_network is not None and model.chain_steps == 5
    _, chain = model.sample({"state": torch.zeros(2, 1, 4)}, generator=torch.Generator().manual_seed(0),
                            return_chain=True)
    assert chain.shape == (2, 6, 4, 2)


def test_gaussian_log_prob_reductions_act_steps_and_entropy():
    model = _gauss(init_std=0.3)
    std = torch.tensor([0.2, 0.5])
    with torch.no_grad():
        model.log_std.copy_(std.log())
    state = torch.randn(4, 1, 3)
    actions = torch.rand(4, 2, 2) * 2 - 1
    mean, s = model.distribution({"state": state})  # unpacks as (mean (B, Ta, Da), std (Da,))
    assert mean.shape == (4, 2, 2) and torch.equal(s, model.std())
    # hand-computed per-element log-density, then reduced over the executed step only
    z = (actions - mean) / std
    elem = -0.5 * z**2 - std.log() - 0.5 * math.log(2 * math.pi)
    obs = {"state": state}
    torch.testing.assert_close(model.log_prob(obs, actions, reduction="none"), elem)
    torch.testing.assert_close(model.log_prob(obs, actions, act_steps=1), elem[:, :1].sum(dim=(1, 2)))
    torch.testing.assert_close(model.log_prob(obs, actions, reduction="mean", act_steps=1),
                               elem[:, 0].mean(dim=-1))
    torch.testing.assert_close(model.log_prob(obs, actions, reduction="mean"), elem.mean(dim=(1, 2)))
    with pytest.raises(DpftError, match="reduction='max'"):
        model.log_prob(obs, actions, reduction="max")
    with pytest.raises(DpftError, match="act_steps=3"):
        model.log_prob(obs, actions, act_steps=3)
    h = 0.5 * math.log(2 * math.pi * math.e) + std.log()
    torch.testing.assert_close(model.entropy(), 2 * h.sum())
    torch.testing.assert_close(model.entropy(act_steps=1), h.sum())
    torch.testing.assert_close(model.entropy(reduction="mean"), h.mean())
    # sampling: log-probs from the sampler equal log_prob of the sampled actions; N candidates per obs
    acts, none, lp = model.sample(obs, generator=torch.Generator().manual_seed(0), num_samples=3,
                                  return_log_prob=True)
    assert none is None and acts.shape == (12, 2, 2) and lp.shape == (12, 2, 2)
    rep = {"state": state.repeat_interleave(3, dim=0)}
    torch.testing.assert_close(lp, model.log_prob(rep, acts, reduction="none"))
    zz = torch.randn(12, 2, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(acts, mean.repeat_interleave(3, dim=0) + std * zz)


def test_policy_defaults_have_one_source():
    from dpft.config import DEFAULT_MLP_DIMS, PolicyConfig
    from dpft.models import policy_spec

    assert DEFAULT_MLP_DIMS == {"diffusion_mlp": [512, 512, 512], "gaussian_mlp": [256, 256, 256]}
    for cfg in (PolicyConfig(name="gaussian_mlp"), {"name": "gaussian_mlp"}, {"name": "gaussian_mlp", "mlp_dims": None}):
        spec = policy_spec(cfg)
        assert spec["mlp_dims"] == [256, 256, 256] and spec["std_min"] == 0.01 and "denoising_steps" not in spec
    model = build_policy_model(PolicyConfig(name="gaussian_mlp"), {}, 3, [], 2, 1, 1)
    assert [m.out_features for m in model.mlp.layers if isinstance(m, torch.nn.Linear)] == [256, 256, 256, 2]
    assert policy_spec(PolicyConfig())["mlp_dims"] == [512, 512, 512]
    # None disables the x0 clip (it used to fall back to 1.0); a missing key takes the default
    assert build_policy_model({"name": "diffusion_mlp", "mlp_dims": [8, 8, 8], "denoised_clip_value": None},
                              {}, 3, [], 2, 4, 1).denoised_clip_value is None
    assert build_policy_model({"name": "diffusion_mlp", "mlp_dims": [8, 8, 8]}, {}, 3, [], 2, 4,
                              1).denoised_clip_value == 1.0
    spec = policy_spec({"name": "diffusion_unet"})
    assert spec["down_dims"] == [64, 128] and "mlp_dims" not in spec and spec["ddim_steps"] is None
    torch.manual_seed(0)
    a = build_policy_model(spec, {}, 3, [], 2, 4, 1)
    torch.manual_seed(0)
    b = build_policy_model({"name": "diffusion_unet"}, {}, 3, [], 2, 4, 1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
