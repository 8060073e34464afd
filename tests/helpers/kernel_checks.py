"""The comparison the small kernels' CPU tests share (interpreter output against the torch `*_ref`)."""

from __future__ import annotations

import torch


def assert_matches_ref(got: torch.Tensor, want: torch.Tensor) -> None:
    """float32: within 1e-6. float16: within one ulp (1e-3 relative), and exact for 99% of elements."""
    assert got.dtype == want.dtype and got.shape == want.shape
    assert not got.isnan().any()
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        return
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    assert (got != want).float().mean().item() < 0.01
