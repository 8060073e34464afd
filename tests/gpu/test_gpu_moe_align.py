"""On a CUDA GPU: kernels.moe_align's one-launch Triton sort equals its torch reference bit for bit
(the block-wide barriers between its phases are real there, not the interpreter's in-order run), over
random shapes up to fused_moe's 1,024-pair bound, on shards with dropped ids, and replayed from a
CUDA graph after new ids were copied into the captured input.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels.fused_moe import fused_moe
from pdserve.kernels.moe_align import ExpertBlocks, align_pairs_to_experts_ref, align_pairs_to_experts_triton

pytestmark = pytest.mark.gpu

DEVICE = "cuda"


def _random_ids(tokens: int, top_k: int, hi: int, gen: torch.Generator) -> torch.Tensor:
    """int32 ids in [-1, hi), repeats allowed."""
    return torch.randint(-1, hi, (tokens, top_k), generator=gen, device=DEVICE, dtype=torch.int32)


def _assert_same(got: ExpertBlocks, want: ExpertBlocks) -> None:
    assert got.block_m == want.block_m
    assert torch.equal(got.sorted_pairs, want.sorted_pairs)
    assert torch.equal(got.block_experts, want.block_experts)


@pytest.mark.parametrize("seed", range(4))
def test_random_shapes_match_ref(seed):
    """Each seed draws T*k in 1 .. 1024, E in {1, 4, 60, 256}, k in {1, 2, 4, 8}, block_m in
    {16, 32, 64} and an offset, for int32 and int64 ids."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    rng = torch.Generator().manual_seed(seed)
    for _ in range(10):
        top_k = [1, 2, 4, 8][int(torch.randint(4, (1,), generator=rng))]
        tokens = int(torch.randint(1, 1024 // top_k + 1, (1,), generator=rng))
        experts = [1, 4, 60, 256][int(torch.randint(4, (1,), generator=rng))]
        block_m = [16, 32, 64][int(torch.randint(3, (1,), generator=rng))]
        offset = int(torch.randint(0, 5, (1,), generator=rng))
        ids = _random_ids(tokens, top_k, offset + experts + 3, gen)
        for typed in (ids, ids.long()):
            want = align_pairs_to_experts_ref(typed, experts, block_m, offset)
            _assert_same(align_pairs_to_experts_triton(typed, experts, block_m, offset), want)


@pytest.mark.parametrize("tokens,top_k,experts,block_m", [(1, 4, 60, 16), (64, 8, 256, 16), (128, 8, 60, 64)])
def test_cuda_graph_replay_with_new_ids(tokens, top_k, experts, block_m):
    """Captured once, replayed after new ids were copied in (once all on one expert, once all
    dropped): the launch reads nothing back to the host and its sizes do not depend on the ids."""
    offset = 2
    gen = torch.Generator(device=DEVICE).manual_seed(tokens + experts)
    ids = _random_ids(tokens, top_k, offset + experts + 3, gen)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        align_pairs_to_experts_triton(ids, experts, block_m, offset)  # compiles outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = align_pairs_to_experts_triton(ids, experts, block_m, offset)
    for step in range(4):
        new_ids = _random_ids(tokens, top_k, offset + experts + 3, gen)
        if step == 2:
            new_ids.fill_(offset + experts - 1)
        if step == 3:
            new_ids.fill_(-1)
        ids.copy_(new_ids)
        graph.replay()
        _assert_same(captured, align_pairs_to_experts_ref(ids, experts, block_m, offset))


def test_fused_moe_takes_the_triton_sort_at_decode_sizes():
    """fused_moe's default on CUDA (the Triton sort for a decode batch) is bit-equal to the same
    layer with the torch sort forced."""
    hidden, inter, experts, top_k = 256, 128, 60, 4
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=gen, device=DEVICE) / hidden**0.5).bfloat16()
    w2 = (torch.randn(experts, hidden, inter, generator=gen, device=DEVICE) / inter**0.5).bfloat16()
    x = torch.randn(8, hidden, generator=gen, device=DEVICE).bfloat16()
    weights = torch.rand(8, top_k, generator=gen, device=DEVICE)
    ids = _random_ids(8, top_k, experts, gen)
    got = fused_moe(x, w13, w2, weights, ids)
    assert torch.equal(got, fused_moe(x, w13, w2, weights, ids, align_in_triton=False))
