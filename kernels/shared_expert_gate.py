"""The tail of a MoE block with a gated shared expert (Qwen2-MoE): routed + sigmoid(g) * shared.

    out = add_gated_shared_expert(routed, shared, gate_logits)     # [T, H], [T, H], [T] -> [T, H]

Rules:
- routed and shared `[T, H]` of one dtype (float32, float16, bfloat16), contiguous columns, any
  row stride; gate_logits `[T]` of that dtype, any stride (a column of a wider GEMM output).
- The result rounds where the torch expression `routed + sigmoid(g) * shared` does in that dtype:
  sigmoid in float32 rounded to the dtype, the product rounded, the sum rounded. So it equals the
  three torch launches it replaces up to the last bit of sigmoid's float32 value.
- A new contiguous `[T, H]` tensor; one program per (row, block of columns), a grid from shapes
  only: CUDA-graph safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BLOCK = 1024


@triton.jit
def add_gated_shared(routed, shared_ptr, gate_ptr, row, cols, mask, stride_shared, stride_gate, dtype):
    """routed (float32 values of `dtype`) + sigmoid(g) * shared for one row's columns, rounded as
    the rules say; returns the row in `dtype`."""
    g = tl.load(gate_ptr + row * stride_gate).to(tl.float32)
    scale = (1.0 / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    shared = tl.load(shared_ptr + row * stride_shared + cols, mask=mask, other=0.0).to(tl.float32)
    gated = (scale * shared).to(dtype).to(tl.float32)
    return (routed + gated).to(dtype)


@triton.jit
def _gated_shared_kernel(
    routed_ptr, shared_ptr, gate_ptr, out_ptr, hidden, stride_routed, stride_shared, stride_gate,
    BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < hidden
    routed = tl.load(routed_ptr + row * stride_routed + cols, mask=mask, other=0.0).to(tl.float32)
    out = add_gated_shared(
        routed, shared_ptr, gate_ptr, row, cols, mask, stride_shared, stride_gate, out_ptr.dtype.element_ty
    )
    tl.store(out_ptr + row * hidden + cols, out, mask=mask)


def check_shared_args(routed: torch.Tensor, shared: torch.Tensor, gate_logits: torch.Tensor) -> None:
    assert routed.dim() == 2 and routed.shape == shared.shape, (tuple(routed.shape), tuple(shared.shape))
    assert gate_logits.shape == (routed.shape[0],), (tuple(gate_logits.shape), tuple(routed.shape))
    assert routed.dtype in _DTYPES and routed.dtype == shared.dtype == gate_logits.dtype, (
        routed.dtype,
        shared.dtype,
        gate_logits.dtype,
    )
    assert routed.device == shared.device == gate_logits.device


def add_gated_shared_expert(
    routed: torch.Tensor, shared: torch.Tensor, gate_logits: torch.Tensor
) -> torch.Tensor:
    """routed + sigmoid(gate_logits)[:, None] * shared, a new tensor; see the module rules."""
    check_shared_args(routed, shared, gate_logits)
    tokens, hidden = routed.shape
    out = torch.empty((tokens, hidden), dtype=routed.dtype, device=routed.device)
    if tokens == 0 or hidden == 0:
        return out
    if routed.stride(1) != 1:
        routed = routed.contiguous()
    if shared.stride(1) != 1:
        shared = shared.contiguous()
    _gated_shared_kernel[(tokens, triton.cdiv(hidden, _BLOCK))](
        routed, shared, gate_logits, out, hidden,
        routed.stride(0), shared.stride(0), gate_logits.stride(0), BLOCK=_BLOCK,
    )  # fmt: skip
    return out


def add_gated_shared_expert_ref(
    routed: torch.Tensor, shared: torch.Tensor, gate_logits: torch.Tensor
) -> torch.Tensor:
    """The oracle: the torch expression of SparseMoeBlock, in the tensors' dtype."""
    check_shared_args(routed, shared, gate_logits)
    return routed + torch.sigmoid(gate_logits)[:, None] * shared
