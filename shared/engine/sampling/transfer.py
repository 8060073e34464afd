"""Small host-side values (sampling parameters, row and token indices) to the device without
making the host wait.

`torch.tensor(values, device="cuda")` copies from pageable memory, and such a copy waits for every
kernel queued before it: under overlap scheduling that is the whole decode step in flight, so a
step that samples with temperature, top-k/p, min-p, a logit bias or min_new_tokens would lose its
overlap on the first parameter it uploads. Through pinned memory the copy is queued like a kernel
(torch's caching host allocator keeps the pinned block until the copy has read it).
"""

from __future__ import annotations

from typing import Any

import torch


def to_device(values: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` (a list, or a numpy array) as a `dtype` tensor on `device`; never syncs on CUDA."""
    host = torch.as_tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
