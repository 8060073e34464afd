"""kernels.gelu_and_mul against its torch oracle and GeluGatedMLP's expression (Triton interpreter).

float32 agrees within 1e-6 (a tanh one ulp off torch's moves gelu by |gate| 3e-8, times up).
float16: the gelu is equal or one ulp apart, so gelu * up (rounded again) is within two ulps, and
equal for all but a fraction of a percent. Outputs start NaN.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pdserve.kernels.gelu_and_mul import gelu_and_mul, gelu_and_mul_ref
from tests.helpers.kernel_checks import assert_matches_ref

DTYPES = [torch.float32, torch.float16]


def _assert_within_ulps(got: torch.Tensor, want: torch.Tensor, ulps: int) -> None:
    """float16: each element equal, or at most `ulps` representable values away with the same sign."""
    apart = (got.view(torch.int16).int() - want.view(torch.int16).int()).abs()
    assert ((got == want) | ((apart <= ulps) & (got.sign() == want.sign()))).all()


@pytest.mark.parametrize("tokens,inter", [(1, 96), (9, 1000), (37, 1408), (2, 2049)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_and_mul(tokens, inter, dtype):
    gen = torch.Generator().manual_seed(tokens * 3 + inter)
    # A row slice of a wider buffer: only its own gate/up columns are read.
    wide = (2 * torch.randn(tokens, 2 * inter + 40, generator=gen)).to(dtype)
    x = wide[:, 20 : 20 + 2 * inter]
    out = torch.full((tokens, inter), float("nan"), dtype=dtype)
    assert gelu_and_mul(x, out=out) is out
    want = F.gelu(x[:, :inter], approximate="tanh") * x[:, inter:]  # GeluGatedMLP's expression
    assert torch.equal(gelu_and_mul_ref(x), want)
    assert_matches_ref(out, want)  # float32: rtol and atol 1e-6
    if dtype == torch.float16:
        _assert_within_ulps(out, want, 2)
        assert (out != want).float().mean().item() < 0.005
        gate_and_ones = torch.cat([x[:, :inter], torch.ones_like(x[:, inter:])], dim=1)
        _assert_within_ulps(gelu_and_mul(gate_and_ones), F.gelu(x[:, :inter], approximate="tanh"), 1)


def test_far_tails():
    """gelu of a large negative gate is -0 or a few ulps of 1 times gate; of a large positive, gate."""
    gate = torch.tensor([-30.0, -12.0, -6.0, -5.2, -4.0, -1e-3, 0.0, 1e-3, 4.0, 12.0, 30.0])
    x = torch.cat([gate, torch.full_like(gate, 3.0)])[None]
    assert_matches_ref(gelu_and_mul(x), gelu_and_mul_ref(x))
