"""dpft: pretrain action-chunked diffusion and Gaussian policies and fine-tune them with RL."""
from __future__ import annotations

__version__ = "0.1.0"

from dpft.errors import DpftError  # noqa: E402


def load_policy(path, weights: str = "ema", device: str = "cpu", verify=None):
    """Rebuild a policy from a run directory or checkpoint directory alone (see :mod:`dpft.policy`); ``verify=False``
    loads files that fail their checksums anyway, warning about each."""
    from dpft.policy import load_policy as _load

    return _load(path, weights=weights, device=device, verify=verify)


__all__ = ["__version__", "DpftError", "load_policy"]
