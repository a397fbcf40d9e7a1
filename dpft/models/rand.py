"""Random draws from an explicit ``torch.Generator`` on the generator's own device, moved to ``device``
(so a CPU generator can drive a GPU model and a saved generator state replays the draws)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def randn(shape: Sequence[int], generator: Optional[torch.Generator], device, dtype=torch.float32) -> torch.Tensor:
    """Standard normal ``shape`` drawn on the generator's device, returned on ``device``."""
    gen_device = generator.device if generator is not None else device
    out = torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype)
    return out if out.device == torch.device(device) else out.to(device)


def randint(high: int, shape: Sequence[int], generator: Optional[torch.Generator], device) -> torch.Tensor:
    """Integers in ``[0, high)`` drawn on the generator's device, returned on ``device``."""
    gen_device = generator.device if generator is not None else device
    return torch.randint(0, int(high), tuple(shape), generator=generator, device=gen_device).to(device)
