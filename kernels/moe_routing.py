"""MoE routing in one launch: softmax over the router logits, top-k, renormalisation, the casts.

    topk_weights, topk_ids = moe_routing(router_logits, top_k, renormalize, round_to=torch.bfloat16)

Rules:
- router_logits `[T, E]` in float32, float16 or bfloat16, any row stride, contiguous columns (a
  column slice of a wider GEMM output is fine); 1 <= top_k <= E <= 256, top_k <= 8.
- Per row, in float32: probs = softmax(logits); the top_k experts, the largest first; when
  `renormalize` their weights divided by their sum; when `round_to` is given each weight is
  rounded to that dtype and back (Hugging Face's Qwen2-MoE casts the routing weights to the
  hidden dtype before the experts: the fused MoE then reads the same values as float32).
- Outputs: topk_weights `[T, top_k]` in `weights_dtype` (float32, as kernels.fused_moe reads them),
  topk_ids `[T, top_k]` int32, both new and contiguous.
- Selection compares the float32 logits, not the probabilities: softmax is monotonic, and two
  different logits can round to one probability. Equal logits go to the lower expert id (a
  stable descending sort's order). torch.topk documents no order among ties (on CPU it comes from
  nth_element, on CUDA from a radix select and a sort, and they differ), so the torch path and
  this kernel may choose different experts among exactly equal logits, with equal weights.
  NaN logits count as -inf: every id written is a real expert.
- One program per token row holding the whole row; a grid from shapes only: CUDA-graph safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_EXPERTS = 256
MAX_TOP_K = 8
# what each rounding dtype is called inside the kernel (0: no rounding)
_ROUNDING = {None: 0, torch.float16: 1, torch.bfloat16: 2, torch.float32: 0}


@triton.jit
def _moe_routing_kernel(
    logits_ptr, weights_ptr, ids_ptr, num_experts, stride_row,
    TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, RENORMALIZE: tl.constexpr, ROUND_TO: tl.constexpr,
    BLOCK_E: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_E)
    valid = offs < num_experts
    x = tl.load(logits_ptr + row * stride_row + offs, mask=valid, other=float("-inf")).to(tl.float32)
    x = tl.where(x >= float("-inf"), x, float("-inf"))  # NaN (false in every comparison) -> -inf
    probs = tl.exp(x - tl.max(x, axis=0))
    probs = probs / tl.sum(probs, axis=0)
    alive = valid
    total = 0.0
    out_offs = tl.arange(0, BLOCK_K)  # TOP_K rounded up to a power of two, as arange needs
    picked_w = tl.zeros([BLOCK_K], dtype=tl.float32)
    picked_id = tl.zeros([BLOCK_K], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(tl.where(alive, x, float("-inf")), axis=0)
        # the lowest live id holding the best logit (padding lanes are never alive, and k <= E)
        expert = tl.min(tl.where(alive & (x == best), offs, BLOCK_E), axis=0)
        weight = tl.sum(tl.where(offs == expert, probs, 0.0), axis=0)
        alive = alive & (offs != expert)
        total += weight
        picked_w = tl.where(out_offs == j, weight, picked_w)
        picked_id = tl.where(out_offs == j, expert, picked_id)
    if RENORMALIZE:
        picked_w = picked_w / total
    if ROUND_TO == 1:
        picked_w = picked_w.to(tl.float16).to(tl.float32)
    if ROUND_TO == 2:
        # to nearest even by the bits, as torch rounds: Triton's interpreter truncates to bfloat16
        bits = picked_w.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        picked_w = bits.to(tl.float32, bitcast=True)
    out_mask = out_offs < TOP_K
    tl.store(weights_ptr + row * TOP_K + out_offs, picked_w.to(weights_ptr.dtype.element_ty), mask=out_mask)
    tl.store(ids_ptr + row * TOP_K + out_offs, picked_id, mask=out_mask)


def _check_args(router_logits: torch.Tensor, top_k: int, round_to: torch.dtype | None) -> None:
    assert router_logits.dim() == 2 and router_logits.dtype in _DTYPES, (
        tuple(router_logits.shape),
        router_logits.dtype,
    )
    num_experts = router_logits.shape[1]
    assert 1 <= top_k <= min(num_experts, MAX_TOP_K) and num_experts <= MAX_EXPERTS, (num_experts, top_k)
    assert round_to in _ROUNDING, round_to


def moe_routing(
    router_logits: torch.Tensor,
    top_k: int,
    renormalize: bool,
    weights_dtype: torch.dtype = torch.float32,
    round_to: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_weights [T, k] in weights_dtype, topk_ids [T, k] int32); see the module rules."""
    _check_args(router_logits, top_k, round_to)
    assert weights_dtype in _DTYPES, weights_dtype
    tokens, num_experts = router_logits.shape
    device = router_logits.device
    weights = torch.empty((tokens, top_k), dtype=weights_dtype, device=device)
    ids = torch.empty((tokens, top_k), dtype=torch.int32, device=device)
    if tokens == 0:
        return weights, ids
    if router_logits.stride(1) != 1:
        router_logits = router_logits.contiguous()
    block_e = triton.next_power_of_2(num_experts)
    _moe_routing_kernel[(tokens,)](
        router_logits, weights, ids, num_experts, router_logits.stride(0),
        TOP_K=top_k, BLOCK_K=triton.next_power_of_2(top_k), RENORMALIZE=renormalize,
        ROUND_TO=_ROUNDING[round_to], BLOCK_E=block_e,
        num_warps=1 if block_e <= 64 else 2,
    )  # fmt: skip
    return weights, ids


def moe_routing_ref(
    router_logits: torch.Tensor, top_k: int, renormalize: bool, round_to: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle, float32 weights and int32 ids: select_experts' arithmetic (softmax in float32,
    renormalise by the sum, round), the experts taken by a stable descending sort of the float32
    logits (the kernel's tie rule)."""
    _check_args(router_logits, top_k, round_to)
    logits = router_logits.float()
    logits = torch.where(logits.isnan(), float("-inf"), logits)
    probs = torch.softmax(logits, dim=-1)
    ids = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :top_k]
    weights = probs.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if round_to is not None:
        weights = weights.to(round_to).float()
    return weights, ids.to(torch.int32)
