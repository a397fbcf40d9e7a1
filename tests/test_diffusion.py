"""Diffusion schedule and DiffusionModel checked against diffusers' schedulers and closed forms."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import Normal

from dpft.diffusion import DiffusionModel, DiffusionSchedule, make_ddim_scheduler, make_ddpm_scheduler
from dpft.errors import DpftError
from dpft.models import DiffusionMLP, ObsEncoder, build_policy_model

TA, DA, DO, TO = 4, 2, 3, 1


class EpsStub(nn.Module):
    """A fixed, parameter-light epsilon 'network' so steps can be compared with diffusers exactly."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.7))
        self.cond_dim = TO * DO

    def forward(self, x, t, cond):
        return self.w * x + 0.05 * t.float().reshape(-1, 1, 1) - 0.3 * cond.mean(-1).reshape(-1, 1, 1)


def _encoder():
    return ObsEncoder({}, DO, TO, [])


def _obs(b, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"state": torch.rand(b, TO, DO, generator=g) * 2 - 1}


def _stub_model(**kw):
    kw.setdefault("min_sampling_denoising_std", 0.0)
    return DiffusionModel(EpsStub(), _encoder(), TA, DA, **kw)


# ---------------------------------------------------------------- schedule vs diffusers / closed form


@pytest.mark.parametrize("k", [5, 20, 100])
def test_schedule_betas_match_cosine_formula_and_diffusers(k):
    sched = DiffusionSchedule(k)
    ref = make_ddpm_scheduler(k)
    assert torch.equal(sched.betas, ref.betas.float())
    assert torch.equal(sched.alphas_cumprod, ref.alphas_cumprod.float())

    # Independent closed form (Nichol & Dhariwal 2021), float64.
    def f(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = np.array([min(1 - f((i + 1) / k) / f(i / k), 0.999) for i in range(k)])
    np.testing.assert_allclose(sched.betas.numpy(), betas, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sched.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-5, atol=1e-7)


def test_sampling_timesteps_ddpm_and_ddim():
    ddpm = DiffusionSchedule(20)
    assert ddpm.timesteps.tolist() == list(range(19, -1, -1))
    assert ddpm.prev_timesteps.tolist() == list(range(18, -2, -1))
    ddim = DiffusionSchedule(100, use_ddim=True, ddim_steps=5)
    assert ddim.timesteps.tolist() == [80, 60, 40, 20, 0]
    assert ddim.prev_timesteps.tolist() == [60, 40, 20, 0, -1]
    assert ddim.timesteps.tolist() == make_ddim_scheduler(100, 5).timesteps.tolist()
    assert float(ddim.step_alphas_cumprod_prev[-1]) == 1.0
    with pytest.raises(DpftError, match="ddim_steps"):
        DiffusionSchedule(10, use_ddim=True, ddim_steps=11)


def test_posterior_variance_equals_diffusers_get_variance():
    sched = DiffusionSchedule(20)
    ref = make_ddpm_scheduler(20)
    for i, t in enumerate(sched.timesteps.tolist()):
        torch.testing.assert_close(sched.posterior_variance[i], ref._get_variance(t), rtol=1e-5, atol=1e-9)
    assert float(sched.posterior_variance[-1]) == 0.0
    assert float(sched.posterior_log_variance_clipped[-1]) == pytest.approx(math.log(1e-20), rel=1e-5)


# ---------------------------------------------------------------- one step vs diffusers' step()


def _x_and_out(model, step, b=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = 3.0 * torch.randn(b, TA, DA, generator=g)  # large enough that x0_hat gets clipped
    obs = _obs(b, seed)
    cond = model.obs_encoder(obs)
    t = int(model.schedule.timesteps[step])
    out = model.network(x, torch.full((b,), t, dtype=torch.long), cond)
    return x, cond, t, out


@pytest.mark.parametrize("step", [0, 5, 12, 18, 19])
def test_ddpm_step_matches_diffusers(step):
    model = _stub_model(denoising_steps=20)
    ref = make_ddpm_scheduler(20)
    x, cond, t, out = _x_and_out(model, step)
    x0_raw = model.schedule.predict_x0(x, out, step)
    assert (x0_raw.abs() > 1).any()  # the clipping path is exercised
    with torch.no_grad():
        mean, std = model.step_distribution(x, step, cond)
    prev = ref.step(out, t, x, generator=torch.Generator().manual_seed(7)).prev_sample
    if t > 0:
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(mean + std * z, prev, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(std**2, ref._get_variance(t).expand_as(std), rtol=1e-4, atol=1e-9)
    else:
        torch.testing.assert_close(mean, prev, rtol=1e-5, atol=1e-5)
        assert float(std.max()) < 1e-9  # clipped log-variance: std = 1e-10


@pytest.mark.parametrize("step", [0, 2, 4])
def test_ddim_step_matches_diffusers_eta0_and_eta1(step):
    model = _stub_model(denoising_steps=100, use_ddim=True, ddim_steps=5, ddim_eta=1.0)
    ref = make_ddim_scheduler(100, 5)
    x, cond, t, out = _x_and_out(model, step)
    assert (model.schedule.predict_x0(x, out, step).abs() > 1).any()
    with torch.no_grad():
        mean0, std0 = model.step_distribution(x, step, cond, deterministic=True)
        mean1, std1 = model.step_distribution(x, step, cond, deterministic=False)
    prev0 = ref.step(out, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    torch.testing.assert_close(mean0, prev0, rtol=1e-5, atol=1e-5)
    assert float(std0.abs().max()) == 0.0
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    prev1 = ref.step(out, t, x, eta=1.0, use_clipped_model_output=True, variance_noise=z).prev_sample
    torch.testing.assert_close(mean1 + std1 * z, prev1, rtol=1e-5, atol=1e-5)
    if step < 4:
        assert float(std1.min()) > 0.0


def test_sampling_std_floors():
    model = _stub_model(denoising_steps=10, min_sampling_denoising_std=0.1)
    x, cond, _, _ = _x_and_out(model, 0)
    with torch.no_grad():
        for i in range(10):
            _, std = model.step_distribution(x, i, cond)
            assert float(std.min()) >= 0.1 - 1e-7
            _, std_det = model.step_distribution(x, i, cond, deterministic=True)
            if i == 9:
                assert float(std_det.abs().max()) == 0.0
            else:
                assert float(std_det.min()) >= 1e-3 - 1e-9
        # per-sample step indices give the same as the scalar path
        steps = torch.tensor([0, 3, 9, 9, 5, 1])
        mean_v, std_v = model.step_distribution(x, steps, cond, deterministic=True)
        for row, i in enumerate(steps.tolist()):
            m, s = model.step_distribution(x[row : row + 1], i, cond[row : row + 1], deterministic=True)
            torch.testing.assert_close(mean_v[row : row + 1], m)
            torch.testing.assert_close(std_v[row : row + 1], s)


# ---------------------------------------------------------------- sampling and chains


@pytest.mark.parametrize("ddim", [False, True])
def test_sample_shapes_range_and_chain(ddim):
    kw = dict(denoising_steps=100, use_ddim=True, ddim_steps=5) if ddim else dict(denoising_steps=8)
    net = DiffusionMLP(DA, TA, TO * DO, mlp_dims=[32, 32, 32])
    model = DiffusionModel(net, _encoder(), TA, DA, **kw)
    n = model.num_sampling_steps
    obs = _obs(5)
    acts, chain = model.sample(obs, generator=torch.Generator().manual_seed(0), return_chain=True)
    assert acts.shape == (5, TA, DA)
    assert float(acts.abs().max()) <= 1.0
    assert chain.shape == (5, n + 1, TA, DA)
    assert torch.equal(chain[:, -1].clamp(-1, 1), acts)  # the chain is raw, only the action is clamped
    acts_d, none = model.sample(obs, deterministic=True, generator=torch.Generator().manual_seed(0))
    assert none is None and float(acts_d.abs().max()) <= 1.0
    model.make_finetunable(3)
    acts2, chain2 = model.sample(obs, generator=torch.Generator().manual_seed(0), return_chain=True)
    assert chain2.shape == (5, 4, TA, DA)
    # ft_network is an exact copy, so the same seed reproduces the pre-copy chain's tail
    torch.testing.assert_close(chain2, chain[:, n - 3 :])
    torch.testing.assert_close(acts2, acts)


def test_sampling_reproducible_with_generator():
    net = DiffusionMLP(DA, TA, TO * DO, mlp_dims=[32, 32, 32])
    model = DiffusionModel(net, _encoder(), TA, DA, denoising_steps=50, use_ddim=True, ddim_steps=5)
    obs = _obs(4)

    def run(seed, det):
        return model.sample(obs, deterministic=det, generator=torch.Generator().manual_seed(seed))[0]

    assert torch.equal(run(1, True), run(1, True))
    assert torch.equal(run(1, False), run(1, False))
    assert not torch.allclose(run(1, False), run(2, False))
    assert not torch.allclose(run(1, False), run(1, True))


def test_deterministic_ddim_given_x_k_is_the_ddim_ode():
    """Deterministic DDIM from a fixed x_K equals diffusers' eta=0 loop with clipped-model-output."""
    model = _stub_model(denoising_steps=100, use_ddim=True, ddim_steps=5)
    ref = make_ddim_scheduler(100, 5)
    obs = _obs(3)
    acts, _ = model.sample(obs, deterministic=True, generator=torch.Generator().manual_seed(4))
    x = torch.randn(3, TA, DA, generator=torch.Generator().manual_seed(4))
    cond = model.obs_encoder(obs)
    with torch.no_grad():
        for t in ref.timesteps.tolist():
            out = model.network(x, torch.full((3,), t, dtype=torch.long), cond)
            x = ref.step(out, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    torch.testing.assert_close(acts, x.clamp(-1, 1), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- log-probs


def _reference_step(model, ref, x, cond, step, use_ddim):
    """Mean and std of one stochastic step computed with diffusers (noise isolated)."""
    t = int(model.schedule.timesteps[step])
    b = x.shape[0]
    with torch.no_grad():
        out = model.network(x, torch.full((b,), t, dtype=torch.long), cond)
    if use_ddim:
        prev_t = int(model.schedule.prev_timesteps[step])
        mean = ref.step(out, t, x, eta=1.0, use_clipped_model_output=True, variance_noise=torch.zeros_like(x))
        std = ref._get_variance(t, prev_t).sqrt()
        return mean.prev_sample, std.expand_as(x)
    mean = ref.step(out, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
    if t > 0:
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
        std = ref._get_variance(t).sqrt().expand_as(x)
        mean = mean - std * z
    else:
        std = torch.zeros_like(x)
    return mean, std


@pytest.mark.parametrize("ddim", [False, True])
def test_chain_log_prob_matches_independent_normal(ddim):
    if ddim:
        model = _stub_model(denoising_steps=100, use_ddim=True, ddim_steps=5, min_sampling_denoising_std=0.1)
        ref = make_ddim_scheduler(100, 5)
    else:
        model = _stub_model(denoising_steps=10, min_sampling_denoising_std=0.1)
        ref = make_ddpm_scheduler(10)
    model.make_finetunable(3)
    obs = _obs(4)
    _, chain = model.sample(obs, generator=torch.Generator().manual_seed(5), return_chain=True)
    lp = model.chain_log_prob(obs, chain)
    assert lp.shape == (4, 3, TA, DA)
    cond = model.obs_encoder(obs)
    n = model.num_sampling_steps
    floored_somewhere = False
    for k in range(3):
        mean, std = _reference_step(model, ref, chain[:, k], cond, n - 3 + k, ddim)
        expected = Normal(mean, std.clamp(min=0.1)).log_prob(chain[:, k + 1])
        torch.testing.assert_close(lp[:, k], expected, rtol=1e-4, atol=1e-4)
        if float(std.max()) < 0.1:
            floored_somewhere = True
            assert not torch.allclose(expected, Normal(mean, std.clamp(min=1e-6)).log_prob(chain[:, k + 1]))
    assert floored_somewhere  # the min_logprob_denoising_std floor was exercised
    # one step per sample (DPPO's subsampled update) equals the full-chain entry
    k_idx = torch.tensor([2, 0, 1, 2])
    rows = torch.arange(4)
    lp_step = model.step_log_prob(model.encode(obs), chain[rows, k_idx], chain[rows, k_idx + 1], k_idx)
    torch.testing.assert_close(lp_step, lp[rows, k_idx], rtol=1e-5, atol=1e-5)
    with pytest.raises(DpftError, match="step_indices"):
        model.step_log_prob(model.encode(obs), chain[:, 0], chain[:, 1], torch.tensor([0, 1, 2, 3]))
    with pytest.raises(DpftError, match="chain"):
        model.chain_log_prob(obs, chain[:, :3])


def test_min_logprob_std_floor_value():
    model = _stub_model(denoising_steps=10, min_logprob_denoising_std=0.25)
    model.make_finetunable(1)  # the last step: raw std 1e-10, so the floor decides
    obs = _obs(3)
    _, chain = model.sample(obs, generator=torch.Generator().manual_seed(0), return_chain=True)
    lp = model.chain_log_prob(obs, chain)
    mean, _ = model.step_distribution(chain[:, 0], 9, model.encode(obs))
    diff = chain[:, 1] - mean
    expected = -0.5 * (diff / 0.25) ** 2 - math.log(0.25) - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(lp[:, 0], expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- fine-tuning structure


def test_gradients_reach_ft_network_only():
    net = DiffusionMLP(DA, TA, TO * DO, mlp_dims=[32, 32, 32])
    model = DiffusionModel(net, _encoder(), TA, DA, denoising_steps=10)
    model.make_finetunable(4)
    assert all(not p.requires_grad for p in model.network.parameters())
    assert all(p.requires_grad for p in model.ft_network.parameters())
    assert {id(p) for p in model.finetune_parameters()} == {id(p) for p in model.ft_network.parameters()}
    obs = _obs(3)
    _, chain = model.sample(obs, generator=torch.Generator().manual_seed(0), return_chain=True)
    model.chain_log_prob(obs, chain).sum().backward()
    grads = [p.grad for p in model.ft_network.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in model.network.parameters())


def test_ft_network_serves_only_the_last_steps():
    net = DiffusionMLP(DA, TA, TO * DO, mlp_dims=[32, 32, 32])
    model = DiffusionModel(net, _encoder(), TA, DA, denoising_steps=10)
    obs = _obs(3)
    _, full = model.sample(obs, generator=torch.Generator().manual_seed(0), return_chain=True)
    model.make_finetunable(4)
    with torch.no_grad():
        for p in model.ft_network.parameters():
            p.add_(0.5)
    _, chain = model.sample(obs, generator=torch.Generator().manual_seed(0), return_chain=True)
    torch.testing.assert_close(chain[:, 0], full[:, 6])  # steps 0..5 ran the frozen base
    assert not torch.allclose(chain[:, -1], full[:, -1])
    base, _ = model.sample(obs, generator=torch.Generator().manual_seed(0), use_base_network=True)
    torch.testing.assert_close(base, full[:, -1].clamp(-1, 1))
    # per-sample step indices mixing base (< 6) and fine-tuned (>= 6) steps route each row correctly
    x = chain[:, 0]
    cond = model.encode(obs)
    steps = torch.tensor([7, 2, 9])
    with torch.no_grad():
        mean_v, std_v = model.step_distribution(x, steps, cond)
        for row, i in enumerate(steps.tolist()):
            m, s = model.step_distribution(x[row : row + 1], i, cond.select(slice(row, row + 1)))
            torch.testing.assert_close(mean_v[row : row + 1], m)
            torch.testing.assert_close(std_v[row : row + 1], s)
        base_mean, _ = model.step_distribution(x, 7, cond, use_base_network=True)
    assert not torch.allclose(mean_v[0], base_mean[0])


def test_finetunable_validation_and_obs_encoder_copy():
    model = _stub_model(denoising_steps=100, use_ddim=True, ddim_steps=5)
    with pytest.raises(DpftError) as err:
        model.make_finetunable(6)
    assert "6" in str(err.value) and "5" in str(err.value) and "ddim_steps" in str(err.value)
    with pytest.raises(DpftError, match="ft_denoising_steps"):
        _stub_model(denoising_steps=10, ft_denoising_steps=11)
    enc = ObsEncoder({}, DO, TO, [], cond_mlp_dims=[8])
    net = DiffusionMLP(DA, TA, enc.cond_dim, mlp_dims=[16, 16, 16])
    model = DiffusionModel(net, enc, TA, DA, denoising_steps=6, ft_denoising_steps=2)
    assert model.ft_obs_encoder is not None
    assert all(not p.requires_grad for p in model.obs_encoder.parameters())
    obs = _obs(2)
    _, chain = model.sample(obs, generator=torch.Generator().manual_seed(0), return_chain=True)
    model.chain_log_prob(obs, chain).sum().backward()
    assert all(p.grad is not None for p in model.ft_obs_encoder.parameters())
    assert all(p.grad is None for p in model.obs_encoder.parameters())
    keys = set(model.state_dict())
    assert any(k.startswith("ft_network.") for k in keys) and not any(k.startswith("schedule.") for k in keys)


def test_unet_divisibility_error_names_both_values():
    cfg = {"name": "diffusion_unet", "down_dims": [16, 32, 64], "n_groups": 8}
    with pytest.raises(DpftError) as err:
        build_policy_model(cfg, {}, DO, [], DA, 6, TO)
    msg = str(err.value)
    assert "horizon_steps = 6" in msg and "= 4" in msg
    model = build_policy_model(cfg, {}, DO, [], DA, 8, TO)
    acts, _ = model.sample(_obs(2), generator=torch.Generator().manual_seed(0))
    assert acts.shape == (2, 8, DA)


def test_loss_rejects_bad_actions():
    model = _stub_model(denoising_steps=5)
    with pytest.raises(DpftError, match="horizon_steps=4"):
        model.loss({"obs": _obs(2), "actions": torch.zeros(2, 3, DA)})
    with pytest.raises(DpftError, match="'actions'"):
        model.loss({"obs": _obs(2)})


def test_loss_falls_on_a_learnable_mapping():
    torch.manual_seed(0)
    model = build_policy_model(
        {"name": "diffusion_mlp", "mlp_dims": [64, 64, 64], "denoising_steps": 20}, {}, DO, [], DA, TA, TO
    )
    w = torch.randn(DO, TA * DA, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    eval_gen_seed = 123

    def eval_loss():
        model.eval()
        g = torch.Generator().manual_seed(eval_gen_seed)
        s = torch.rand(512, TO, DO, generator=g) * 2 - 1
        a = torch.tanh(s.reshape(512, -1) @ w).reshape(512, TA, DA)
        with torch.no_grad():
            loss = model.loss({"obs": {"state": s}, "actions": a}, g)[0]
        model.train()
        return float(loss)

    initial = eval_loss()
    for _ in range(200):
        s = torch.rand(64, TO, DO, generator=gen) * 2 - 1
        a = torch.tanh(s.reshape(64, -1) @ w).reshape(64, TA, DA)
        loss, info = model.loss({"obs": {"state": s}, "actions": a}, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = eval_loss()
    assert final < 0.5 * initial, (initial, final)


# ---------------------------------------------------------------- RL API: fast sampler, raw chains, log-probs


def _reference_sample(model, obs, deterministic, seed):
    """The sampler written out with step_distribution (checked against diffusers above): raw chain of the
    chain steps, clamped action. The fast loop in DiffusionModel.sample must give the same bits."""
    gen = torch.Generator().manual_seed(seed)
    cond = model.encode(obs)
    b = obs["state"].shape[0]
    shape = (b, TA, DA)
    n = model.num_sampling_steps
    keep_from = n - model.chain_steps
    x = torch.randn(shape, generator=gen)
    chain = [x] if keep_from == 0 else []
    with torch.no_grad():
        for i in range(n):
            mean, std = model.step_distribution(x, i, cond, deterministic)
            if deterministic and (model.use_ddim or i == n - 1):
                x = mean
            else:
                x = mean + std * torch.randn(shape, generator=gen).clamp_(-model.randn_clip_value,
                                                                          model.randn_clip_value)
            if i + 1 >= keep_from:
                chain.append(x)
    return x.clamp(-1, 1), torch.stack(chain, dim=1)


def _wide_mlp_model(ddim, ft, cond_mlp=False, **kw):
    torch.manual_seed(0)
    enc = ObsEncoder({}, DO, TO, [], cond_mlp_dims=[8] if cond_mlp else None)
    net = DiffusionMLP(DA, TA, enc.cond_dim, mlp_dims=[32, 32, 32])
    steps = dict(denoising_steps=100, use_ddim=True, ddim_steps=5) if ddim else dict(denoising_steps=10)
    return DiffusionModel(net, enc, TA, DA, ft_denoising_steps=ft, randn_clip_value=3.0, **steps, **kw)


@pytest.mark.parametrize("ddim,ft,cond_mlp", [(False, 0, False), (False, 4, True), (True, 5, False),
                                              (True, 2, True)])
@pytest.mark.parametrize("deterministic", [False, True])
def test_fast_sampler_is_bit_identical_to_stepping(ddim, ft, cond_mlp, deterministic):
    model = _wide_mlp_model(ddim, ft, cond_mlp)
    if ft:
        with torch.no_grad():  # make the copy differ from the base, so routing matters
            for p in model.ft_network.parameters():
                p.mul_(1.3)
    obs = _obs(6)
    acts, chain = model.sample(obs, deterministic, torch.Generator().manual_seed(3), return_chain=True)
    ref_acts, ref_chain = _reference_sample(model, obs, deterministic, 3)
    assert torch.equal(acts, ref_acts) and torch.equal(chain, ref_chain)


@pytest.mark.parametrize("ddim", [False, True])
def test_sample_log_prob_equals_chain_log_prob(ddim):
    model = _wide_mlp_model(ddim, 3, cond_mlp=True, min_logprob_denoising_std=0.1)
    obs = _obs(5)
    acts, chain, lp = model.sample(obs, generator=torch.Generator().manual_seed(1), return_chain=True,
                                   return_log_prob=True)
    assert lp.shape == (5, 3, TA, DA) and chain.shape == (5, 4, TA, DA)
    torch.testing.assert_close(lp, model.chain_log_prob(obs, chain), rtol=1e-5, atol=1e-5)
    # independent value: log N(x'; mean, max(std, 0.1)) from step_distribution's mean and the raw std
    cond = model.encode(obs)
    n = model.num_sampling_steps
    with torch.no_grad():
        mean, _ = model.step_distribution(chain[:, 1], n - 2, cond)
        _, raw_std = model._raw_step(chain[:, 1], n - 2, cond, model.ddim_eta)
    expected = Normal(mean, raw_std.clamp(min=0.1)).log_prob(chain[:, 2])
    torch.testing.assert_close(lp[:, 1], expected, rtol=1e-5, atol=1e-5)
    # same draws with and without log-probs
    acts2, chain2 = model.sample(obs, generator=torch.Generator().manual_seed(1), return_chain=True)
    assert torch.equal(acts, acts2) and torch.equal(chain, chain2)
    with pytest.raises(DpftError, match="deterministic=False"):
        model.sample(obs, deterministic=True, return_log_prob=True)


class _ConstX0Stub(nn.Module):
    """eps that makes x0_hat = target + shift at every timestep (so the last DDPM step's mean is
    target + shift); ``shift`` is the parameter the PPO score is taken against."""

    def __init__(self, alphas_cumprod, target):
        super().__init__()
        self.register_buffer("abar", alphas_cumprod.clone())
        self.shift = nn.Parameter(torch.zeros(()))
        self.target = float(target)
        self.cond_dim = TO * DO

    def forward(self, x, t, cond):
        abar = self.abar[t].reshape(-1, 1, 1)
        return (x - abar.sqrt() * (self.target + self.shift)) / (1 - abar).sqrt()


def test_raw_chain_keeps_the_score_unbiased_where_clamping_would_not():
    """issue 7: with mean 0.95 and std 0.1 about 31% of elements clamp; the score of a clamped chain is
    about -2 per element, the raw chain's is 0 (within its standard error)."""
    sched = DiffusionSchedule(10)
    net = _ConstX0Stub(sched.alphas_cumprod, 0.95)
    model = DiffusionModel(net, _encoder(), TA, DA, denoising_steps=10, ft_denoising_steps=1,
                           min_sampling_denoising_std=0.1, min_logprob_denoising_std=0.1)
    b = 4000
    obs = _obs(b)
    acts, chain = model.sample(obs, generator=torch.Generator().manual_seed(0), return_chain=True)
    last = chain[:, 1]
    frac = float((last > 1).float().mean())
    assert 0.29 < frac < 0.33  # P(z > 0.5) = 0.3085
    assert float(acts.max()) == 1.0 and torch.equal(acts, last.clamp(-1, 1))

    def mean_score(x_next):
        model.zero_grad()
        lp = model.chain_log_prob(obs, torch.stack([chain[:, 0], x_next], dim=1))
        lp.sum().backward()
        return float(model.ft_network.shift.grad) / lp.numel()

    raw = mean_score(last)
    se = 10.0 / math.sqrt(b * TA * DA)  # score = z / 0.1 per element
    assert abs(raw) < 4 * se, (raw, se)
    clamped = mean_score(last.clamp(-1, 1))
    assert clamped < -1.5  # what storing the clamped latent did


def test_loss_through_ft_copy_and_t_range():
    model = _wide_mlp_model(False, 0)
    batch = {"obs": _obs(8), "actions": torch.rand(8, TA, DA) * 2 - 1}
    full, _ = model.loss(batch, torch.Generator().manual_seed(4))
    same, _ = model.loss(batch, torch.Generator().manual_seed(4), t_range=(0, 10))
    assert torch.equal(full, same)  # the default range draws exactly as pretraining did
    seen = []
    handle = model.network.time_mlp.register_forward_hook(lambda m, inp, out: seen.append(inp[0].clone()))
    model.loss(dict(batch, actions=torch.zeros(512, TA, DA), obs=_obs(512)), torch.Generator().manual_seed(0),
               t_range=(2, 5))
    handle.remove()
    assert set(seen[0].tolist()) == {2, 3, 4}
    with pytest.raises(DpftError, match="t_range"):
        model.loss(batch, t_range=(3, 3))
    with pytest.raises(DpftError, match="t_range"):
        model.loss(batch, t_range=(0, 11))
    with pytest.raises(DpftError, match="make_finetunable"):
        model.loss(batch, network="ft")
    model.make_finetunable(3)
    assert model.ft_timestep_range() == (0, 3)  # DDPM: the last K' steps are timesteps 2, 1, 0
    with pytest.raises(DpftError, match="network='ft'"):
        model.loss(batch)  # the frozen base cannot train: a clear error, not torch's
    with torch.no_grad():
        base_loss, _ = model.loss(batch, torch.Generator().manual_seed(4))
    assert torch.equal(base_loss, full)  # evaluating the frozen base still works
    loss, _ = model.loss(batch, torch.Generator().manual_seed(4), network="ft", t_range=model.ft_timestep_range())
    loss.backward()
    assert all(p.grad is not None for p in model.ft_network.parameters())
    assert all(p.grad is None for p in model.network.parameters())


def test_ft_timestep_range_ddim():
    model = _stub_model(denoising_steps=100, use_ddim=True, ddim_steps=5, ft_denoising_steps=5)
    assert model.ft_timestep_range() == (0, 81)  # timesteps 80, 60, 40, 20, 0
    model = _stub_model(denoising_steps=100, use_ddim=True, ddim_steps=5, ft_denoising_steps=2)
    assert model.ft_timestep_range() == (0, 21)  # timesteps 20, 0
    with pytest.raises(DpftError, match="make_finetunable"):
        _stub_model(denoising_steps=10).ft_timestep_range()


def test_logprob_std_floor_must_be_positive():
    with pytest.raises(DpftError, match="min_logprob_denoising_std must be > 0"):
        _stub_model(denoising_steps=100, use_ddim=True, ddim_steps=5, min_logprob_denoising_std=0.0)


def test_num_samples_and_precomputed_cond():
    model = _wide_mlp_model(True, 3, cond_mlp=True)
    obs = _obs(3)
    calls = []
    for enc in (model.obs_encoder, model.ft_obs_encoder):
        enc.register_forward_hook(lambda m, inp, out: calls.append(out.shape[0]))
    acts, chain, lp = model.sample(obs, generator=torch.Generator().manual_seed(2), return_chain=True,
                                   num_samples=4, return_log_prob=True)
    assert calls == [3, 3]  # each encoder once, on the 3 observations (not on 12 rows)
    assert acts.shape == (12, TA, DA) and chain.shape == (12, 4, TA, DA) and lp.shape == (12, 3, TA, DA)
    rep = {"state": obs["state"].repeat_interleave(4, dim=0)}  # row i*4+j = candidate j of obs i
    acts_rep, chain_rep = model.sample(rep, generator=torch.Generator().manual_seed(2), return_chain=True)
    torch.testing.assert_close(acts, acts_rep)
    torch.testing.assert_close(chain, chain_rep)
    torch.testing.assert_close(lp, model.chain_log_prob(rep, chain), rtol=1e-5, atol=1e-5)
    cond = model.encode(obs)
    acts_c, _ = model.sample(None, generator=torch.Generator().manual_seed(2), cond=cond, num_samples=4)
    assert torch.equal(acts_c, acts)
    with pytest.raises(DpftError, match="num_samples"):
        model.sample(obs, num_samples=0)


def test_cond_for_refuses_a_bare_tensor_once_the_encoder_has_a_copy():
    model = _wide_mlp_model(False, 3, cond_mlp=True)
    obs = _obs(2)
    base_only = model.encode(obs, base=True, ft=False)
    with pytest.raises(DpftError, match="Cond"):
        model.sample(None, cond=base_only.base)
    with pytest.raises(DpftError, match="ft=True"):
        model.sample(None, cond=base_only)
    with pytest.raises(DpftError, match="Cond"):
        model.step_log_prob(base_only.base, torch.zeros(2, TA, DA), torch.zeros(2, TA, DA), torch.tensor([0, 1]))
    shared = _wide_mlp_model(False, 3)  # no encoder weights: one encoding serves both networks
    c = shared.obs_encoder(obs)
    a1, _ = shared.sample(None, cond=c, generator=torch.Generator().manual_seed(0))
    a2, _ = shared.sample(obs, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a1, a2)


def test_sampler_caches_follow_weight_and_setting_changes():
    """The per-step coefficients and time embeddings are cached across calls; an in-place optimizer step,
    a state-dict load or a changed std floor must show up in the next sample exactly."""
    model = _wide_mlp_model(False, 4)
    obs = _obs(3)
    model.sample(obs, generator=torch.Generator().manual_seed(0))  # fill the caches
    opt = torch.optim.SGD(model.finetune_parameters(), lr=0.5)
    loss, _ = model.loss({"obs": obs, "actions": torch.zeros(3, TA, DA)}, torch.Generator().manual_seed(1),
                         network="ft")
    loss.backward()
    opt.step()
    for det in (False, True):
        acts, chain = model.sample(obs, det, torch.Generator().manual_seed(3), return_chain=True)
        ref_acts, ref_chain = _reference_sample(model, obs, det, 3)
        assert torch.equal(acts, ref_acts) and torch.equal(chain, ref_chain)
    other = _wide_mlp_model(False, 4)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.7)
    model.load_state_dict(other.state_dict())
    model.min_sampling_denoising_std = 0.3
    acts, chain = model.sample(obs, False, torch.Generator().manual_seed(3), return_chain=True)
    ref_acts, ref_chain = _reference_sample(model, obs, False, 3)
    assert torch.equal(acts, ref_acts) and torch.equal(chain, ref_chain)
