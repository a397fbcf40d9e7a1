"""DiffusionModel: an epsilon-prediction diffusion policy over action chunks, usable as an RL policy (DPPO).

Shapes: ``B`` batch, ``Ta`` = ``horizon_steps``, ``Da`` = ``action_dim``, ``N`` sampling steps (``K`` =
``denoising_steps`` for DDPM, ``ddim_steps`` for DDIM), ``K'`` = ``ft_denoising_steps``.

Pretraining uses :meth:`DiffusionModel.loss` (MSE between the network's epsilon and the true noise at a
uniformly random training timestep). Sampling runs the reverse chain ``x^(0) = x_K ~ N(0, I)``,
``x^(i+1) ~ N(mean_i, std_i^2)`` for sampling steps ``i = 0..N-1`` (see :mod:`dpft.diffusion.schedule`
for the Gaussians); the final latent ``x^(N)``, clamped to ``[-1, 1]``, is the action chunk.

DPPO treats each denoising step as a Gaussian policy step (Ren et al. 2024). :meth:`make_finetunable`
copies the base ``network`` into a trainable ``ft_network`` that serves the last ``K'`` sampling steps and
freezes the base (the observation encoder is copied and frozen the same way when it has weights).
``sample(..., return_chain=True)`` returns the latents those steps read and write, ``(B, K'+1, Ta, Da)``,
and :meth:`chain_log_prob` / :meth:`step_log_prob` give ``log N(x^(i+1); mean_i, max(std_i, min_logprob_std))``
per element, with gradients into ``ft_network``. Exploration noise is floored by
``min_sampling_denoising_std`` at every step; ``deterministic=True`` uses DDIM with eta = 0 (std 0) or
DDPM with std floored at 1e-3 and 0 at the last step (DPPO's evaluation mode).
"""
from __future__ import annotations

import copy
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.distributions import Normal
from torch.nn import functional as F

from dpft.diffusion.schedule import DiffusionSchedule, StepIndex
from dpft.errors import DpftError
from dpft.models.mlp import check_action_chunk


def _randn(shape: Sequence[int], generator: Optional[torch.Generator], device, dtype=torch.float32) -> torch.Tensor:
    """Standard normal drawn on the generator's device (a CPU generator can drive a GPU model)."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype).to(device)


def _randint(high: int, shape: Sequence[int], generator: Optional[torch.Generator], device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.randint(0, int(high), tuple(shape), generator=generator, device=gen_device).to(device)


class Cond(NamedTuple):
    """Encoded observations for the two networks: ``base`` from ``obs_encoder`` and ``ft`` from
    ``ft_obs_encoder`` (``None`` when the fine-tuned steps share the base encoder, or when not requested).
    Each is ``(B, cond_dim)``."""

    base: Optional[torch.Tensor]
    ft: Optional[torch.Tensor]

    def select(self, index) -> "Cond":
        """Rows ``index`` of both encodings (for minibatches)."""
        return Cond(
            None if self.base is None else self.base[index], None if self.ft is None else self.ft[index]
        )


CondLike = Union[torch.Tensor, Cond]


class DiffusionModel(nn.Module):
    """Diffusion policy over action chunks with DPPO's fine-tuning hooks.

    Args:
        network: epsilon network ``(x (B,Ta,Da), t (B,), cond (B,cond_dim)) -> (B,Ta,Da)``
            (:class:`~dpft.models.DiffusionMLP` or :class:`~dpft.models.ConditionalUnet1D`).
        obs_encoder: observation dict -> ``(B, cond_dim)`` (:class:`~dpft.models.ObsEncoder`).
        horizon_steps: ``Ta``.
        action_dim: ``Da``.
        denoising_steps: ``K``, training timesteps (DPPO: 20 for DDPM, 100 when sampling with DDIM).
        use_ddim: sample with DDIM over ``ddim_steps`` steps instead of all ``K`` DDPM steps.
        ddim_steps: DDIM sampling steps (DPPO fine-tunes with 5).
        ft_denoising_steps: ``K'`` > 0 calls :meth:`make_finetunable` (to rebuild a fine-tuned checkpoint).
        min_sampling_denoising_std: std floor of every stochastic sampling step (DPPO: 0.1; 0.04 furniture).
        min_logprob_denoising_std: std floor inside log-probs (DPPO: 0.1).
        randn_clip_value: per-step standard-normal noise clipped to this magnitude (DPPO fine-tuning: 3).
        denoised_clip_value: ``x0_hat`` clipped to this magnitude (1.0; ``None`` disables).
        ddim_eta: DDIM eta of stochastic sampling and log-probs (1.0 = DDPM-like noise).
    """

    def __init__(
        self,
        network: nn.Module,
        obs_encoder: nn.Module,
        horizon_steps: int,
        action_dim: int,
        denoising_steps: int = 20,
        use_ddim: bool = False,
        ddim_steps: Optional[int] = None,
        ft_denoising_steps: int = 0,
        min_sampling_denoising_std: float = 0.1,
        min_logprob_denoising_std: float = 0.1,
        randn_clip_value: float = 10.0,
        denoised_clip_value: Optional[float] = 1.0,
        ddim_eta: float = 1.0,
    ):
        super().__init__()
        if int(horizon_steps) < 1 or int(action_dim) < 1:
            raise DpftError(
                "DiffusionModel needs horizon_steps >= 1 and action_dim >= 1, got {} and {}.".format(
                    horizon_steps, action_dim
                )
            )
        for name, value in (
            ("min_sampling_denoising_std", min_sampling_denoising_std),
            ("min_logprob_denoising_std", min_logprob_denoising_std),
            ("ddim_eta", ddim_eta),
        ):
            if float(value) < 0:
                raise DpftError("{} must be >= 0, got {}.".format(name, value))
        if float(randn_clip_value) <= 0:
            raise DpftError("randn_clip_value must be > 0, got {}.".format(randn_clip_value))
        if denoised_clip_value is not None and float(denoised_clip_value) <= 0:
            raise DpftError("denoised_clip_value must be > 0 or None, got {}.".format(denoised_clip_value))
        net_cond = getattr(network, "cond_dim", None)
        enc_cond = getattr(obs_encoder, "cond_dim", None)
        if net_cond is not None and enc_cond is not None and int(net_cond) != int(enc_cond):
            raise DpftError(
                "The denoiser expects cond_dim = {} but the observation encoder produces {}.".format(net_cond, enc_cond)
            )
        if hasattr(network, "check_horizon"):
            network.check_horizon(int(horizon_steps))
        self.network = network
        self.obs_encoder = obs_encoder
        self.horizon_steps = int(horizon_steps)
        self.action_dim = int(action_dim)
        self.schedule = DiffusionSchedule(denoising_steps, use_ddim=use_ddim, ddim_steps=ddim_steps)
        self.denoising_steps = self.schedule.num_train_timesteps
        self.use_ddim = bool(use_ddim)
        self.ddim_steps = int(ddim_steps) if use_ddim else None
        self.min_sampling_denoising_std = float(min_sampling_denoising_std)
        self.min_logprob_denoising_std = float(min_logprob_denoising_std)
        self.randn_clip_value = float(randn_clip_value)
        self.denoised_clip_value = None if denoised_clip_value is None else float(denoised_clip_value)
        self.ddim_eta = float(ddim_eta)
        self.final_action_clip_value = 1.0
        self.ft_network: Optional[nn.Module] = None
        self.ft_obs_encoder: Optional[nn.Module] = None
        self.ft_denoising_steps = 0
        if int(ft_denoising_steps) > 0:
            self.make_finetunable(int(ft_denoising_steps))
        elif int(ft_denoising_steps) < 0:
            raise DpftError("ft_denoising_steps must be >= 0, got {}.".format(ft_denoising_steps))

    # ------------------------------------------------------------------ structure
    @property
    def num_sampling_steps(self) -> int:
        """``N``: ``denoising_steps`` for DDPM, ``ddim_steps`` for DDIM."""
        return self.schedule.num_sampling_steps

    @property
    def chain_steps(self) -> int:
        """Steps covered by chains and chain log-probs: ``K'`` once fine-tunable, else all ``N``."""
        return self.ft_denoising_steps if self.ft_network is not None else self.num_sampling_steps

    def make_finetunable(self, ft_denoising_steps: int) -> None:
        """Create ``ft_network = deepcopy(network)`` for the last ``ft_denoising_steps`` sampling steps.

        The base ``network`` is frozen (``requires_grad=False``). When the observation encoder has weights,
        it is copied to ``ft_obs_encoder`` (trainable, used by the fine-tuned steps) and the base encoder is
        frozen too, so the early denoising steps stay exactly the pretrained policy. Calling it again only
        changes ``K'`` (the existing copies are kept).
        """
        n = self.num_sampling_steps
        kp = int(ft_denoising_steps)
        if not 1 <= kp <= n:
            raise DpftError(
                "ft_denoising_steps = {} must be between 1 and the number of sampling steps = {} ({}).".format(
                    kp, n, "ddim_steps" if self.use_ddim else "denoising_steps"
                )
            )
        if self.ft_network is None:
            self.ft_network = copy.deepcopy(self.network)
            self.ft_network.requires_grad_(True)
            self.network.requires_grad_(False)
            if any(True for _ in self.obs_encoder.parameters()):
                self.ft_obs_encoder = copy.deepcopy(self.obs_encoder)
                self.ft_obs_encoder.requires_grad_(True)
                self.obs_encoder.requires_grad_(False)
        self.ft_denoising_steps = kp

    def finetune_parameters(self) -> List[nn.Parameter]:
        """Trainable parameters of the fine-tuned copies (what an RL optimizer should update)."""
        if self.ft_network is None:
            raise DpftError("The model is not fine-tunable yet; call make_finetunable(ft_denoising_steps) first.")
        params = list(self.ft_network.parameters())
        if self.ft_obs_encoder is not None:
            params += list(self.ft_obs_encoder.parameters())
        return params

    # ------------------------------------------------------------------ encoding
    def encode(
        self,
        obs: Mapping[str, torch.Tensor],
        generator: Optional[torch.Generator] = None,
        augment: bool = False,
        base: bool = True,
        ft: bool = True,
    ) -> Cond:
        """Encode observations for the base and/or fine-tuned steps.

        With ``augment=True`` and a ``generator``, both encoders see the same random shifts.
        """
        state = generator.get_state() if (generator is not None and augment) else None
        need_base = base or self.ft_obs_encoder is None
        c_base = self.obs_encoder(obs, generator=generator, augment=augment) if need_base else None
        c_ft = None
        if ft and self.ft_obs_encoder is not None:
            if state is not None and need_base:
                generator.set_state(state)
            c_ft = self.ft_obs_encoder(obs, generator=generator, augment=augment)
        return Cond(c_base, c_ft)

    def _cond_for(self, cond: CondLike, use_ft: bool) -> torch.Tensor:
        if isinstance(cond, torch.Tensor):
            return cond
        if use_ft and self.ft_obs_encoder is not None:
            if cond.ft is None:
                raise DpftError("This step uses the fine-tuned encoder; encode(obs, ft=True) is needed.")
            return cond.ft
        if cond.base is None:
            raise DpftError("This step uses the base encoder; encode(obs, base=True) is needed.")
        return cond.base

    # ------------------------------------------------------------------ training
    def loss(
        self, batch: Mapping[str, object], generator: Optional[torch.Generator] = None
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Epsilon-prediction MSE on ``batch = {"obs": {...}, "actions": (B, Ta, Da)}``.

        ``t ~ U{0..K-1}``, ``noise ~ N(0, I)`` from ``generator``; images are randomly shifted when the module
        is in training mode. Returns ``(loss, {"loss": detached loss})`` (0-dim tensors; call ``float``).
        """
        if "obs" not in batch or "actions" not in batch:
            raise DpftError("A training batch needs keys 'obs' and 'actions', got {}.".format(sorted(batch)))
        x0 = batch["actions"]
        check_action_chunk(self.horizon_steps, self.action_dim, x0, "batch['actions']")
        cond = self.obs_encoder(batch["obs"], generator=generator, augment=self.training)
        b = x0.shape[0]
        t = _randint(self.denoising_steps, (b,), generator, x0.device)
        noise = _randn(x0.shape, generator, x0.device, x0.dtype)
        x_t = self.schedule.q_sample(x0, t, noise)
        eps = self.network(x_t, t, cond)
        loss = F.mse_loss(eps, noise)
        return loss, {"loss": loss.detach()}

    # ------------------------------------------------------------------ one denoising step
    def _is_ft_step(self, step: StepIndex):
        """Bool (int step) or bool tensor (tensor steps): served by ``ft_network``?"""
        first_ft = self.num_sampling_steps - self.ft_denoising_steps
        if isinstance(step, torch.Tensor):
            return step >= first_ft
        return int(step) >= first_ft

    def _predict_eps(
        self, x: torch.Tensor, step: StepIndex, cond: CondLike, use_base_network: bool, use_ft: Optional[bool]
    ) -> torch.Tensor:
        b = x.shape[0]
        if isinstance(step, torch.Tensor):
            t = self.schedule.timesteps[step]
        else:
            t = self.schedule.timesteps[int(step)].expand(b)
        if self.ft_network is None or use_base_network:
            return self.network(x, t, self._cond_for(cond, False))
        if use_ft is None:
            use_ft = self._is_ft_step(step)
            if isinstance(use_ft, torch.Tensor):
                if bool(use_ft.all()):
                    use_ft = True
                elif not bool(use_ft.any()):
                    use_ft = False
        if isinstance(use_ft, bool):
            net = self.ft_network if use_ft else self.network
            return net(x, t, self._cond_for(cond, use_ft))
        mask = use_ft  # mixed batch: route rows to their network
        c_ft, c_base = self._cond_for(cond, True), self._cond_for(cond, False)
        out = torch.empty_like(x)
        out[mask] = self.ft_network(x[mask], t[mask], c_ft[mask])
        keep = ~mask
        out[keep] = self.network(x[keep], t[keep], c_base[keep])
        return out

    def _raw_step(
        self,
        x: torch.Tensor,
        step: StepIndex,
        cond: CondLike,
        eta: float,
        use_base_network: bool = False,
        use_ft: Optional[bool] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Unfloored ``(mean, std)`` of the step, both ``(B, Ta, Da)``."""
        eps = self._predict_eps(x, step, cond, use_base_network, use_ft)
        x0 = self.schedule.predict_x0(x, eps, step)
        if self.denoised_clip_value is not None:
            x0 = x0.clamp(-self.denoised_clip_value, self.denoised_clip_value)
            if self.use_ddim:
                eps = self.schedule.eps_from_x0(x, x0, step)
        if self.use_ddim:
            mean, std = self.schedule.ddim_step(x0, eps, step, eta)
        else:
            mean, std = self.schedule.ddpm_step(x, x0, step)
        return mean, torch.broadcast_to(std, mean.shape)

    def step_distribution(
        self,
        x: torch.Tensor,
        step_index: StepIndex,
        cond: CondLike,
        deterministic: bool = False,
        use_base_network: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Sampling Gaussian ``(mean, std)`` of ``x^(i+1)`` given ``x^(i) = x (B, Ta, Da)``.

        ``step_index``: sampling step ``i`` (int, or ``(B,)`` long per sample); ``cond``: ``(B, cond_dim)``
        or :meth:`encode`'s result. Stochastic: std floored at ``min_sampling_denoising_std``.
        Deterministic: DDIM with eta = 0 (std 0); DDPM std floored at 1e-3 and 0 at the last step.
        """
        eta = 0.0 if deterministic else self.ddim_eta
        mean, std = self._raw_step(x, step_index, cond, eta, use_base_network)
        if not deterministic:
            return mean, std.clamp(min=self.min_sampling_denoising_std)
        if self.use_ddim:
            return mean, torch.zeros_like(std)
        last = self.num_sampling_steps - 1
        std = std.clamp(min=1e-3)
        if isinstance(step_index, torch.Tensor):
            is_last = (step_index == last).reshape((-1,) + (1,) * (std.dim() - 1))
            std = torch.where(is_last, torch.zeros_like(std), std)
        elif int(step_index) == last:
            std = torch.zeros_like(std)
        return mean, std

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        obs: Mapping[str, torch.Tensor],
        deterministic: bool = False,
        generator: Optional[torch.Generator] = None,
        return_chain: bool = False,
        use_base_network: bool = False,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Run the reverse chain: actions ``(B, Ta, Da)`` in [-1, 1] and optionally the chain.

        The chain holds the last ``chain_steps + 1`` latents ``(B, K'+1, Ta, Da)`` (all ``N + 1`` when the
        model is not fine-tunable); its last entry equals the returned actions. ``x_K`` and the per-step noise
        (clipped to ``randn_clip_value``) come from ``generator``. ``use_base_network`` samples the frozen
        pretrained policy.
        """
        uses_base = use_base_network or self.ft_network is None or self.ft_denoising_steps < self.num_sampling_steps
        cond = self.encode(obs, base=uses_base, ft=not use_base_network)
        ref = cond.base if cond.base is not None else cond.ft
        b = ref.shape[0]
        shape = (b, self.horizon_steps, self.action_dim)
        x = _randn(shape, generator, ref.device, ref.dtype)
        n = self.num_sampling_steps
        keep_from = n - self.chain_steps  # first stored latent index (latent i is the input of step i)
        chain = [x] if (return_chain and keep_from == 0) else []
        for i in range(n):
            mean, std = self.step_distribution(x, i, cond, deterministic, use_base_network)
            if deterministic and (self.use_ddim or i == n - 1):
                x = mean
            else:
                noise = _randn(shape, generator, ref.device, ref.dtype).clamp_(
                    -self.randn_clip_value, self.randn_clip_value
                )
                x = mean + std * noise
            if i == n - 1:
                x = x.clamp(-self.final_action_clip_value, self.final_action_clip_value)
            if return_chain and i + 1 >= keep_from:
                chain.append(x)
        return x, (torch.stack(chain, dim=1) if return_chain else None)

    # ------------------------------------------------------------------ log-probabilities
    def _logprob_std(self, std: torch.Tensor) -> torch.Tensor:
        return std.clamp(min=self.min_logprob_denoising_std)

    def chain_log_prob(
        self,
        obs: Optional[Mapping[str, torch.Tensor]],
        chain: torch.Tensor,
        cond: Optional[CondLike] = None,
    ) -> torch.Tensor:
        """Per-element ``log N(chain[:, k+1]; mean(chain[:, k]), max(std, min_logprob_denoising_std))``.

        ``chain``: ``(B, K'+1, Ta, Da)`` from :meth:`sample`; returns ``(B, K', Ta, Da)`` for the chain's steps
        (the fine-tuned ones once :meth:`make_finetunable` ran), with gradients into ``ft_network``. The
        DDIM std uses ``ddim_eta`` (the stochastic sampler's). Pass ``cond`` to skip encoding ``obs``.
        """
        kp = self.chain_steps
        want = (kp + 1, self.horizon_steps, self.action_dim)
        if chain.dim() != 4 or tuple(chain.shape[1:]) != want:
            raise DpftError(
                "chain must be (B, chain_steps + 1 = {}, horizon_steps = {}, action_dim = {}), got {}.".format(
                    want[0], want[1], want[2], tuple(chain.shape)
                )
            )
        use_ft = self.ft_network is not None
        if cond is None:
            if obs is None:
                raise DpftError("chain_log_prob needs obs or cond.")
            cond = self.encode(obs, base=not use_ft, ft=use_ft)
        b = chain.shape[0]
        c = self._cond_for(cond, use_ft).repeat_interleave(kp, dim=0)  # (B*K', cond_dim)
        x_prev = chain[:, :-1].reshape(b * kp, self.horizon_steps, self.action_dim)
        x_next = chain[:, 1:].reshape(b * kp, self.horizon_steps, self.action_dim)
        n = self.num_sampling_steps
        steps = torch.arange(n - kp, n, device=chain.device).repeat(b)  # (B*K',)
        mean, std = self._raw_step(x_prev, steps, c, self.ddim_eta, use_ft=use_ft)
        log_prob = Normal(mean, self._logprob_std(std), validate_args=False).log_prob(x_next)
        return log_prob.reshape(b, kp, self.horizon_steps, self.action_dim)

    def step_log_prob(
        self, cond: CondLike, x_k: torch.Tensor, x_next: torch.Tensor, step_indices: torch.Tensor
    ) -> torch.Tensor:
        """Log-prob ``(B, Ta, Da)`` of one chain step per sample (DPPO's subsampled PPO update).

        ``step_indices (B,)`` are positions ``k`` in the chain (``0 <= k < chain_steps``; ``x_k = chain[:, k]``,
        ``x_next = chain[:, k+1]``), i.e. sampling steps ``N - chain_steps + k``.
        """
        kp = self.chain_steps
        idx = step_indices.to(device=x_k.device, dtype=torch.long).reshape(-1)
        if idx.numel() != x_k.shape[0] or x_k.shape != x_next.shape:
            raise DpftError(
                "step_log_prob needs x_k and x_next of equal shape (B, Ta, Da) and step_indices (B,); "
                "got {}, {}, {}.".format(tuple(x_k.shape), tuple(x_next.shape), tuple(step_indices.shape))
            )
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= kp):
            raise DpftError("step_indices must lie in [0, chain_steps = {}), got {}..{}.".format(
                kp, int(idx.min()), int(idx.max())
            ))
        use_ft = self.ft_network is not None
        steps = idx + (self.num_sampling_steps - kp)
        mean, std = self._raw_step(x_k, steps, self._cond_for(cond, use_ft), self.ddim_eta, use_ft=use_ft)
        return Normal(mean, self._logprob_std(std), validate_args=False).log_prob(x_next)
