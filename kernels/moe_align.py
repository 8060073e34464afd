"""The token-to-expert sort of the fused MoE: (token, slot) pairs grouped by local expert, each group
padded to the grouped GEMM's block of rows.

Rules:
- topk_ids `[T, k]` (any int dtype) names global experts; this shard holds experts
  [expert_offset, expert_offset + num_experts). A pair whose id falls outside (another shard's
  expert, or -1) is dropped: it appears nowhere in the result.
- Pair p = t * k + j (row-major in topk_ids). `sorted_pairs` lists the kept pairs expert by expert
  (ascending local expert, ascending p within one), each expert's run padded with the sentinel
  T * k up to a multiple of block_m; the tail past the last run is sentinel too.
- `block_experts[b]` is the local expert of rows b*block_m .. (b+1)*block_m - 1, or -1 for blocks
  past the last run: the GEMM skips those.
- Sizes depend on shapes and host ints only (never on the ids' values) and nothing is read back to
  the host: no sync, and the same launch can be captured in a CUDA graph. The bound: at most
  min(E, T*k) experts receive a pair and each pads by at most block_m - 1 rows.
- Two paths, the same result bit for bit. `align_pairs_to_experts_ref`: plain torch ops (about 35
  small launches on a GPU, no interpreter cost on CPU; the path for CPU and prefill's big sorts).
  `align_pairs_to_experts_triton`: one launch of one program (decode sizes, where each launch of a
  CUDA graph costs microseconds and this sort runs once per MoE layer per step). Its phases, ordered
  by block-wide barriers: zero the per-expert counts; count, chunk by chunk in pair order, each
  kept pair's rank within its expert (ranks within a chunk by a [CHUNK, CHUNK] comparison, across
  chunks by the running counts in scratch); pad the counts and take their running sum (run starts);
  fill sorted_pairs with the sentinel and block_experts with -1; scatter each kept pair to its
  run's start + its rank, and the pair that opens a block (rank a multiple of block_m) names that
  block's expert (every block of a run opens with a kept pair, since a run pads by < block_m rows).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

# pairs per step of the Triton path, ranked by a [CHUNK, CHUNK] comparison: 64 fits 4 warps' registers
# on sm_90 (~110 a thread, no spills; 128 spills)
_MAX_CHUNK = 64
_FILL = 1024  # rows per store while the Triton path fills its outputs


class ExpertBlocks(NamedTuple):
    """The sorted, padded pair list and the expert of each block of block_m rows."""

    sorted_pairs: torch.Tensor  # int32 [num_blocks * block_m]; T*k marks padding
    block_experts: torch.Tensor  # int32 [num_blocks]; -1 marks a block with no expert
    block_m: int


def max_padded_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Rows the sorted list needs at most, rounded up to whole blocks."""
    rows = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return (rows + block_m - 1) // block_m * block_m


def align_pairs_to_experts_ref(
    topk_ids: torch.Tensor, num_experts: int, block_m: int, expert_offset: int = 0
) -> ExpertBlocks:
    """Groups the pairs of topk_ids by local expert, padded to block_m, in torch ops; see the module
    rules (the oracle of the Triton path)."""
    _check_args(topk_ids, num_experts, block_m)
    device = topk_ids.device
    num_pairs = topk_ids.numel()
    rows = max_padded_rows(num_pairs, num_experts, block_m)
    num_blocks = rows // block_m
    local = topk_ids.reshape(-1).to(torch.int64) - expert_offset
    kept = (local >= 0) & (local < num_experts)
    # dropped pairs go to an extra bucket `num_experts` that owns no rows
    bucket = torch.where(kept, local, num_experts)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, bucket, torch.ones_like(bucket))  # bincount would sync to size its output
    # the dropped bucket sorts last, so its (unused) run cannot shift the experts' runs
    padded = (counts + block_m - 1) // block_m * block_m
    run_end = torch.cumsum(padded, 0)
    run_start = run_end - padded
    pair_start = torch.cumsum(counts, 0) - counts  # where each bucket begins in the stable sort

    order = torch.sort(bucket, stable=True).indices  # pairs by bucket, ascending p within one
    sorted_bucket = bucket[order]
    rank = torch.arange(num_pairs, device=device) - pair_start[sorted_bucket]
    # the dropped bucket writes to one spare row past the end, cut off below
    dest = torch.where(sorted_bucket < num_experts, run_start[sorted_bucket] + rank, rows)
    sorted_pairs = torch.full((rows + 1,), num_pairs, dtype=torch.int32, device=device)
    sorted_pairs.scatter_(0, dest, order.to(torch.int32))

    block_start = torch.arange(num_blocks, device=device, dtype=torch.int64) * block_m
    expert = torch.searchsorted(run_end[:num_experts], block_start, right=True)
    block_experts = torch.where(expert < num_experts, expert, -1).to(torch.int32)
    return ExpertBlocks(sorted_pairs[:rows], block_experts, block_m)


def _check_args(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> None:
    assert topk_ids.dim() == 2, f"topk_ids must be [T, k]: {tuple(topk_ids.shape)}"
    assert not topk_ids.is_floating_point(), f"topk_ids must be integers: {topk_ids.dtype}"
    assert num_experts >= 1 and block_m >= 1, (num_experts, block_m)


@triton.jit
def _local_experts(ids_ptr, pairs, num_pairs, expert_offset, num_experts):
    """(local expert of each pair as int32, -1 where dropped or past the end; kept mask)."""
    inside = pairs < num_pairs
    local = tl.load(ids_ptr + pairs, mask=inside, other=-1).to(tl.int64) - expert_offset
    kept = inside & (local >= 0) & (local < num_experts)
    return tl.where(kept, local, -1).to(tl.int32), kept


@triton.jit
def _align_kernel(
    ids_ptr,
    sorted_pairs_ptr,
    block_experts_ptr,
    scratch_ptr,
    num_pairs,
    num_experts,
    expert_offset,
    block_m,
    rows,
    num_blocks,
    EXPERTS_POW2: tl.constexpr,
    CHUNK: tl.constexpr,
    FILL: tl.constexpr,
):
    """The whole sort in one program; the module rules list its phases."""
    counts_ptr = scratch_ptr  # [EXPERTS_POW2] kept pairs per expert counted so far
    run_start_ptr = scratch_ptr + EXPERTS_POW2  # [EXPERTS_POW2]
    rank_ptr = scratch_ptr + 2 * EXPERTS_POW2  # [num_pairs] a kept pair's rank within its expert
    experts = tl.arange(0, EXPERTS_POW2)
    tl.store(counts_ptr + experts, tl.zeros([EXPERTS_POW2], dtype=tl.int32))
    tl.debug_barrier()

    offs = tl.arange(0, CHUNK)
    earlier = offs[None, :] < offs[:, None]  # [i, j]: pair j comes before pair i
    for chunk_start in range(0, num_pairs, CHUNK):
        pairs = chunk_start + offs
        local, kept = _local_experts(ids_ptr, pairs, num_pairs, expert_offset, num_experts)
        same = (local[:, None] == local[None, :]).to(tl.int32)  # dropped pairs share -1: masked below
        before = tl.sum(same * earlier.to(tl.int32), axis=1)
        in_chunk = tl.sum(same, axis=1)
        rank = tl.load(counts_ptr + local, mask=kept, other=0) + before
        tl.store(rank_ptr + pairs, rank, mask=kept)
        tl.debug_barrier()  # every pair of the chunk has read its count before the last one moves it
        tl.store(counts_ptr + local, rank + 1, mask=kept & (before == in_chunk - 1))
        tl.debug_barrier()

    # experts past num_experts count 0, so their runs are empty and start at the end
    counts = tl.load(counts_ptr + experts)
    padded = (counts + block_m - 1) // block_m * block_m
    run_end = tl.cumsum(padded, axis=0)
    tl.store(run_start_ptr + experts, run_end - padded)
    fill = tl.arange(0, FILL)
    sentinel = tl.zeros([FILL], dtype=tl.int32) + num_pairs
    no_expert = tl.full([FILL], -1, tl.int32)
    for row in range(0, rows, FILL):
        tl.store(sorted_pairs_ptr + row + fill, sentinel, mask=row + fill < rows)
    for block in range(0, num_blocks, FILL):
        tl.store(block_experts_ptr + block + fill, no_expert, mask=block + fill < num_blocks)
    tl.debug_barrier()

    for chunk_start in range(0, num_pairs, CHUNK):
        pairs = chunk_start + offs
        local, kept = _local_experts(ids_ptr, pairs, num_pairs, expert_offset, num_experts)
        rank = tl.load(rank_ptr + pairs, mask=kept, other=0)
        dest = tl.load(run_start_ptr + local, mask=kept, other=0) + rank
        tl.store(sorted_pairs_ptr + dest, pairs, mask=kept)
        tl.store(block_experts_ptr + dest // block_m, local, mask=kept & (rank % block_m == 0))


def align_pairs_to_experts_triton(
    topk_ids: torch.Tensor, num_experts: int, block_m: int, expert_offset: int = 0
) -> ExpertBlocks:
    """align_pairs_to_experts_ref in one Triton launch (one program): for decode-sized batches.
    Outputs and scratch are torch.empty (allocations, not launches); the kernel writes every element."""
    _check_args(topk_ids, num_experts, block_m)
    ids = topk_ids.reshape(-1).contiguous()
    num_pairs = ids.numel()
    rows = max_padded_rows(num_pairs, num_experts, block_m)
    num_blocks = rows // block_m
    sorted_pairs = torch.empty(rows, dtype=torch.int32, device=ids.device)
    block_experts = torch.empty(num_blocks, dtype=torch.int32, device=ids.device)
    if num_pairs == 0:
        return ExpertBlocks(sorted_pairs, block_experts, block_m)
    experts_pow2 = triton.next_power_of_2(num_experts)
    scratch = torch.empty(2 * experts_pow2 + num_pairs, dtype=torch.int32, device=ids.device)
    _align_kernel[(1,)](
        ids, sorted_pairs, block_experts, scratch,
        num_pairs, num_experts, expert_offset, block_m, rows, num_blocks,
        EXPERTS_POW2=experts_pow2,
        CHUNK=min(_MAX_CHUNK, max(16, triton.next_power_of_2(num_pairs))),
        FILL=_FILL,
        num_warps=4,
    )  # fmt: skip
    return ExpertBlocks(sorted_pairs, block_experts, block_m)
