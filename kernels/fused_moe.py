"""Mixture-of-experts feed-forward (Triton grouped GEMMs over the selected experts), with its
pure-torch reference and the router's top-k selection.

Rules:
- hidden `[T, H]`; w13 `[E, 2I, H]` (per expert the gate rows 0..I-1, then the up rows); w2
  `[E, H, I]`; topk_weights `[T, k]` float32; topk_ids `[T, k]` global expert ids. The weights are
  the local shard of experts [expert_offset, expert_offset + E): an id outside it contributes nothing.
- out[t] = sum_j topk_weights[t, j] * w2[e] @ (silu(w13[e, :I] @ x_t) * (w13[e, I:] @ x_t)),
  e = topk_ids[t, j] - expert_offset; `[T, H]` in hidden's dtype.
- Rounding points (the reference rounds at the same ones): the gate/up GEMM accumulates in float32
  and rounds gate and up to hidden's dtype; SiLU-and-mul follows kernels.activation (silu in float32
  rounded to the dtype, the product in float32 rounded again), fused into that GEMM; the down GEMM
  accumulates in float32, is scaled by the routing weight in float32 and stays float32 until the
  sum over the k slots, which is rounded once.
- Steps: kernels.moe_align sorts the (token, slot) pairs by expert into blocks of BLOCK_M rows
  (on CUDA up to _TRITON_ALIGN_MAX_PAIRS pairs in its one-launch Triton path, else in torch ops);
  one grouped GEMM over w13 for the pairs' rows (each block multiplies by its one expert's
  weights, so unselected experts are never read) ending in SiLU-and-mul; one grouped GEMM over w2 that
  multiplies by the routing weight; the sum over k (kernels.moe_combine, which also adds a gated
  shared expert when given one). No host sync; grids from shapes only.
- Tiles transposed: a program computes c^T = b_expert @ a^T for its BLOCK_N weight rows and
  BLOCK_M sorted pair rows, so the weight rows are the MMA's M side (BLOCK_N >= 64: Hopper's
  warpgroup MMA) and both operands are K-contiguous. With the pair rows on the M side (16 at
  decode) Triton had to use mma.sync, and for fp8 experts it widened every weight value to
  float16 first (kernels.fp8_gemm, whose rules say more).
- fp8 experts (`w13_scale` [E, 2I] and `w2_scale` [E, H] float32 given; w13/w2 float8_e4m3fn, one
  scale per expert and output row): each GEMM's input rows are quantized per row first
  (kernels.fp8_quant, one launch; quantizing inside the GEMM would redo a row in every program that
  reads it), the GEMM multiplies fp8 by fp8 into float32 (full-precision sums across K, as in
  kernels.fp8_gemm) and scales by row scale * weight-row scale
  before the same roundings as above. The reference dequantizes: (q(x) . w_q) * s_x * s_w in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from pdserve.kernels.fp8_quant import per_token_quant_fp8, per_token_quant_fp8_ref
from pdserve.kernels.moe_align import (
    ExpertBlocks,
    align_pairs_to_experts_ref,
    align_pairs_to_experts_triton,
)
from pdserve.kernels.moe_combine import moe_combine, sum_slots_in_order
from pdserve.kernels.shared_expert_gate import add_gated_shared_expert_ref

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# decode sizes, where the sort's ~35 torch launches cost more than the GEMMs' weight reads; the one
# Triton program walks the pairs serially, so prefill's big sorts stay in torch
_TRITON_ALIGN_MAX_PAIRS = 1024


@triton.jit
def _grouped_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    sorted_pairs_ptr,
    block_experts_ptr,
    pair_weights_ptr,
    b_scale_ptr,
    a_scale_ptr,
    num_pairs,
    n_size,
    k_size,
    stride_am,
    stride_be,
    stride_bn,
    stride_cm,
    stride_bse,
    A_ROWS_PER_PAIR: tl.constexpr,
    GATED: tl.constexpr,
    MUL_ROUTED_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FP8_W: tl.constexpr,
):
    """c[p, n] = a[p // A_ROWS_PER_PAIR] . b[expert of p, n] for one block of sorted rows and one
    block of output columns. GATED: b's rows n and n + n_size are gate and up, and c gets
    silu(gate) * up with kernels.activation's roundings. MUL_ROUTED_WEIGHT: times the pair's weight.
    FP8_W: a and b are fp8 with per-row scales."""
    block = tl.program_id(0)
    expert = tl.load(block_experts_ptr + block).to(tl.int64)
    if expert < 0:
        return
    # Transposed tiles (see the rules): the accumulators are c^T [BLOCK_N, BLOCK_M]
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + offs_m)
    mask_m = pairs < num_pairs
    a_rows = (pairs // A_ROWS_PER_PAIR).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_size
    offs_k = tl.arange(0, BLOCK_K)
    a_block = a_ptr + a_rows[None, :] * stride_am + offs_k[:, None]
    b_block = b_ptr + expert * stride_be + offs_n[:, None].to(tl.int64) * stride_bn + offs_k[None, :]
    up_offset = n_size * stride_bn
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    a_scale = tl.zeros([BLOCK_M], dtype=tl.float32)
    if FP8_W:
        a_scale = tl.load(a_scale_ptr + a_rows, mask=mask_m, other=0.0)
    for k0 in range(0, k_size, BLOCK_K):
        mask_k = offs_k < k_size - k0
        a = tl.load(a_block, mask=mask_k[:, None] & mask_m[None, :], other=0.0)
        b = tl.load(b_block, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        if FP8_W:  # float32 sums across K (kernels.fp8_gemm's rules say why)
            acc = tl.dot(b, a, acc, max_num_imprecise_acc=BLOCK_K)
        else:
            acc = tl.dot(b, a, acc, input_precision=DOT_PRECISION)
        if GATED:
            b_up = tl.load(b_block + up_offset, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            if FP8_W:
                acc_up = tl.dot(b_up, a, acc_up, max_num_imprecise_acc=BLOCK_K)
            else:
                acc_up = tl.dot(b_up, a, acc_up, input_precision=DOT_PRECISION)
        a_block += BLOCK_K
        b_block += BLOCK_K
    if FP8_W:
        b_scales = b_scale_ptr + expert * stride_bse + offs_n
        # the reference's order: the row scale first
        acc = acc * a_scale[None, :] * tl.load(b_scales, mask=mask_n, other=0.0)[:, None]
        if GATED:
            up_scale = tl.load(b_scales + n_size, mask=mask_n, other=0.0)
            acc_up = acc_up * a_scale[None, :] * up_scale[:, None]
    if GATED:
        # round gate and up to the dtype first: the unfused path stores them before activating
        gate = acc.to(c_ptr.dtype.element_ty).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(c_ptr.dtype.element_ty)
        up = acc_up.to(c_ptr.dtype.element_ty)
        acc = act.to(tl.float32) * up.to(tl.float32)
    if MUL_ROUTED_WEIGHT:
        weight = tl.load(pair_weights_ptr + pairs, mask=mask_m, other=0.0)
        acc = acc * weight[None, :]
    c_block = c_ptr + pairs[None, :].to(tl.int64) * stride_cm + offs_n[:, None]
    tl.store(c_block, acc.to(c_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_m[None, :])


def moe_block_config(num_pairs: int, num_experts: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) by the mean rows per expert: a fixed table, so no
    autotuning runs while serving. Decode (a few rows per expert) wants BLOCK_M 16 so padding
    costs little and many narrow column blocks so every SM streams weights; prefill wants 64-row
    tiles. float32 (the exactness path) halves BLOCK_K to fit shared memory."""
    rows_per_expert = num_pairs / max(num_experts, 1)
    block_k = 64 if dtype == torch.float32 else 128
    if rows_per_expert <= 16:
        return 16, 64, block_k, 4
    if rows_per_expert <= 64:
        return 32, 64, block_k, 4
    return 64, 128, block_k // 2, 8


def _grouped_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    blocks: ExpertBlocks,
    pair_weights: torch.Tensor | None,
    a_rows_per_pair: int,
    tiles: tuple[int, int, int, int],
    b_scale: torch.Tensor | None = None,
) -> None:
    """out's rows of the sorted pairs; gated (silu(gate) * up) when b has twice out's columns;
    b in fp8 with b_scale [E, N] when given, a's rows then quantized first."""
    a_scale = None
    if b_scale is not None:
        a, a_scale = per_token_quant_fp8(a)
    num_pairs, n_size = out.shape
    _, block_n, block_k, num_warps = tiles
    grid = (blocks.block_experts.numel(), triton.cdiv(n_size, block_n))
    _grouped_gemm_kernel[grid](
        a, b, out, blocks.sorted_pairs, blocks.block_experts,
        pair_weights if pair_weights is not None else out,  # never read without MUL_ROUTED_WEIGHT
        b_scale if b_scale is not None else out,  # never read without FP8_W
        a_scale if a_scale is not None else out,
        num_pairs, n_size, b.shape[2],
        a.stride(0), b.stride(0), b.stride(1), out.stride(0),
        b_scale.stride(0) if b_scale is not None else 0,
        A_ROWS_PER_PAIR=a_rows_per_pair,
        GATED=b.shape[1] == 2 * n_size,
        MUL_ROUTED_WEIGHT=pair_weights is not None,
        BLOCK_M=blocks.block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_PRECISION="ieee" if b.dtype == torch.float32 else "tf32",
        FP8_W=b_scale is not None,
        num_warps=num_warps,
    )  # fmt: skip


def _check_args(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
) -> None:
    assert hidden.dim() == 2 and hidden.dtype in _DTYPES, (tuple(hidden.shape), hidden.dtype)
    assert w13.dim() == 3 and w2.dim() == 3, "w13 must be [E, 2I, H] and w2 [E, H, I]"
    experts, two_inter, width = w13.shape
    assert width == hidden.shape[1] and two_inter % 2 == 0, (tuple(w13.shape), tuple(hidden.shape))
    assert w2.shape == (experts, width, two_inter // 2), f"w2 {tuple(w2.shape)} vs w13 {tuple(w13.shape)}"
    if w13_scale is None and w2_scale is None:
        assert w13.dtype == w2.dtype == hidden.dtype, (hidden.dtype, w13.dtype, w2.dtype)
    else:
        assert w13.dtype == w2.dtype == torch.float8_e4m3fn, (w13.dtype, w2.dtype)
        assert w13_scale is not None and w2_scale is not None, "fp8 experts need both scales"
        assert w13_scale.shape == w13.shape[:2] and w2_scale.shape == w2.shape[:2], (
            tuple(w13_scale.shape),
            tuple(w2_scale.shape),
        )
        assert w13_scale.dtype == w2_scale.dtype == torch.float32, (w13_scale.dtype, w2_scale.dtype)
        assert w13_scale.stride(1) == 1 and w2_scale.stride(1) == 1, "scales need a contiguous last dim"
    assert topk_ids.dim() == 2 and topk_ids.shape[0] == hidden.shape[0], tuple(topk_ids.shape)
    assert topk_weights.shape == topk_ids.shape and topk_weights.dtype == torch.float32, (
        tuple(topk_weights.shape),
        topk_weights.dtype,
    )
    assert not topk_ids.is_floating_point(), topk_ids.dtype
    assert hidden.device == w13.device == w2.device == topk_ids.device == topk_weights.device
    assert w13.stride(2) == 1 and w2.stride(2) == 1, "expert weights need a contiguous last dim"


def fused_moe(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    expert_offset: int = 0,
    block_sizes: tuple[int, int, int] | None = None,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    align_in_triton: bool | None = None,
    shared: torch.Tensor | None = None,
    shared_gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """The experts' weighted sum for every token; see the module rules (scales given: fp8 experts;
    `shared` [T, H] and `shared_gate` [T] given: plus the gated shared expert, kernels.moe_combine).

    `block_sizes` (BLOCK_M, BLOCK_N, BLOCK_K) overrides the table (tests use small tiles to cross
    block edges with tiny shapes). `align_in_triton` forces the pair sort's path (None: the Triton
    one on CUDA for decode sizes; tests force it under the interpreter)."""
    _check_args(hidden, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale)
    tokens, top_k = topk_ids.shape
    num_experts, inter = w13.shape[0], w2.shape[2]
    num_pairs = tokens * top_k
    if num_pairs == 0:
        if shared is not None:
            assert shared_gate is not None, "a shared expert needs its gate logits"
            return add_gated_shared_expert_ref(hidden.new_zeros(hidden.shape), shared, shared_gate)
        return hidden.new_zeros(hidden.shape)
    tiles = moe_block_config(num_pairs, num_experts, hidden.dtype)
    if block_sizes is not None:
        tiles = (*block_sizes, tiles[3])
    assert min(tiles[:3]) >= 16, "tl.dot needs tiles of at least 16"
    hidden = hidden.contiguous()
    if align_in_triton is None:
        align_in_triton = topk_ids.is_cuda and num_pairs <= _TRITON_ALIGN_MAX_PAIRS
    align = align_pairs_to_experts_triton if align_in_triton else align_pairs_to_experts_ref
    blocks = align(topk_ids, num_experts, tiles[0], expert_offset)
    # rows of dropped pairs are written by neither GEMM and read by neither
    act = torch.empty((num_pairs, inter), dtype=hidden.dtype, device=hidden.device)
    _grouped_gemm(hidden, w13, act, blocks, None, top_k, tiles, w13_scale)
    down = torch.empty((num_pairs, hidden.shape[1]), dtype=torch.float32, device=hidden.device)
    _grouped_gemm(act, w2, down, blocks, topk_weights.reshape(-1), 1, tiles, w2_scale)
    return moe_combine(
        down, topk_ids.contiguous(), num_experts, expert_offset, hidden.dtype, shared, shared_gate
    )


def fused_moe_ref(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    expert_offset: int = 0,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    shared: torch.Tensor | None = None,
    shared_gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """The test oracle: a torch loop over the local experts, float32 GEMMs, the kernel's rounding
    points; with scales, fp8 experts by dequantized float32 GEMMs (also the CPU path of fp8 MoE);
    with `shared`, the gated shared expert added as fused_moe does."""
    _check_args(hidden, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale)
    tokens, top_k = topk_ids.shape
    per_slot = torch.zeros((tokens, top_k, hidden.shape[1]), dtype=torch.float32, device=hidden.device)
    local = topk_ids.long() - expert_offset
    for e in range(w13.shape[0]):
        rows, slots = torch.nonzero(local == e, as_tuple=True)
        if rows.numel() == 0:
            continue
        scale13 = None if w13_scale is None else w13_scale[e]
        gate_up = _ref_matmul(hidden[rows], w13[e], scale13).to(hidden.dtype)
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate) * up
        scale2 = None if w2_scale is None else w2_scale[e]
        down = _ref_matmul(act, w2[e], scale2) * topk_weights[rows, slots, None]
        per_slot[rows, slots] = down
    routed = sum_slots_in_order(per_slot).to(hidden.dtype)
    if shared is None:
        return routed
    assert shared_gate is not None, "a shared expert needs its gate logits"
    return add_gated_shared_expert_ref(routed, shared, shared_gate)


def _ref_matmul(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor | None) -> torch.Tensor:
    """x @ w.T in float32; with w_scale, x quantized per row and both operands dequantized."""
    if w_scale is None:
        return x.float() @ w.float().T
    q, x_scale = per_token_quant_fp8_ref(x)
    return (q.float() @ w.float().T) * x_scale * w_scale[None, :]


def select_experts(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_weights float32 [T, k], topk_ids int32 [T, k]): softmax over experts in float32, the k
    largest; renormalized to sum 1 per token when asked (Mixtral; Qwen2-MoE with norm_topk_prob)."""
    assert router_logits.dim() == 2 and 1 <= top_k <= router_logits.shape[1], (
        tuple(router_logits.shape),
        top_k,
    )
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)
