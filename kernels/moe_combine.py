"""The last step of the fused MoE: each token's k weighted expert outputs summed and rounded, and for
Qwen2-MoE the gated shared expert added, in one launch.

    out = moe_combine(down, topk_ids, num_experts, expert_offset, dtype)                # [T, H]
    out = moe_combine(down, topk_ids, ..., shared=shared, gate_logits=g)              # + sigmoid(g) * shared

Rules:
- down `[T * k, H]` float32 (contiguous): pair t * k + j holds slot j of token t, already scaled by
  its routing weight (kernels.fused_moe's down GEMM). A pair whose expert is outside the local
  shard [expert_offset, expert_offset + num_experts) was never written: its row is not read (no
  zero fill needed) and adds nothing.
- routed = the slots summed in float32 in slot order from 0.0, rounded once to `dtype` (torch's
  `down.view(T, k, H).sum(1)` with the dropped rows zeroed, up to its order of additions).
- With `shared` `[T, H]` and `gate_logits` `[T]` (both `dtype`, any row stride): routed +
  sigmoid(g) * shared, rounded as kernels.shared_expert_gate does.
- Why one kernel: the zero fill, the sum, the cast and the shared tail were four launches a MoE
  layer, each a few microseconds of a batch-1 decode step that reads ~0.1 ms of weights a layer.
- One program per (token, block of columns); a grid from shapes only: CUDA-graph safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.shared_expert_gate import (
    add_gated_shared,
    add_gated_shared_expert_ref,
    check_shared_args,
)

_BLOCK = 1024


@triton.jit
def _moe_combine_kernel(
    down_ptr, ids_ptr, shared_ptr, gate_ptr, out_ptr, hidden, top_k, expert_lo, num_experts,
    stride_shared, stride_gate, HAS_SHARED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < hidden
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(top_k):
        pair = row * top_k + j
        expert = tl.load(ids_ptr + pair).to(tl.int32) - expert_lo
        # a pair outside the shard reads no column
        width = tl.where((expert >= 0) & (expert < num_experts), hidden, 0)
        acc += tl.load(down_ptr + pair * hidden + cols, mask=cols < width, other=0.0)
    dtype = out_ptr.dtype.element_ty
    if HAS_SHARED:
        out = add_gated_shared(
            acc.to(dtype).to(tl.float32),
            shared_ptr,
            gate_ptr,
            row,
            cols,
            mask,
            stride_shared,
            stride_gate,
            dtype,
        )
    else:
        out = acc.to(dtype)
    tl.store(out_ptr + row * hidden + cols, out, mask=mask)


def _check(down: torch.Tensor, topk_ids: torch.Tensor, dtype: torch.dtype) -> tuple[int, int, int]:
    assert topk_ids.dim() == 2 and not topk_ids.is_floating_point(), (tuple(topk_ids.shape), topk_ids.dtype)
    tokens, top_k = topk_ids.shape
    assert down.dtype == torch.float32 and down.dim() == 2 and down.shape[0] == tokens * top_k, (
        down.dtype,
        tuple(down.shape),
        tuple(topk_ids.shape),
    )
    assert down.is_contiguous() and topk_ids.is_contiguous()
    assert dtype in (torch.float32, torch.float16, torch.bfloat16), dtype
    return tokens, top_k, down.shape[1]


def moe_combine(
    down: torch.Tensor,
    topk_ids: torch.Tensor,
    num_experts: int,
    expert_offset: int,
    dtype: torch.dtype,
    shared: torch.Tensor | None = None,
    gate_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """The tokens' MoE outputs `[T, H]` in `dtype`; see the module rules."""
    tokens, top_k, hidden = _check(down, topk_ids, dtype)
    out = torch.empty((tokens, hidden), dtype=dtype, device=down.device)
    # without a shared expert the kernel never reads these: any float tensor will do
    shared_rows, gate, shared_stride, gate_stride = down, down, 0, 0
    if shared is not None:
        assert gate_logits is not None, "a shared expert needs its gate logits"
        check_shared_args(out, shared, gate_logits)
        shared_rows = shared if shared.stride(1) == 1 else shared.contiguous()
        gate, shared_stride, gate_stride = gate_logits, shared_rows.stride(0), gate_logits.stride(0)
    if tokens == 0 or hidden == 0:
        return out
    _moe_combine_kernel[(tokens, triton.cdiv(hidden, _BLOCK))](
        down, topk_ids, shared_rows, gate, out, hidden, top_k, expert_offset, num_experts,
        shared_stride, gate_stride, HAS_SHARED=shared is not None, BLOCK=_BLOCK,
    )  # fmt: skip
    return out


def sum_slots_in_order(per_slot: torch.Tensor) -> torch.Tensor:
    """per_slot [T, k, H] float32 summed over k from 0.0, slot after slot: the kernel's order
    (torch's `.sum(dim=1)` may pair the terms differently, a last-bit difference)."""
    total = torch.zeros_like(per_slot[:, 0])
    for j in range(per_slot.shape[1]):
        total += per_slot[:, j]
    return total


def moe_combine_ref(
    down: torch.Tensor,
    topk_ids: torch.Tensor,
    num_experts: int,
    expert_offset: int,
    dtype: torch.dtype,
    shared: torch.Tensor | None = None,
    gate_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """The oracle: the torch expressions the kernel replaces (dropped pairs' rows masked, not read)."""
    tokens, top_k, hidden = _check(down, topk_ids, dtype)
    local = topk_ids.long() - expert_offset
    kept = ((local >= 0) & (local < num_experts)).view(tokens, top_k, 1)
    per_slot = torch.where(kept, down.view(tokens, top_k, hidden), torch.zeros((), device=down.device))
    routed = sum_slots_in_order(per_slot).to(dtype)
    if shared is None:
        return routed
    assert gate_logits is not None, "a shared expert needs its gate logits"
    return add_gated_shared_expert_ref(routed, shared, gate_logits)
