"""DiffusionModel: an epsilon-prediction diffusion policy over action chunks, usable as an RL policy (DPPO).

Shapes: ``B`` batch, ``Ta`` = ``horizon_steps``, ``Da`` = ``action_dim``, ``N`` sampling steps (``K`` =
``denoising_steps`` for DDPM, ``ddim_steps`` for DDIM), ``K'`` = ``ft_denoising_steps``.

Pretraining uses :meth:`DiffusionModel.loss` (MSE between the network's epsilon and the true noise at a
uniformly random training timestep). Sampling runs the reverse chain ``x^(0) = x_K ~ N(0, I)``,
``x^(i+1) ~ N(mean_i, std_i^2)`` for sampling steps ``i = 0..N-1`` (see :mod:`dpft.diffusion.schedule`
for the Gaussians); the final latent ``x^(N)``, clamped to ``[-1, 1]``, is the action chunk (the chain keeps
the raw, unclamped latents, so the densities of stored chains are exact: DPPO's convention).

DPPO treats each denoising step as a Gaussian policy step (Ren et al. 2024). :meth:`make_finetunable`
copies the base ``network`` into a trainable ``ft_network`` that serves the last ``K'`` sampling steps and
freezes the base (the observation encoder is copied and frozen the same way when it has weights).
``sample(..., return_chain=True)`` returns the latents those steps read and write, ``(B, K'+1, Ta, Da)``,
and :meth:`chain_log_prob` / :meth:`step_log_prob` give ``log N(x^(i+1); mean_i, max(std_i, min_logprob_std))``
per element, with gradients into ``ft_network``. Exploration noise is floored by
``min_sampling_denoising_std`` at every step; ``deterministic=True`` uses DDIM with eta = 0 (std 0) or
DDPM with std floored at 1e-3 and 0 at the last step (DPPO's evaluation mode).

RL hooks: ``sample(..., return_log_prob=True)`` returns the old log-probs PPO needs from the sampling pass
itself; ``sample(cond=..., num_samples=N)`` draws N candidates per observation from one encoding (IDQL);
``loss(network="ft", t_range=model.ft_timestep_range())`` trains the fine-tuned copy by imitation on the
timesteps it serves (IN-RIL). The sampling loop runs on cached per-step coefficients and time embeddings
and is bit-identical to stepping with :meth:`DiffusionModel.step_distribution` (tested).
"""
from __future__ import annotations

import copy
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F

from dpft.diffusion.schedule import DiffusionSchedule, StepIndex
from dpft.errors import DpftError
from dpft.models.gaussian import normal_log_prob as _normal_log_prob
from dpft.models.mlp import check_action_chunk
from dpft.models.rand import randint as _randint
from dpft.models.rand import randn as _randn


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
        eval_randn_clip_value: the clip of deterministic sampling (its std-1e-3 DDPM noise); None = randn_clip_value.
            RL fine-tuning sets it to the start checkpoint's clip, so that its evaluation samples exactly as
            ``dpft rollout`` of the start checkpoint does.
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
        eval_randn_clip_value: Optional[float] = None,
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
            ("ddim_eta", ddim_eta),
        ):
            if float(value) < 0:
                raise DpftError("{} must be >= 0, got {}.".format(name, value))
        if not float(min_logprob_denoising_std) > 0:
            raise DpftError(
                "min_logprob_denoising_std must be > 0 (DPPO uses 0.1), got {}: the last DDPM step and every "
                "deterministic DDIM step have std 0, so an unfloored log-probability is infinite or NaN.".format(
                    min_logprob_denoising_std
                )
            )
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
        if eval_randn_clip_value is not None and float(eval_randn_clip_value) <= 0:
            raise DpftError("eval_randn_clip_value must be > 0 or None, got {}.".format(eval_randn_clip_value))
        self.eval_randn_clip_value = None if eval_randn_clip_value is None else float(eval_randn_clip_value)
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
        """The encoding a step of the base (``use_ft=False``) or fine-tuned network reads.

        A bare tensor is accepted only while both networks share one encoder (no ``ft_obs_encoder``): once
        the encoder has a fine-tuned copy, a tensor cannot say which encoder produced it, so a :class:`Cond`
        from :meth:`encode` is required (a base encoding never stands in for the fine-tuned one).
        """
        if isinstance(cond, torch.Tensor):
            if self.ft_obs_encoder is not None:
                raise DpftError(
                    "This model has a fine-tuned observation encoder (ft_obs_encoder), so a bare conditioning "
                    "tensor is ambiguous; pass the Cond returned by model.encode(obs) instead."
                )
            return cond
        if use_ft and self.ft_obs_encoder is not None:
            if cond.ft is None:
                raise DpftError("This step uses the fine-tuned encoder; encode(obs, ft=True) is needed.")
            return cond.ft
        if cond.base is None:
            raise DpftError("This step uses the base encoder; encode(obs, base=True) is needed.")
        return cond.base

    def ft_timestep_range(self) -> Tuple[int, int]:
        """Training timesteps ``[lo, hi)`` the fine-tuned sampling steps cover (for ``loss(t_range=...)``).

        The last ``K'`` sampling steps query the network at timesteps ``t_i`` for ``i = N-K'..N-1``, from
        ``t_{N-K'}`` down to 0, so the range is ``[0, t_{N-K'} + 1)``:

        - DDPM (``t_i = K-1-i``): ``[0, K')``, exactly the timesteps the copy serves;
        - DDIM (``t_i = (N-1-i) * (K // N)``): ``[0, (K'-1) * (K // N) + 1)``; the copy is queried only at the
          multiples of ``K // N`` in it (e.g. K=100, N=5, K'=5: ``[0, 81)``, queried at 0, 20, 40, 60, 80), and
          training on the whole interval also covers the noise levels between them.

        Needs :meth:`make_finetunable` (``K' >= 1``).
        """
        if self.ft_network is None:
            raise DpftError("ft_timestep_range() needs a fine-tunable model; call make_finetunable(K') first.")
        first = self.num_sampling_steps - self.ft_denoising_steps
        return 0, int(self.schedule.timesteps[first]) + 1

    # ------------------------------------------------------------------ training
    def loss(
        self,
        batch: Mapping[str, object],
        generator: Optional[torch.Generator] = None,
        network: str = "base",
        t_range: Optional[Tuple[int, int]] = None,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Epsilon-prediction MSE on ``batch = {"obs": {...}, "actions": (B, Ta, Da)}``.

        ``t ~ U{lo..hi-1}`` (``t_range = (lo, hi)``, default ``(0, K)``), ``noise ~ N(0, I)`` from ``generator``;
        images are randomly shifted when the module is in training mode. ``network="base"`` trains ``network``
        through ``obs_encoder`` (pretraining); ``network="ft"`` trains the fine-tuned copies ``ft_network`` /
        ``ft_obs_encoder`` (the IL update of IN-RIL-style fine-tuning), typically with
        ``t_range=model.ft_timestep_range()``. With the default range the draws are those of pretraining.
        Returns ``(loss, {"loss": detached loss})`` (0-dim tensors; call ``float``).
        """
        if "obs" not in batch or "actions" not in batch:
            raise DpftError("A training batch needs keys 'obs' and 'actions', got {}.".format(sorted(batch)))
        if network not in ("base", "ft"):
            raise DpftError("loss(network={!r}): expected 'base' or 'ft'.".format(network))
        if network == "ft":
            if self.ft_network is None:
                raise DpftError("loss(network='ft') needs a fine-tunable model; call make_finetunable(K') first.")
            net = self.ft_network
            encoder = self.ft_obs_encoder if self.ft_obs_encoder is not None else self.obs_encoder
        else:
            if self.ft_network is not None and torch.is_grad_enabled():
                raise DpftError(
                    "loss(network='base') on a fine-tunable model: the base denoiser is frozen "
                    "(requires_grad=False) once make_finetunable ran, so this loss cannot be trained. Pass "
                    "network='ft' to train the fine-tuned copy, or evaluate the base under torch.no_grad()."
                )
            net, encoder = self.network, self.obs_encoder
        k = self.denoising_steps
        lo, hi = (0, k) if t_range is None else (int(t_range[0]), int(t_range[1]))
        if not 0 <= lo < hi <= k:
            raise DpftError(
                "t_range={} must satisfy 0 <= lo < hi <= denoising_steps = {} (training timesteps [lo, hi)).".format(
                    tuple(t_range), k
                )
            )
        x0 = batch["actions"]
        check_action_chunk(self.horizon_steps, self.action_dim, x0, "batch['actions']")
        cond = encoder(batch["obs"], generator=generator, augment=self.training)
        b = x0.shape[0]
        t = _randint(hi - lo, (b,), generator, x0.device)
        if lo:
            t = t + lo
        noise = _randn(x0.shape, generator, x0.device, x0.dtype)
        x_t = self.schedule.q_sample(x0, t, noise)
        eps = net(x_t, t, cond)
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
    def _sampling_plan(self, deterministic: bool, device: torch.device, dtype: torch.dtype) -> List[_StepPlan]:
        """Per-step coefficients of the sampler as 0-dim tensors on ``device`` (cached; rebuilt when a setting
        changes). Every number is computed with the same float32 tensor operations as
        :meth:`step_distribution` and :mod:`dpft.diffusion.schedule`, so the fast loop in :meth:`sample` gives
        bit-identical results to stepping with :meth:`step_distribution` (tested); a 0-dim tensor operand is
        also about twice as fast as a Python float on small batches."""
        key = (
            bool(deterministic), self.ddim_eta, self.min_sampling_denoising_std, self.min_logprob_denoising_std,
            self.num_sampling_steps, self.use_ddim, str(device), dtype,
        )
        cache = self.__dict__.setdefault("_plan_cache", {})
        plan = cache.get(key)
        if plan is not None:
            return plan
        sched = self.schedule
        n = self.num_sampling_steps
        eta = 0.0 if deterministic else self.ddim_eta
        plan = []
        for i in range(n):
            abar_t = sched.step_alphas_cumprod[i].detach().cpu()
            sx, sa = float((1.0 - abar_t).sqrt()), float(abar_t.sqrt())
            if self.use_ddim:
                abar_s = sched.step_alphas_cumprod_prev[i].detach().cpu()
                sigma1 = sched.ddim_sigma_eta1[i].detach().cpu()
                sigma = float(eta) * sigma1
                m0 = float(abar_s.sqrt())
                m1 = float((1.0 - abar_s - sigma**2).clamp(min=0.0).sqrt())
                raw_std = float(sigma)
                lp_std = float(self.ddim_eta * sigma1)  # log-probs use the stochastic sampler's eta
            else:
                m0 = float(sched.posterior_coef_x0[i].detach().cpu())
                m1 = float(sched.posterior_coef_xt[i].detach().cpu())
                raw_std = lp_std = float(torch.exp(0.5 * sched.posterior_log_variance_clipped[i].detach().cpu()))
            if not deterministic:
                std, draw = max(raw_std, self.min_sampling_denoising_std), True
            elif self.use_ddim or i == n - 1:
                std, draw = 0.0, False
            else:
                std, draw = max(raw_std, 1e-3), True
            coefs = torch.tensor([sx, sa, m0, m1, std], dtype=dtype, device=device).unbind(0)
            plan.append(_StepPlan(*coefs, draw, max(lp_std, self.min_logprob_denoising_std)))
        if len(cache) >= 8:
            cache.clear()
        cache[key] = plan
        return plan

    def _time_embeddings(self, net: nn.Module, timesteps: Sequence[torch.Tensor]) -> Optional[List[torch.Tensor]]:
        """``net.time_embedding(t_i)`` for every sampling step, cached across calls (the embedding depends only
        on the step, the batch size and the weights; the cache is keyed by the parameters' version counters and
        storage, so an optimizer step or a state-dict load recomputes it). None when ``net`` has no
        ``time_embedding`` (the UNet)."""
        embed = getattr(net, "time_embedding", None)
        if embed is None:
            return None
        params = list(getattr(net, "time_mlp", net).parameters())
        version = tuple((p._version, p.data_ptr()) for p in params)
        ref = timesteps[0]
        key = (id(net), ref.shape[0], str(ref.device), len(timesteps))
        cache = self.__dict__.setdefault("_temb_cache", {})
        hit = cache.get(key)
        if hit is not None and hit[0] == version:
            return hit[1]
        embs = [embed(t) for t in timesteps]
        if len(cache) >= 8:
            cache.clear()
        cache[key] = (version, embs)
        return embs

    @torch.no_grad()
    def sample(
        self,
        obs: Optional[Mapping[str, torch.Tensor]],
        deterministic: bool = False,
        generator: Optional[torch.Generator] = None,
        return_chain: bool = False,
        use_base_network: bool = False,
        cond: Optional[CondLike] = None,
        num_samples: int = 1,
        return_log_prob: bool = False,
    ):
        """Run the reverse chain: actions ``(B*num_samples, Ta, Da)`` clamped to [-1, 1], optionally the chain
        and the chain's log-probs.

        Args:
            obs: observation dict ``(B, To, ...)`` (may be ``None`` when ``cond`` is given).
            deterministic: DDIM with eta 0, or DDPM with std floored at 1e-3 and no noise at the last step.
            generator: source of ``x_K`` and of the per-step noise (clipped to ``randn_clip_value``).
            return_chain: also return the latents the chain's steps read and write, ``(B, K'+1, Ta, Da)``
                (all ``N + 1`` when the model is not fine-tunable). They are the **raw** latents: only the
                returned actions are clamped, so ``chain[:, -1]`` may leave [-1, 1] and its density is exact.
            use_base_network: sample the frozen pretrained policy (every step on ``network``).
            cond: :meth:`encode`'s output for ``obs`` (skips encoding; a bare tensor only while the encoder
                has no fine-tuned copy).
            num_samples: ``N`` candidates per observation; rows are ordered by observation (observation
                ``i``'s candidates are rows ``i*N .. i*N+N-1``), each observation is encoded once and all
                candidates run batched.
            return_log_prob: also return ``log_prob (B, K', Ta, Da)``: per element
                ``log N(chain[:, k+1]; mean_k, max(std_k, min_logprob_denoising_std))`` from the same means the
                sampler used (equal to :meth:`chain_log_prob` of the chain up to float rounding); stochastic
                sampling only.

        Returns:
            ``(actions, chain)`` with ``chain`` None unless ``return_chain``; with ``return_log_prob``,
            ``(actions, chain, log_prob)``.
        """
        if return_log_prob and deterministic:
            raise DpftError(
                "sample(return_log_prob=True) needs deterministic=False: log-probs are those of the stochastic "
                "sampler (deterministic DDIM has other means, deterministic steps have no density)."
            )
        num_samples = int(num_samples)
        if num_samples < 1:
            raise DpftError("num_samples must be >= 1, got {}.".format(num_samples))
        n = self.num_sampling_steps
        use_ft = self.ft_network is not None and not use_base_network
        first_ft = n - self.ft_denoising_steps if use_ft else n
        if cond is None:
            if obs is None:
                raise DpftError("sample() needs obs or cond.")
            cond = self.encode(obs, base=first_ft > 0, ft=use_ft)
        c_base = self._cond_for(cond, False) if first_ft > 0 else None
        c_ft = self._cond_for(cond, True) if use_ft else None
        if num_samples > 1:
            c_base = None if c_base is None else c_base.repeat_interleave(num_samples, dim=0)
            c_ft = None if c_ft is None else c_ft.repeat_interleave(num_samples, dim=0)
        ref = c_base if c_base is not None else c_ft
        b, device, dtype = ref.shape[0], ref.device, ref.dtype
        shape = (b, self.horizon_steps, self.action_dim)
        plan = self._sampling_plan(deterministic, device, dtype)
        timesteps = self.schedule.timesteps.unsqueeze(1).expand(n, b).unbind(0)
        keep_from = n - self.chain_steps  # first stored latent index (latent i is the input of step i)
        clip = self.denoised_clip_value
        rclip = self.randn_clip_value  # deterministic: the evaluation clip (RL fine-tuning keeps the checkpoint's)
        if deterministic and self.eval_randn_clip_value is not None:
            rclip = self.eval_randn_clip_value
        ddim = self.use_ddim
        chain = []  # type: List[torch.Tensor]
        diffs = []  # type: List[torch.Tensor]
        emb_base = self._time_embeddings(self.network, timesteps) if first_ft > 0 else None
        emb_ft = self._time_embeddings(self.ft_network, timesteps) if first_ft < n else None
        x = _randn(shape, generator, device, dtype)
        if return_chain and keep_from == 0:
            chain.append(x)
        for i in range(n):
            p = plan[i]
            if i >= first_ft:
                if emb_ft is None:
                    eps = self.ft_network(x, timesteps[i], c_ft)
                else:
                    eps = self.ft_network(x, timesteps[i], c_ft, t_emb=emb_ft[i])
            elif emb_base is None:
                eps = self.network(x, timesteps[i], c_base)
            else:
                eps = self.network(x, timesteps[i], c_base, t_emb=emb_base[i])
            x0 = (x - p.sx * eps) / p.sa
            if clip is not None:
                x0 = x0.clamp(-clip, clip)
            if ddim:
                if clip is not None:
                    eps = (x - p.sa * x0) / p.sx
                mean = p.m0 * x0 + p.m1 * eps
            else:
                mean = p.m0 * x0 + p.m1 * x
            if p.draw:
                noise = _randn(shape, generator, device, dtype).clamp_(-rclip, rclip)
                x = mean + p.std * noise
            else:
                x = mean
            if return_chain and i + 1 >= keep_from:
                chain.append(x)
            if return_log_prob and i >= keep_from:
                diffs.append(x - mean)
        actions = x.clamp(-self.final_action_clip_value, self.final_action_clip_value)
        chain_out = torch.stack(chain, dim=1) if return_chain else None
        if not return_log_prob:
            return actions, chain_out
        lp_std = torch.tensor([p.lp_std for p in plan[keep_from:]], device=device, dtype=dtype)
        log_prob = _normal_log_prob(torch.stack(diffs, dim=1), lp_std.reshape(1, -1, 1, 1))
        return actions, chain_out, log_prob

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

        ``chain``: ``(B, K'+1, Ta, Da)`` from :meth:`sample` (raw latents); returns ``(B, K', Ta, Da)`` for the
        chain's steps (the fine-tuned ones once :meth:`make_finetunable` ran), with gradients into
        ``ft_network``. The DDIM std uses ``ddim_eta`` (the stochastic sampler's). Pass ``cond`` to skip
        encoding ``obs``.
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
        c = Cond(None, c) if (use_ft and self.ft_obs_encoder is not None) else Cond(c, None)
        x_prev = chain[:, :-1].reshape(b * kp, self.horizon_steps, self.action_dim)
        x_next = chain[:, 1:].reshape(b * kp, self.horizon_steps, self.action_dim)
        n = self.num_sampling_steps
        steps = torch.arange(n - kp, n, device=chain.device).repeat(b)  # (B*K',)
        mean, std = self._raw_step(x_prev, steps, c, self.ddim_eta, use_ft=use_ft)
        log_prob = _normal_log_prob(x_next - mean, self._logprob_std(std))
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
        mean, std = self._raw_step(x_k, steps, cond, self.ddim_eta, use_ft=use_ft)
        return _normal_log_prob(x_next - mean, self._logprob_std(std))


class _StepPlan(NamedTuple):
    """One sampling step (0-dim tensors): ``x0 = (x - sx * eps) / sa``; DDPM ``mean = m0 * x0 + m1 * x``,
    DDIM ``mean = m0 * x0 + m1 * eps``; ``x' = mean + std * z`` when ``draw`` (else ``x' = mean``); ``lp_std``
    (a float) is the log-prob std (floored at ``min_logprob_denoising_std``)."""

    sx: torch.Tensor
    sa: torch.Tensor
    m0: torch.Tensor
    m1: torch.Tensor
    std: torch.Tensor
    draw: bool
    lp_std: float
