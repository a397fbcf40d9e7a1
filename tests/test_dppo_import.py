"""Issue 19 item 6: DPPO's DiffusionMLP as a policy option (policy.mlp_arch=dppo) and `dpft import-dppo`.

The reference network below is a line-by-line re-implementation of DPPO's model/common/mlp.py (MLP, ResidualMLP,
TwoLayerPreActivationResNetLinear), model/diffusion/modules.py (SinusoidalPosEmb) and
model/diffusion/mlp_diffusion.py (DiffusionMLP) at irom-princeton/dppo cc7234a, written for this test."""
from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from dpft.errors import DpftError

_ACT = {"ReLU": nn.ReLU, "Mish": nn.Mish, "Identity": nn.Identity}


class RefSinusoidalPosEmb(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        half_dim = self.dim // 2
        emb = math.log(10000) / (half_dim - 1)
        emb = torch.exp(torch.arange(half_dim, device=x.device) * -emb)
        emb = x[:, None] * emb[None, :]
        return torch.cat((emb.sin(), emb.cos()), dim=-1)


class RefMLP(nn.Module):
    def __init__(self, dim_list, activation_type="Tanh", out_activation_type="Identity", use_layernorm=False):
        super().__init__()
        self.moduleList = nn.ModuleList()
        num_layer = len(dim_list) - 1
        for idx in range(num_layer):
            layers = [("linear_1", nn.Linear(dim_list[idx], dim_list[idx + 1]))]
            if use_layernorm and idx < num_layer - 1:
                layers.append(("norm_1", nn.LayerNorm(dim_list[idx + 1])))
            act = _ACT[activation_type]() if idx != num_layer - 1 else _ACT[out_activation_type]()
            layers.append(("act_1", act))
            self.moduleList.append(nn.Sequential(OrderedDict(layers)))

    def forward(self, x):
        for m in self.moduleList:
            x = m(x)
        return x


class RefBlock(nn.Module):
    def __init__(self, hidden_dim, activation_type="Mish", use_layernorm=False):
        super().__init__()
        self.l1 = nn.Linear(hidden_dim, hidden_dim)
        self.l2 = nn.Linear(hidden_dim, hidden_dim)
        self.act = _ACT[activation_type]()
        if use_layernorm:
            self.norm1 = nn.LayerNorm(hidden_dim, eps=1e-06)
            self.norm2 = nn.LayerNorm(hidden_dim, eps=1e-06)

    def forward(self, x):
        x_input = x
        if hasattr(self, "norm1"):
            x = self.norm1(x)
        x = self.l1(self.act(x))
        if hasattr(self, "norm2"):
            x = self.norm2(x)
        x = self.l2(self.act(x))
        return x + x_input


class RefResidualMLP(nn.Module):
    def __init__(self, dim_list, activation_type="Mish", out_activation_type="Identity", use_layernorm=False):
        super().__init__()
        hidden_dim = dim_list[1]
        num_hidden_layers = len(dim_list) - 3
        assert num_hidden_layers % 2 == 0
        self.layers = nn.ModuleList([nn.Linear(dim_list[0], hidden_dim)])
        self.layers.extend([RefBlock(hidden_dim, activation_type, use_layernorm)
                            for _ in range(1, num_hidden_layers, 2)])
        self.layers.append(nn.Linear(hidden_dim, dim_list[-1]))
        self.layers.append(_ACT[out_activation_type]())

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class RefDiffusionMLP(nn.Module):
    def __init__(self, action_dim, horizon_steps, cond_dim, time_dim=16, mlp_dims=(256, 256),
                 activation_type="Mish", use_layernorm=False, residual_style=False):
        super().__init__()
        output_dim = action_dim * horizon_steps
        self.time_embedding = nn.Sequential(RefSinusoidalPosEmb(time_dim), nn.Linear(time_dim, time_dim * 2),
                                            nn.Mish(), nn.Linear(time_dim * 2, time_dim))
        model = RefResidualMLP if residual_style else RefMLP
        input_dim = time_dim + action_dim * horizon_steps + cond_dim
        self.mlp_mean = model([input_dim] + list(mlp_dims) + [output_dim], activation_type=activation_type,
                              out_activation_type="Identity", use_layernorm=use_layernorm)
        self.time_dim = time_dim

    def forward(self, x, time, cond):
        B, Ta, Da = x.shape
        x = x.view(B, -1)
        state = cond["state"].view(B, -1)
        time = time.view(B, 1)
        time_emb = self.time_embedding(time).view(B, self.time_dim)
        x = torch.cat([x, time_emb, state], dim=-1)
        return self.mlp_mean(x).view(B, Ta, Da)


class RefDiffusionModel(nn.Module):  # DPPO's DiffusionModel holds the network as `network` (its only weights)
    def __init__(self, network):
        super().__init__()
        self.network = network


def _write_dppo(tmp_path, residual_style, activation, layer_norm, mlp_dims, obs_dim=11, action_dim=3, horizon=4,
                cond_steps=1, seed=0):
    torch.manual_seed(seed)
    net = RefDiffusionMLP(action_dim, horizon, obs_dim * cond_steps, time_dim=16, mlp_dims=mlp_dims,
                          activation_type=activation, use_layernorm=layer_norm, residual_style=residual_style)
    ema = RefDiffusionModel(net)
    model = RefDiffusionModel(RefDiffusionMLP(action_dim, horizon, obs_dim * cond_steps, time_dim=16,
                                              mlp_dims=mlp_dims, activation_type=activation,
                                              use_layernorm=layer_norm, residual_style=residual_style))
    with torch.no_grad():  # non-trivial LayerNorm weights
        for m in net.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    ckpt = tmp_path / "state_100.pt"
    torch.save({"epoch": 100, "model": model.state_dict(), "ema": ema.state_dict()}, str(ckpt))
    rng = np.random.default_rng(seed)
    lo = rng.uniform(-3, 0, obs_dim)
    norm = {"obs_min": lo, "obs_max": lo + rng.uniform(0.5, 4, obs_dim),
            "action_min": -rng.uniform(0.5, 1, action_dim), "action_max": rng.uniform(0.5, 1, action_dim)}
    npz = tmp_path / "normalization.npz"
    np.savez(str(npz), **norm)
    return net, ckpt, npz, norm


@pytest.mark.parametrize("residual_style,activation,layer_norm,mlp_dims", [
    (True, "ReLU", False, [64, 64, 64]),            # DPPO's gym configs (ReLU, residual, 3 x width)
    (True, "Mish", True, [32, 32, 32, 32, 32]),     # two residual blocks with LayerNorm (eps 1e-6)
    (False, "Mish", False, [48, 40]),               # DPPO's plain MLP
])
def test_imported_checkpoint_predicts_dppos_epsilon_and_normalizes_as_dppo(tmp_path, residual_style, activation,
                                                                            layer_norm, mlp_dims):
    import dpft
    from dpft.dppo_import import import_dppo_checkpoint

    ref, ckpt, npz, norm = _write_dppo(tmp_path, residual_style, activation, layer_norm, mlp_dims)
    ref.eval()
    out = import_dppo_checkpoint(str(ckpt), str(npz), str(tmp_path / "run"), denoising_steps=20,
                                 activation=activation.lower(), act_steps=2)
    policy = dpft.load_policy(str(tmp_path / "run"))
    assert policy.meta["policy_spec"]["mlp_arch"] == "dppo" and policy.meta["act_steps"] == 2
    assert out.endswith("step_00000000")
    net = policy.model.network
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, 3, generator=g)
    t = torch.randint(0, 20, (64,), generator=g)
    cond = torch.randn(64, 11, generator=g)
    with torch.no_grad():
        want = ref(x, t, {"state": cond.view(64, 1, 11)})
        got = net(x, t, cond)
        got_grad_path = net.mlp(torch.cat([x.reshape(64, -1), net.time_mlp(t), cond], -1)).reshape(64, 4, 3)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_grad_path, want, rtol=0, atol=1e-6)
    # normalization: DPPO's wrapper formulas on random raw inputs
    rng = np.random.default_rng(2)
    obs = rng.uniform(norm["obs_min"] - 1, norm["obs_max"] + 1, size=(100, 11))
    dppo_obs = 2 * ((obs - norm["obs_min"]) / (norm["obs_max"] - norm["obs_min"] + 1e-6) - 0.5)
    np.testing.assert_allclose(policy.normalizer.normalize("state", obs), dppo_obs, rtol=1e-5, atol=2e-6)  # float32 stats
    a = rng.uniform(-1, 1, size=(100, 3))
    dppo_a = (a + 1) / 2 * (norm["action_max"] - norm["action_min"]) + norm["action_min"]
    np.testing.assert_allclose(policy.normalizer.unnormalize("action", a), dppo_a, rtol=1e-5, atol=2e-6)


def test_dpft_layout_differs_from_dppos_by_the_output_activation(tmp_path):
    """dpft's default layout (mlp_arch=dpft) has an activation before the output layer: with DPPO's weights its
    epsilon differs, which is why the import uses mlp_arch=dppo."""
    from dpft.models.diffusion_mlp import DiffusionMLP

    dppo = DiffusionMLP(3, 4, 11, mlp_dims=[32, 32, 32], activation="mish", arch="dppo")
    dpft_net = DiffusionMLP(3, 4, 11, mlp_dims=[32, 32, 32], activation="mish", arch="dpft")
    dpft_net.load_state_dict(dppo.state_dict())
    x, t, c = torch.randn(8, 4, 3), torch.arange(8), torch.randn(8, 11)
    with torch.no_grad():
        assert not torch.allclose(dppo(x, t, c), dpft_net(x, t, c))
    with pytest.raises(DpftError, match="arch='dpp'"):
        DiffusionMLP(3, 4, 11, mlp_dims=[32, 32, 32], arch="dpp")


def test_import_refuses_pickles_and_incomplete_files(tmp_path):
    from dpft.dppo_import import import_dppo_checkpoint

    _, ckpt, npz, _ = _write_dppo(tmp_path, True, "ReLU", False, [16, 16, 16])
    evil = tmp_path / "evil.pt"
    torch.save({"model": {"network.x": torch.zeros(1)}, "ema": {"network.x": torch.zeros(1)},
                "cfg": RefSinusoidalPosEmb(4)}, str(evil))
    with pytest.raises(DpftError, match="weights_only=True"):
        import_dppo_checkpoint(str(evil), str(npz), str(tmp_path / "r1"))
    bad = tmp_path / "bad.npz"
    np.savez(str(bad), obs_min=np.zeros(11), obs_max=np.ones(11))
    with pytest.raises(DpftError, match="lacks action_min, action_max"):
        import_dppo_checkpoint(str(ckpt), str(bad), str(tmp_path / "r2"))
    wrong = tmp_path / "wrong.npz"
    np.savez(str(wrong), obs_min=np.zeros(5), obs_max=np.ones(5), action_min=-np.ones(3), action_max=np.ones(3))
    with pytest.raises(DpftError, match="11 inputs, not a multiple of the normalization file's 5"):
        import_dppo_checkpoint(str(ckpt), str(wrong), str(tmp_path / "r3"))


def test_cli_import_dppo(tmp_path, capsys):
    from dpft.cli import main

    _write_dppo(tmp_path, True, "ReLU", False, [16, 16, 16])
    rc = main(["import-dppo", "checkpoint=%s" % (tmp_path / "state_100.pt"),
               "normalization=%s" % (tmp_path / "normalization.npz"), "out=%s" % (tmp_path / "run"), "env=hopper"])
    assert rc == 0 and "mlp_arch=dppo" in capsys.readouterr().out
    import dpft

    assert dpft.load_policy(str(tmp_path / "run")).meta["env_args"]["env_name"].startswith("Hopper")
