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
- Plain torch ops: on a GPU they are a handful of small launches, on CPU no interpreter cost.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class ExpertBlocks(NamedTuple):
    """The sorted, padded pair list and the expert of each block of block_m rows."""

    sorted_pairs: torch.Tensor  # int32 [num_blocks * block_m]; T*k marks padding
    block_experts: torch.Tensor  # int32 [num_blocks]; -1 marks a block with no expert
    block_m: int


def max_padded_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Rows the sorted list needs at most, rounded up to whole blocks."""
    rows = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return (rows + block_m - 1) // block_m * block_m


def align_pairs_to_experts(
    topk_ids: torch.Tensor, num_experts: int, block_m: int, expert_offset: int = 0
) -> ExpertBlocks:
    """Groups the pairs of topk_ids by local expert, padded to block_m; see the module rules."""
    assert topk_ids.dim() == 2, f"topk_ids must be [T, k]: {tuple(topk_ids.shape)}"
    assert not topk_ids.is_floating_point(), f"topk_ids must be integers: {topk_ids.dtype}"
    assert num_experts >= 1 and block_m >= 1
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
