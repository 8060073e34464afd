"""kernels.moe_align's one-launch Triton path against its torch reference (Triton interpreter): the
same sorted_pairs and block_experts bit for bit, over pair counts that cross the kernel's chunks,
expert counts from 1 to DeepSeek-V3's 256, top-k 1 to 8, the GEMM's block sizes, a shard offset with
ids outside it and -1, and the edge cases (all pairs on one expert, every pair dropped); then the
fused MoE with the Triton sort against fused_moe_ref.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels.fused_moe import fused_moe, fused_moe_ref
from pdserve.kernels.moe_align import align_pairs_to_experts_ref, align_pairs_to_experts_triton
from tests.helpers.moe_routing import random_routing


def _assert_same_blocks(ids: torch.Tensor, num_experts: int, block_m: int, offset: int) -> None:
    want = align_pairs_to_experts_ref(ids, num_experts, block_m, offset)
    got = align_pairs_to_experts_triton(ids, num_experts, block_m, offset)
    assert got.block_m == want.block_m == block_m
    assert got.sorted_pairs.dtype == got.block_experts.dtype == torch.int32
    assert torch.equal(got.sorted_pairs, want.sorted_pairs), (got.sorted_pairs, want.sorted_pairs)
    assert torch.equal(got.block_experts, want.block_experts), (got.block_experts, want.block_experts)


@pytest.mark.parametrize("block_m", [16, 32, 64])
@pytest.mark.parametrize("experts", [1, 4, 60, 256])
@pytest.mark.parametrize("top_k", [1, 2, 4, 8])
@pytest.mark.parametrize("tokens", [1, 45])
def test_matches_ref_on_a_shard(tokens, top_k, experts, block_m):
    """Experts [offset, offset + E) of a larger model: ids below, above and -1 are dropped, repeats
    across tokens (and within one) share an expert's run. 1 to 360 pairs: the kernel ranks 64 at a
    time, so the larger counts cross chunks. int64 ids (torch.topk's) for half the cases."""
    offset = 3
    gen = torch.Generator().manual_seed(tokens * 1000 + top_k * 100 + experts + block_m)
    _, ids = random_routing(tokens, top_k, -1, offset + experts + 4, gen)
    dtype = torch.int64 if (top_k + block_m // 16) % 2 else torch.int32
    _assert_same_blocks(ids.to(dtype), experts, block_m, offset)


@pytest.mark.parametrize("block_m", [16, 32, 64])
def test_all_pairs_on_one_expert(block_m):
    """One run of several blocks (and a partly padded last one); every other expert gets no block."""
    ids = torch.full((50, 4), 61, dtype=torch.int32)
    ids[7, 2] = 200  # one pair of another shard in the middle
    _assert_same_blocks(ids, 60, block_m, 10)


@pytest.mark.parametrize("fill", [-1, 9])
def test_every_pair_dropped(fill):
    """No pair is local: all rows are padding and all blocks -1 (as many as the shape bounds)."""
    ids = torch.full((21, 2), fill, dtype=torch.int64)
    _assert_same_blocks(ids, 4, 16, 5)
    blocks = align_pairs_to_experts_triton(ids, 4, 16, 5)
    assert (blocks.sorted_pairs == ids.numel()).all() and (blocks.block_experts == -1).all()


def test_empty_and_every_expert_once():
    """No pairs: empty outputs; every expert of 256 exactly once, in reverse pair order."""
    blocks = align_pairs_to_experts_triton(torch.empty(0, 8, dtype=torch.int32), 256, 16)
    assert blocks.sorted_pairs.numel() == 0 and blocks.block_experts.numel() == 0
    _assert_same_blocks(torch.arange(255, -1, -1, dtype=torch.int32).view(32, 8), 256, 16, 0)


def test_fused_moe_with_triton_sort_matches_ref():
    """The whole layer with the Triton sort forced on CPU (on a shard, ids of other shards and -1):
    the same result as the oracle, and bit-equal to the layer with the torch sort."""
    hidden, inter, experts, offset = 40, 24, 6, 2
    gen = torch.Generator().manual_seed(31)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(experts, hidden, inter, generator=gen) / inter**0.5
    x = torch.randn(13, hidden, generator=gen)
    weights, ids = random_routing(13, 4, -1, offset + experts + 2, gen)
    tiles = (16, 16, 16)
    got = fused_moe(x, w13, w2, weights, ids, expert_offset=offset, block_sizes=tiles, align_in_triton=True)
    want = fused_moe_ref(x, w13, w2, weights, ids, expert_offset=offset)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch_sorted = fused_moe(
        x, w13, w2, weights, ids, expert_offset=offset, block_sizes=tiles, align_in_triton=False
    )
    assert torch.equal(got, torch_sorted)
