"""kernels.rmsnorm against its torch oracle and the engine's RMSNorm module (Triton interpreter).

float32 agrees to ~1e-6 (the sum runs in another order); float16 is the same value but for a rare
last-bit difference where the float32 result sits next to a rounding boundary. Outputs start NaN.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels.rmsnorm import fused_add_rmsnorm, fused_add_rmsnorm_ref, rmsnorm, rmsnorm_ref
from pdserve.shared.models.layers import RMSNorm
from tests.helpers.kernel_checks import assert_matches_ref

SHAPES = [(1, 576), (7, 4096), (33, 896), (129, 100), (3, 1)]
DTYPES = [torch.float32, torch.float16]


def _module(hidden: int, eps: float, dtype: torch.dtype, gen: torch.Generator) -> RMSNorm:
    norm = RMSNorm(hidden, eps, dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hidden, generator=gen))  # never the all-ones default
    return norm


@pytest.mark.parametrize("tokens,hidden", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm(tokens, hidden, dtype):
    gen = torch.Generator().manual_seed(tokens + hidden)
    eps = 1e-6 if hidden % 2 else 1e-5
    norm = _module(hidden, eps, dtype, gen)
    x = (3 * torch.randn(tokens, hidden, generator=gen)).to(dtype)
    out = torch.full_like(x, float("nan"))
    assert rmsnorm(x, norm.weight, eps, out=out) is out
    assert_matches_ref(out, rmsnorm_ref(x, norm.weight, eps))
    with torch.no_grad():
        assert_matches_ref(out, norm(x))
        assert_matches_ref(rmsnorm(x, norm.weight, eps), norm(x))  # allocating form


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rmsnorm_of_strided_heads(dtype, head_dim):
    """Qwen3's q/k norm: each head of a q view into the fused qkv output."""
    gen = torch.Generator().manual_seed(head_dim)
    tokens, heads = 9, 3
    norm = _module(head_dim, 1e-6, dtype, gen)
    qkv = torch.randn(tokens, (heads + 2) * head_dim, generator=gen).to(dtype)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    assert not q.is_contiguous()
    out = torch.full(q.shape, float("nan"), dtype=dtype)
    rmsnorm(q, norm.weight, 1e-6, out=out)
    with torch.no_grad():
        assert_matches_ref(out, norm(q))
    assert_matches_ref(out, rmsnorm_ref(q, norm.weight, 1e-6))


@pytest.mark.parametrize("tokens,hidden", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rmsnorm_in_place(tokens, hidden, dtype):
    gen = torch.Generator().manual_seed(2 * tokens + hidden)
    norm = _module(hidden, 1e-5, dtype, gen)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    residual = (2 * torch.randn(tokens, hidden, generator=gen)).to(dtype)
    want_norm, want_sum = fused_add_rmsnorm_ref(x, residual, norm.weight, 1e-5)
    with torch.no_grad():
        module_norm, module_sum = norm(x, residual)
    x_buf, r_buf = x.clone(), residual.clone()
    got_norm, got_sum = fused_add_rmsnorm(x_buf, r_buf, norm.weight, 1e-5)
    # Documented in-place contract: norm(s) lands in x, s in residual.
    assert got_norm.data_ptr() == x_buf.data_ptr() and got_sum.data_ptr() == r_buf.data_ptr()
    assert torch.equal(got_sum, want_sum) and torch.equal(got_sum, module_sum)  # rounded like torch's add
    assert_matches_ref(got_norm, want_norm)
    assert_matches_ref(got_norm, module_norm)


def test_fused_add_rmsnorm_with_row_strides():
    """x and residual may be row slices of wider buffers; only their rows are written."""
    gen = torch.Generator().manual_seed(5)
    norm = _module(96, 1e-6, torch.float32, gen)
    x_wide, r_wide = torch.randn(6, 128, generator=gen), torch.randn(6, 160, generator=gen)
    x_before, r_before = x_wide.clone(), r_wide.clone()
    want_norm, want_sum = fused_add_rmsnorm_ref(x_wide[:, :96], r_wide[:, 32:128], norm.weight, 1e-6)
    fused_add_rmsnorm(x_wide[:, :96], r_wide[:, 32:128], norm.weight, 1e-6)
    assert_matches_ref(x_wide[:, :96], want_norm)
    assert torch.equal(r_wide[:, 32:128], want_sum)
    assert torch.equal(x_wide[:, 96:], x_before[:, 96:])
    assert torch.equal(r_wide[:, :32], r_before[:, :32]) and torch.equal(r_wide[:, 128:], r_before[:, 128:])


def test_thousands_of_rows():
    """One program per row: a long prefill's worth of rows, each its own statistics."""
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(24, generator=gen).half()
    x = (torch.randn(1200, 24, generator=gen) * torch.linspace(0.1, 10, 1200)[:, None]).half()
    out = torch.full_like(x, float("nan"))
    rmsnorm(x, weight, 1e-6, out=out)
    assert_matches_ref(out, rmsnorm_ref(x, weight, 1e-6))


def test_launcher_rejects_what_it_does_not_handle():
    x, w = torch.randn(4, 16), torch.randn(16)
    with pytest.raises(AssertionError):
        rmsnorm(torch.randn(16, 4).t(), w, 1e-6)  # last dim strided
    with pytest.raises(AssertionError):
        rmsnorm(x, w.half(), 1e-6)  # weight in another dtype
    with pytest.raises(AssertionError):
        rmsnorm(x, torch.randn(15), 1e-6)
    with pytest.raises(AssertionError):
        fused_add_rmsnorm(x, x, w, 1e-6)  # the in-place outputs would overlap
    with pytest.raises(AssertionError):
        fused_add_rmsnorm(x, torch.randn(4, 16).half(), w, 1e-6)
