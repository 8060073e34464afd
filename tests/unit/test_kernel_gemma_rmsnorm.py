"""kernels.gemma_rmsnorm against its torch oracle and GemmaRMSNorm itself (Triton interpreter).

The kernels differ from the module only in the order of the sum of squares. Inputs on a grid of
eighths make that sum exact in any order, and there the outputs are bit-equal, float32 and float16:
the rest of the arithmetic (rsqrt, the (1 + weight) scale in float32, one rounding) is the module's.
On random inputs float32 agrees to ~1e-6 and float16 to one ulp. Outputs start NaN.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels.gemma_rmsnorm import (
    gemma_fused_add_rmsnorm,
    gemma_fused_add_rmsnorm_ref,
    gemma_rmsnorm,
    gemma_rmsnorm_ref,
)
from pdserve.shared.models.gemma import GemmaRMSNorm
from tests.helpers.kernel_checks import assert_matches_ref

SHAPES = [(1, 2304), (7, 3584), (33, 100), (3, 1)]
DTYPES = [torch.float32, torch.float16]


def _module(hidden: int, dtype: torch.dtype, gen: torch.Generator) -> GemmaRMSNorm:
    norm = GemmaRMSNorm(hidden, 1e-6, dtype)
    with torch.no_grad():
        norm.weight.copy_(0.5 * torch.randn(hidden, generator=gen))  # never the neutral 0
    return norm


def _eighths(tokens: int, hidden: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Multiples of 1/8 in [-2, 2]: squares and their sums (and x + residual) are exact."""
    return (torch.randint(-16, 17, (tokens, hidden), generator=gen) / 8).to(dtype)


@pytest.mark.parametrize("tokens,hidden", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bit_equal_to_the_module_where_the_sum_is_exact(tokens, hidden, dtype):
    gen = torch.Generator().manual_seed(tokens + hidden)
    norm = _module(hidden, dtype, gen)
    x, residual = _eighths(tokens, hidden, gen, dtype), _eighths(tokens, hidden, gen, dtype)
    # A row slice of a wider buffer: any row stride.
    wide = torch.cat([x, torch.full_like(x, float("nan"))], dim=1)
    out = torch.full_like(x, float("nan"))
    assert gemma_rmsnorm(wide[:, :hidden], norm.weight, norm.eps, out=out) is out
    with torch.no_grad():
        module_plain = norm(x)
        module_norm, module_sum = norm(x, residual)
    assert torch.equal(out, module_plain) and torch.equal(out, gemma_rmsnorm_ref(x, norm.weight, norm.eps))
    x_buf, r_buf = x.clone(), residual.clone()
    got_norm, got_sum = gemma_fused_add_rmsnorm(x_buf, r_buf, norm.weight, norm.eps)
    # The in-place contract: norm(s) lands in x, s in residual.
    assert got_norm.data_ptr() == x_buf.data_ptr() and got_sum.data_ptr() == r_buf.data_ptr()
    want_norm, want_sum = gemma_fused_add_rmsnorm_ref(x, residual, norm.weight, norm.eps)
    assert torch.equal(got_sum, module_sum) and torch.equal(got_sum, want_sum)
    assert torch.equal(got_norm, module_norm) and torch.equal(got_norm, want_norm)


@pytest.mark.parametrize("tokens,hidden", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_random_inputs(tokens, hidden, dtype):
    gen = torch.Generator().manual_seed(3 * tokens + hidden)
    norm = _module(hidden, dtype, gen)
    x = (3 * torch.randn(tokens, hidden, generator=gen)).to(dtype)
    residual = torch.randn(tokens, hidden, generator=gen).to(dtype)
    with torch.no_grad():
        assert_matches_ref(gemma_rmsnorm(x, norm.weight, norm.eps), norm(x))
        module_norm, module_sum = norm(x, residual)
    assert_matches_ref(gemma_rmsnorm(x, norm.weight, norm.eps), gemma_rmsnorm_ref(x, norm.weight, norm.eps))
    got_norm, got_sum = gemma_fused_add_rmsnorm(x.clone(), residual.clone(), norm.weight, norm.eps)
    assert torch.equal(got_sum, module_sum)  # rounded like torch's add
    assert_matches_ref(got_norm, module_norm)


def test_launcher_rejects_what_it_does_not_handle():
    x, w = torch.randn(4, 16), torch.randn(16)
    assert gemma_rmsnorm(torch.randn(0, 16), w, 1e-6).shape == (0, 16)
    with pytest.raises(AssertionError):
        gemma_rmsnorm(torch.randn(16, 4).t(), w, 1e-6)  # last dim strided
    with pytest.raises(AssertionError):
        gemma_rmsnorm(x, w.half(), 1e-6)  # weight in another dtype
    with pytest.raises(AssertionError):
        gemma_rmsnorm(x.view(4, 2, 8), w[:8], 1e-6)  # [T, hidden] only
    with pytest.raises(AssertionError):
        gemma_fused_add_rmsnorm(x, x, w, 1e-6)  # the in-place outputs would overlap
