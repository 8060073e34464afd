"""kernels.rmsnorm_fp8 and kernels.silu_mul_fp8 (Triton interpreter, float32 and float16).

The claim is bit-exactness with the unfused path: the same e4m3 bits and scales as the unfused
Triton kernel's output quantized by per_token_quant_fp8. Against the torch `_ref`s (unfused refs,
then per_token_quant_fp8_ref) they agree as the unfused kernels agree with theirs: float32 to ~1e-6
before rounding, so the rare value next to an e4m3 rounding boundary may land one step away.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels.activation import silu_and_mul
from pdserve.kernels.fp8_quant import per_token_quant_fp8, per_token_quant_fp8_ref
from pdserve.kernels.rmsnorm import fused_add_rmsnorm, rmsnorm
from pdserve.kernels.rmsnorm_fp8 import (
    fused_add_rmsnorm_fp8,
    fused_add_rmsnorm_fp8_ref,
    rmsnorm_fp8,
    rmsnorm_fp8_ref,
)
from pdserve.kernels.silu_mul_fp8 import silu_mul_fp8, silu_mul_fp8_ref

DTYPES = [torch.float32, torch.float16]


def _bits(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.uint8)


def assert_same_rows(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> None:
    assert got[0].dtype == torch.float8_e4m3fn and got[1].dtype == torch.float32
    assert got[0].shape == want[0].shape and got[1].shape == want[1].shape == (got[0].shape[0], 1)
    assert torch.equal(_bits(got[0]), _bits(want[0]))
    assert torch.equal(got[1], want[1])


def assert_near_ref(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Within the unfused kernels' own distance from their refs: scales to 1e-6, 99% of bits equal,
    the rest one e4m3 step (1/8 relative) away."""
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=0)
    assert (_bits(got[0]) != _bits(want[0])).float().mean().item() < 0.01
    torch.testing.assert_close(got[0].float(), want[0].float(), rtol=0.13, atol=2**-9)


def _unfused(q_of: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # what Fp8Linear does on each device: the Triton launch on CUDA, the torch ref on CPU
    got = per_token_quant_fp8(q_of)
    assert_same_rows(got, per_token_quant_fp8_ref(q_of))
    return got


@pytest.mark.parametrize("tokens,hidden", [(1, 576), (7, 4096), (33, 896), (5, 100)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_fp8_plain_and_fused(tokens, hidden, dtype):
    gen = torch.Generator().manual_seed(tokens + hidden)
    eps = 1e-5
    weight = torch.randn(hidden, generator=gen).to(dtype)
    x = (3 * torch.randn(tokens, hidden, generator=gen)).to(dtype)
    residual = (3 * torch.randn(tokens, hidden, generator=gen)).to(dtype)
    if tokens > 1:
        x[1] = 0  # a padding row: MIN_AMAX keeps its scale finite
        residual[1] = 0

    plain = rmsnorm_fp8(x, weight, eps)
    assert_same_rows(plain, _unfused(rmsnorm(x, weight, eps)))
    assert_near_ref(plain, rmsnorm_fp8_ref(x, weight, eps))

    x_before, new_residual = x.clone(), residual.clone()
    fused = fused_add_rmsnorm_fp8(x, new_residual, weight, eps)
    assert torch.equal(x, x_before)  # only read
    unfused_x, unfused_residual = fused_add_rmsnorm(x.clone(), residual.clone(), weight, eps)
    assert torch.equal(new_residual, unfused_residual)
    assert_same_rows(fused, _unfused(unfused_x))
    q, scales, summed = fused_add_rmsnorm_fp8_ref(x, residual, weight, eps)
    assert torch.equal(new_residual, summed)
    assert_near_ref(fused, (q, scales))


@pytest.mark.parametrize("tokens,inter", [(1, 1792), (3, 1000), (9, 64)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_fp8(tokens, inter, dtype):
    gen = torch.Generator().manual_seed(tokens + inter)
    wide = (4 * torch.randn(tokens, 2 * inter + 6, generator=gen)).to(dtype)
    x = wide[:, : 2 * inter]  # a row stride wider than the row
    got = silu_mul_fp8(x)
    assert_same_rows(got, _unfused(silu_and_mul(x)))
    assert_near_ref(got, silu_mul_fp8_ref(x))


def test_empty_rows_and_launcher_checks():
    weight = torch.ones(8)
    q, scales = rmsnorm_fp8(torch.randn(0, 8), weight, 1e-6)
    assert q.shape == (0, 8) and scales.shape == (0, 1)
    q, scales = silu_mul_fp8(torch.randn(0, 8))
    assert q.shape == (0, 4) and scales.shape == (0, 1)
    with pytest.raises(AssertionError):
        silu_mul_fp8(torch.randn(2, 7))
    with pytest.raises(AssertionError):
        x = torch.randn(2, 8)
        fused_add_rmsnorm_fp8(x, x, weight, 1e-6)
