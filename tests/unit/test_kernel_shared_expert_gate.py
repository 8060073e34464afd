"""kernels.shared_expert_gate (Triton interpreter) against its torch expression: float32 within
rounding, float16 rounding at the same points (a flip of sigmoid's last bit at most); rows of any
stride, the gate a column of a wider GEMM output, widths across the 1024-column blocks; the
custom op's checks."""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels.custom_ops import add_gated_shared_expert_op
from pdserve.kernels.shared_expert_gate import add_gated_shared_expert, add_gated_shared_expert_ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens,hidden", [(1, 64), (5, 1000), (3, 2048 + 16)])
def test_matches_ref(dtype, tokens, hidden):
    gen = torch.Generator().manual_seed(tokens + hidden)
    routed = torch.randn(tokens, hidden, generator=gen).to(dtype)
    shared = torch.randn(tokens, hidden + 8, generator=gen).to(dtype)[:, :hidden]  # row stride
    merged = (3 * torch.randn(tokens, 61, generator=gen)).to(dtype)
    got = add_gated_shared_expert(routed, shared, merged[:, 60])
    want = add_gated_shared_expert_ref(routed, shared, merged[:, 60].contiguous())
    assert got.dtype == dtype and got.is_contiguous() and got.shape == (tokens, hidden)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:
        eps = torch.finfo(dtype).eps  # a flipped sigmoid rounding, scaled by shared, then rounded
        assert ((got.float() - want.float()).abs() <= 2 * eps * shared.float().abs() + 1e-3).all()
        assert (got != want).float().mean().item() < 0.01


def test_custom_op_and_checks():
    routed, shared, gate = torch.randn(4, 32), torch.randn(4, 32), torch.randn(4)
    got = add_gated_shared_expert_op(routed, shared, gate)
    torch.testing.assert_close(got, routed + torch.sigmoid(gate)[:, None] * shared)
    results = torch.library.opcheck(add_gated_shared_expert_op, (routed, shared, gate))
    assert set(results.values()) == {"SUCCESS"}, results
    assert add_gated_shared_expert(torch.empty(0, 8), torch.empty(0, 8), torch.empty(0)).shape == (0, 8)
    with pytest.raises(AssertionError):
        add_gated_shared_expert(routed, shared[:, :16], gate)
    with pytest.raises(AssertionError):
        add_gated_shared_expert(routed, shared.half(), gate)
    with pytest.raises(AssertionError):
        add_gated_shared_expert(routed, shared, gate[:3])
