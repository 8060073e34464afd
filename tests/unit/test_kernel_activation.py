"""kernels.activation.silu_and_mul against its torch oracle and GatedMLP's maths (Triton interpreter).

float32 agrees to ~1e-6 (exp differs in the last bits); float16 is nearly always bit-equal, at most
one ulp apart. Outputs start NaN, so columns the kernel skips fail.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pdserve.kernels.activation import silu_and_mul, silu_and_mul_ref
from pdserve.kernels.gelu_and_mul import gelu_and_mul
from pdserve.shared.models.layers import GatedMLP
from tests.helpers.kernel_checks import assert_matches_ref

DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("tokens,inter", [(1, 96), (9, 1000), (37, 1408), (300, 40), (2, 2049)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(tokens, inter, dtype):
    gen = torch.Generator().manual_seed(tokens * 3 + inter)
    x = (4 * torch.randn(tokens, 2 * inter, generator=gen)).to(dtype)
    out = torch.full((tokens, inter), float("nan"), dtype=dtype)
    assert silu_and_mul(x, out=out) is out
    assert_matches_ref(out, silu_and_mul_ref(x))
    gate, up = x[:, :inter], x[:, inter:]
    assert_matches_ref(out, F.silu(gate) * up)  # GatedMLP's expression, written out


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_strided_input(dtype):
    """A row slice of a wider buffer: only its own gate/up columns are read."""
    gen = torch.Generator().manual_seed(4)
    wide = torch.randn(7, 2 * 300 + 50, generator=gen).to(dtype)
    x = wide[:, 25 : 25 + 600]
    assert not x.is_contiguous()
    assert_matches_ref(silu_and_mul(x), silu_and_mul_ref(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_in_gated_mlp(dtype):
    """down(silu_and_mul(gate_up(x))) is the module's forward."""
    gen = torch.Generator().manual_seed(8)
    torch.manual_seed(8)
    mlp = GatedMLP(48, 200, bias=True, dtype=dtype)
    x = torch.randn(5, 48, generator=gen).to(dtype)
    with torch.no_grad():
        want = mlp(x)
        got = mlp.down_proj(silu_and_mul(mlp.gate_up_proj(x)))
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("gated", [silu_and_mul, gelu_and_mul])  # both through launch_gated
def test_empty_and_launcher_checks(gated):
    assert gated(torch.randn(0, 8)).shape == (0, 4)
    with pytest.raises(AssertionError):
        gated(torch.randn(3, 7))  # odd width
    with pytest.raises(AssertionError):
        gated(torch.randn(8, 3).t())  # last dim strided
    with pytest.raises(AssertionError):
        gated(torch.randn(3, 8), out=torch.empty(3, 4).half())
