"""Diffusion schedules (from diffusers) and :class:`DiffusionModel` (loss, chain sampling, log-probs)."""
from __future__ import annotations

from dpft.diffusion.model import Cond, DiffusionModel
from dpft.diffusion.schedule import DiffusionSchedule, make_ddim_scheduler, make_ddpm_scheduler

__all__ = ["Cond", "DiffusionModel", "DiffusionSchedule", "make_ddim_scheduler", "make_ddpm_scheduler"]
