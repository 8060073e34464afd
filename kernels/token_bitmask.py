"""Applies a batch's grammar token bitmask to its logits in place: one launch for the whole batch.

Rules:
- logits `[B, V]` (any row stride, contiguous last dim), bitmask `[B, ceil(V / 32)]` int32 on the
  same device, contiguous: bit `v % 32` of word `v // 32` set means token v is allowed. A cleared
  bit sets the logit to -inf; set bits leave the logit bit-identical (rows of unconstrained requests
  are all ones, so they are untouched).
- Columns of the bitmask beyond V are ignored; a bitmask narrower than V's words is refused.
- One program per (row, block of 1024 columns); a grid from shapes only: CUDA-graph safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BLOCK = 1024


@triton.jit
def _token_bitmask_kernel(logits, bitmask, logits_stride, mask_stride, vocab, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < vocab
    words = tl.load(bitmask + row * mask_stride + cols // 32, mask=inside, other=-1)
    banned = ((words >> (cols % 32)) & 1) == 0
    neg_inf = tl.full([BLOCK], float("-inf"), tl.float32).to(logits.dtype.element_ty)
    tl.store(logits + row * logits_stride + cols, neg_inf, mask=inside & banned)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Sets logits[b, v] = -inf where bit v of row b is clear; returns logits (modified in place)."""
    assert logits.ndim == 2 and logits.stride(1) == 1, (
        f"logits must be [B, V], last dim contiguous: {logits.shape}"
    )
    assert logits.dtype in _DTYPES, logits.dtype
    batch, vocab = logits.shape
    words = triton.cdiv(vocab, 32)
    assert bitmask.dtype == torch.int32 and bitmask.ndim == 2, (bitmask.dtype, bitmask.shape)
    assert bitmask.shape[0] == batch and bitmask.shape[1] >= words, (bitmask.shape, logits.shape)
    assert bitmask.stride(1) == 1 and bitmask.device == logits.device
    if batch == 0 or vocab == 0:
        return logits
    grid = (batch, triton.cdiv(vocab, _BLOCK))
    _token_bitmask_kernel[grid](logits, bitmask, logits.stride(0), bitmask.stride(0), vocab, BLOCK=_BLOCK)
    return logits


def apply_token_bitmask_ref(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """The oracle: unpacks the bits with torch and fills the banned logits with -inf, in place."""
    vocab = logits.shape[1]
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask[:, :, None] >> shifts) & 1  # [B, words, 32]
    allowed = bits.reshape(bitmask.shape[0], -1)[:, :vocab].to(torch.bool)
    return logits.masked_fill_(~allowed, float("-inf"))
