"""kernels.moe_combine (Triton interpreter) against its torch expressions: the k slots summed in
order and rounded once, pairs of experts outside the shard never read (their rows hold NaN here),
top-k 1 to 8, widths across the 1,024-column blocks, float32 and float16, with and without the
gated shared expert (rows of any stride, the gate a column of a wider GEMM output)."""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels.moe_combine import moe_combine, moe_combine_ref
from pdserve.kernels.shared_expert_gate import add_gated_shared_expert_ref


def _inputs(tokens: int, top_k: int, hidden: int, num_experts: int, offset: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    # global ids over three shards' worth of experts: some pairs fall outside [offset, offset + E)
    ids = torch.randint(0, 3 * num_experts, (tokens, top_k), generator=gen, dtype=torch.int32)
    ids.view(-1)[0] = offset  # at least one local pair
    if ids.numel() > 1:
        ids.view(-1)[-1] = offset + num_experts  # and one dropped
    down = torch.randn(tokens * top_k, hidden, generator=gen)
    local = ids.long().view(-1) - offset
    dropped = (local < 0) | (local >= num_experts)
    down[dropped] = float("nan")  # never written by the down GEMM: must not be read
    return down, ids, dropped


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens,top_k,hidden", [(1, 1, 64), (3, 2, 1000), (5, 8, 2048 + 16)])
def test_sum_matches_the_torch_expression(dtype, tokens, top_k, hidden):
    num_experts, offset = 4, 4
    down, ids, dropped = _inputs(tokens, top_k, hidden, num_experts, offset, seed=tokens + top_k)
    assert not dropped.all() and (dropped.any() or tokens * top_k == 1)
    got = moe_combine(down, ids, num_experts, offset, dtype)
    want = moe_combine_ref(down, ids, num_experts, offset, dtype)
    assert got.dtype == dtype and got.shape == (tokens, hidden) and not got.isnan().any()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # torch's sum of the zero-filled rows, up to its order of additions
    zeroed = torch.where(dropped[:, None], 0.0, down).view(tokens, top_k, hidden)
    torch.testing.assert_close(got, zeroed.sum(dim=1).to(dtype), rtol=torch.finfo(dtype).eps, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens,top_k,hidden", [(1, 4, 64), (4, 2, 2048 + 16)])
def test_gated_shared_expert_is_added_as_the_tail_kernel_does(dtype, tokens, top_k, hidden):
    num_experts, offset = 6, 0
    down, ids, _ = _inputs(tokens, top_k, hidden, num_experts, offset, seed=7 * tokens + hidden)
    gen = torch.Generator().manual_seed(hidden)
    shared = torch.randn(tokens, hidden + 8, generator=gen).to(dtype)[:, :hidden]  # row stride
    merged = (3 * torch.randn(tokens, 61, generator=gen)).to(dtype)  # the gate: the last column
    got = moe_combine(down, ids, num_experts, offset, dtype, shared=shared, gate_logits=merged[:, 60])
    routed = moe_combine_ref(down, ids, num_experts, offset, dtype)
    want = add_gated_shared_expert_ref(routed, shared, merged[:, 60].contiguous())
    ref = moe_combine_ref(down, ids, num_experts, offset, dtype, shared=shared, gate_logits=merged[:, 60])
    torch.testing.assert_close(ref, want, rtol=0, atol=0)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:  # kernels.shared_expert_gate's bound: sigmoid's last float32 bit may round the other way
        eps = torch.finfo(dtype).eps
        assert ((got.float() - want.float()).abs() <= 2 * eps * shared.float().abs() + 1e-3).all()
        assert (got != want).float().mean().item() < 0.01


def test_shapes_and_checks():
    down, ids, _ = _inputs(3, 2, 32, 4, 0, seed=1)
    assert moe_combine(
        torch.empty(0, 32), torch.empty(0, 2, dtype=torch.int32), 4, 0, torch.float32
    ).shape == (
        0,
        32,
    )
    with pytest.raises(AssertionError):
        moe_combine(down[:5], ids, 4, 0, torch.float32)  # not T * k rows
    with pytest.raises(AssertionError):
        moe_combine(down.half(), ids, 4, 0, torch.float16)  # down must be float32
    with pytest.raises(AssertionError):
        moe_combine(down, ids, 4, 0, torch.float32, shared=torch.randn(3, 32))  # no gate logits
