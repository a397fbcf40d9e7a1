r"""Noise schedule (from diffusers) and the Gaussian of each reverse (denoising) step.

Training (forward process). The betas come from diffusers' ``DDPMScheduler(num_train_timesteps=K,
beta_schedule="squaredcos_cap_v2")`` (the cosine schedule of Nichol & Dhariwal 2021, betas capped at 0.999);
``alpha_t = 1 - beta_t`` and ``abar_t = prod_{s<=t} alpha_s`` for ``t = 0..K-1``. A noised sample is

    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,   eps ~ N(0, I).

Sampling visits ``N`` timesteps ``t_0 > t_1 > ... > t_{N-1}``, indexed by the *sampling step* ``i``:
DDPM uses all of them (``N = K``: ``K-1, ..., 0``); DDIM uses diffusers' ``DDIMScheduler.set_timesteps(N)``
("leading" spacing: ``t_i = (N-1-i) * (K // N)``). Step ``i`` goes from ``t = t_i`` to
``s = t - K // N`` (``s = t - 1`` for DDPM); ``abar_s = 1`` when ``s < 0`` (diffusers'
``set_alpha_to_one=True``). Let ``a = abar_t / abar_s`` be the signal kept over this transition and
``b = 1 - a``. Both samplers first predict ``x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)``
from the network's ``eps_hat``; the caller clips ``x0_hat`` to ``[-1, 1]``.

DDPM (Ho et al. 2020, eq. 6-7): the posterior ``q(x_s | x_t, x_0)`` is Gaussian with

    mean = sqrt(abar_s) b / (1 - abar_t) * x_0  +  sqrt(a) (1 - abar_s) / (1 - abar_t) * x_t
    var  = b (1 - abar_s) / (1 - abar_t)                 ("fixed_small"; 0 at the last step)

and the reverse step uses it with ``x_0 = x0_hat``. Like DPPO we keep the log-variance clipped at
``log(1e-20)``, so the std of the last step is ``1e-10`` instead of 0.

DDIM (Song et al. 2021, eq. 12): with ``sigma(eta) = eta * sqrt(var)`` (the same ``var`` as above, so
``eta = 1`` is DDPM-like noise and ``eta = 0`` is deterministic),

    mean = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat,    std = sigma.

DPPO (and here) recompute ``eps_hat = (x_t - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t)`` from the clipped
``x0_hat`` first (diffusers' ``use_clipped_model_output=True``).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import nn

from dpft.errors import DpftError

StepIndex = Union[int, torch.Tensor]


def _diffusers_schedulers():
    try:
        from diffusers import DDIMScheduler, DDPMScheduler
    except ImportError as exc:  # pragma: no cover - diffusers is a core dependency
        raise DpftError(
            "dpft needs the 'diffusers' package for its noise schedules; install it with `pip install diffusers`."
        ) from exc
    return DDPMScheduler, DDIMScheduler


def make_ddpm_scheduler(denoising_steps: int):
    """The diffusers ``DDPMScheduler`` dpft trains with (cosine betas, x0 clipped to [-1, 1], epsilon)."""
    DDPMScheduler, _ = _diffusers_schedulers()
    return DDPMScheduler(
        num_train_timesteps=int(denoising_steps),
        beta_schedule="squaredcos_cap_v2",
        clip_sample=True,
        prediction_type="epsilon",
        variance_type="fixed_small",
    )


def make_ddim_scheduler(denoising_steps: int, ddim_steps: int):
    """The diffusers ``DDIMScheduler`` with the same betas, after ``set_timesteps(ddim_steps)``."""
    _, DDIMScheduler = _diffusers_schedulers()
    sched = DDIMScheduler(
        num_train_timesteps=int(denoising_steps),
        beta_schedule="squaredcos_cap_v2",
        clip_sample=True,
        prediction_type="epsilon",
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="leading",
    )
    sched.set_timesteps(int(ddim_steps))
    return sched


class DiffusionSchedule(nn.Module):
    """Training schedule plus per-sampling-step coefficients, as non-persistent buffers.

    Buffers over training timesteps ``(K,)``: ``betas``, ``alphas``, ``alphas_cumprod``,
    ``sqrt_alphas_cumprod``, ``sqrt_one_minus_alphas_cumprod``.
    Buffers over sampling steps ``(N,)``: ``timesteps``, ``prev_timesteps`` (long; -1 after the last),
    ``step_alphas_cumprod`` (abar_t), ``step_alphas_cumprod_prev`` (abar_s), ``posterior_coef_x0``,
    ``posterior_coef_xt``, ``posterior_variance``, ``posterior_log_variance_clipped``, ``ddim_sigma_eta1``
    (``sqrt(posterior_variance)``). See the module docstring for the formulas.

    Buffers are not saved in state dicts (they are rebuilt from ``denoising_steps``/``ddim_steps``).
    """

    def __init__(self, denoising_steps: int, use_ddim: bool = False, ddim_steps: Optional[int] = None):
        super().__init__()
        k = int(denoising_steps)
        if k < 1:
            raise DpftError("denoising_steps must be >= 1, got {}.".format(denoising_steps))
        ddpm = make_ddpm_scheduler(k)
        betas = ddpm.betas.to(torch.float32)
        alphas_cumprod = ddpm.alphas_cumprod.to(torch.float32)
        if use_ddim:
            if ddim_steps is None or not 1 <= int(ddim_steps) <= k:
                raise DpftError(
                    "use_ddim=True needs ddim_steps between 1 and denoising_steps = {}, got {}.".format(k, ddim_steps)
                )
            ddim = make_ddim_scheduler(k, int(ddim_steps))
            timesteps = ddim.timesteps.to(torch.long)
            # diffusers' DDIMScheduler.step rule; any negative value means "x_0" (written as -1 here)
            prev_timesteps = (timesteps - k // int(ddim_steps)).clamp(min=-1)
        else:
            timesteps = ddpm.timesteps.to(torch.long)  # K-1, ..., 0
            prev_timesteps = timesteps - 1
        abar_t = alphas_cumprod[timesteps]
        abar_s = torch.where(prev_timesteps >= 0, alphas_cumprod[prev_timesteps.clamp(min=0)], torch.ones_like(abar_t))
        a = abar_t / abar_s
        b = 1.0 - a
        var = b * (1.0 - abar_s) / (1.0 - abar_t)

        self.num_train_timesteps = k
        self.num_sampling_steps = int(timesteps.numel())
        self.use_ddim = bool(use_ddim)
        buffers = {
            "betas": betas,
            "alphas": 1.0 - betas,
            "alphas_cumprod": alphas_cumprod,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            "timesteps": timesteps,
            "prev_timesteps": prev_timesteps,
            "step_alphas_cumprod": abar_t,
            "step_alphas_cumprod_prev": abar_s,
            "posterior_coef_x0": abar_s.sqrt() * b / (1.0 - abar_t),
            "posterior_coef_xt": a.sqrt() * (1.0 - abar_s) / (1.0 - abar_t),
            "posterior_variance": var,
            "posterior_log_variance_clipped": torch.log(var.clamp(min=1e-20)),
            "ddim_sigma_eta1": var.clamp(min=0.0).sqrt(),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.contiguous(), persistent=False)

    # ----- helpers -----
    @staticmethod
    def _at(values: torch.Tensor, index: StepIndex, ndim: int) -> torch.Tensor:
        """``values[index]`` shaped to broadcast against a ``(B, ...)`` tensor with ``ndim`` dims."""
        if isinstance(index, torch.Tensor):
            return values[index].reshape((-1,) + (1,) * (ndim - 1))
        return values[int(index)]

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` for training timesteps ``t (B,)``."""
        return self._at(self.sqrt_alphas_cumprod, t, x0.dim()) * x0 + self._at(
            self.sqrt_one_minus_alphas_cumprod, t, x0.dim()
        ) * noise

    def predict_x0(self, x_t: torch.Tensor, eps: torch.Tensor, step: StepIndex) -> torch.Tensor:
        """``x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`` at sampling step(s) ``step``."""
        abar_t = self._at(self.step_alphas_cumprod, step, x_t.dim())
        return (x_t - (1.0 - abar_t).sqrt() * eps) / abar_t.sqrt()

    def eps_from_x0(self, x_t: torch.Tensor, x0: torch.Tensor, step: StepIndex) -> torch.Tensor:
        """``eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)``: the noise consistent with (x_t, x0)."""
        abar_t = self._at(self.step_alphas_cumprod, step, x_t.dim())
        return (x_t - abar_t.sqrt() * x0) / (1.0 - abar_t).sqrt()

    def ddpm_step(self, x_t: torch.Tensor, x0: torch.Tensor, step: StepIndex) -> Tuple[torch.Tensor, torch.Tensor]:
        """Posterior ``(mean, std)`` of ``x_s | x_t, x0`` (std from the clipped log-variance)."""
        n = x_t.dim()
        mean = self._at(self.posterior_coef_x0, step, n) * x0 + self._at(self.posterior_coef_xt, step, n) * x_t
        std = torch.exp(0.5 * self._at(self.posterior_log_variance_clipped, step, n))
        return mean, std

    def ddim_step(
        self, x0: torch.Tensor, eps: torch.Tensor, step: StepIndex, eta: float
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """DDIM ``(mean, std)``: ``sqrt(abar_s) x0 + sqrt(1 - abar_s - sigma^2) eps``, ``sigma = eta sigma_1``."""
        n = x0.dim()
        abar_s = self._at(self.step_alphas_cumprod_prev, step, n)
        sigma = float(eta) * self._at(self.ddim_sigma_eta1, step, n)
        direction = (1.0 - abar_s - sigma**2).clamp(min=0.0).sqrt()
        mean = abar_s.sqrt() * x0 + direction * eps
        return mean, sigma
