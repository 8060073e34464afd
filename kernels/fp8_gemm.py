"""fp8 GEMM with per-token activation scales and per-channel weight scales: out = (a @ w.T) * sa * sw.

Rules:
- a [M, K] and w [N, K] are float8_e4m3fn with contiguous last dims; a_scale [M, 1] and w_scale [N]
  float32; bias [N] (optional) in the output dtype. out[m, n] = sum_k a[m, k] * w[n, k] accumulated
  in float32, times a_scale[m] * w_scale[n], plus bias[n], rounded once to out_dtype.
- Written for the skinny M of decode batches, where cuBLASLt's fp8 GEMM (torch._scaled_mm) leaves
  bandwidth unused: a tile of BLOCK_M rows (16; fewer rows are masked) against BLOCK_N weight rows,
  and split-K when N alone gives too few programs to keep every SM streaming weights. Split-K
  programs store their scaled partial sums (float32, one slab per split) and count themselves in on
  their tile's counter; the last one in adds the slabs in split order, rounds once to out_dtype,
  stores the output and sets the counter back to 0. One launch, no zero-fill before it and no
  float32 -> out_dtype pass after it, and the same sum in the same order on every run (float32
  atomics add in arrival order). The counters are one zeroed buffer per device, reused by every
  call: split-K GEMMs of one process must not run concurrently on two streams.
- Operands swapped: each program computes out^T = w @ a^T, so the weight tile is the MMA's M side
  (BLOCK_N >= 64: Hopper's warpgroup MMA, wgmma m64nNk32 with e4m3 operands read from shared
  memory) and the 16 token rows its N side. Both operands are K-contiguous, the only layout fp8
  wgmma takes. In the a @ w^T orientation the 16 token rows were the MMA's M side, too few for
  wgmma: Triton fell back to mma.sync in float16 and converted every fp8 weight value to float16
  first (cvt.rn.f16x2.e4m3x2, twice per value read), which bounded the kernel at ~40-60% of the
  copy rate (bench_fp8_gemm on an H100).
- float32 sums across the K loop: Hopper's fp8 MMA adds into its accumulator with a shortened
  mantissa, and Triton leaves it there for the whole loop by default on sm_90
  (max_num_imprecise_acc 2**30). Each dot here gets `max_num_imprecise_acc=BLOCK_K`, so every
  BLOCK_K-wide partial product is added into the float32 accumulator at full precision (the
  promotion DeepSeek-V3's fp8 GEMMs make every 128 elements of K).
- `fp8_gemm_ref` is the same arithmetic in torch (float32 matmul of the dequantized operands).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _fp8_gemm_kernel(
    a,
    a_scale,
    w,
    w_scale,
    bias,
    out,
    M,
    N,
    K,
    a_stride,
    w_stride,
    k_per_split,
    partials,
    split_stride,
    counters,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    # out^T tile [BLOCK_N, BLOCK_M] = w tile [BLOCK_N, BLOCK_K] @ a^T tile [BLOCK_K, BLOCK_M]: see the rules
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < k_end
        w_tile = tl.load(
            w + rn[:, None].to(tl.int64) * w_stride + rk[None, :],
            mask=n_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        a_tile = tl.load(
            a + rm[None, :].to(tl.int64) * a_stride + rk[:, None],
            mask=k_ok[:, None] & m_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(w_tile, a_tile, acc, max_num_imprecise_acc=BLOCK_K)  # float32 sums: see the rules
    sa = tl.load(a_scale + rm, mask=m_ok, other=0.0)
    sw = tl.load(w_scale + rn, mask=n_ok, other=0.0)
    acc = acc * sa[None, :] * sw[:, None]  # the reference's order: row scale first
    if HAS_BIAS:
        b = tl.load(bias + rn, mask=n_ok, other=0.0).to(tl.float32)
        acc = acc + tl.where(pid_k == 0, 1.0, 0.0) * b[:, None]
    offsets = rm[None, :].to(tl.int64) * N + rn[:, None]
    mask = n_ok[:, None] & m_ok[None, :]
    if SPLIT:
        tl.store(partials + pid_k * split_stride + offsets, acc, mask=mask)
        # release: this program's slab is visible before its count; acquire: the last one sees them all
        counter = counters + pid_m * tl.num_programs(1) + pid_n
        arrived = tl.atomic_add(counter, 1, sem="acq_rel")
        splits = tl.num_programs(2)
        if arrived == splits - 1:
            total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for split in range(splits):
                slab = partials + split * split_stride
                total += tl.load(slab + offsets, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(out + offsets, total.to(out.dtype.element_ty), mask=mask)
            tl.atomic_xchg(counter, 0)
    else:
        tl.store(out + offsets, acc.to(out.dtype.element_ty), mask=mask)


def _check(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> None:
    if a.dtype != torch.float8_e4m3fn or w.dtype != torch.float8_e4m3fn:
        raise ValueError("a and w must be float8_e4m3fn")
    if a.dim() != 2 or w.dim() != 2 or a.shape[1] != w.shape[1]:
        raise ValueError(f"a [M, K] and w [N, K] must agree on K: {tuple(a.shape)}, {tuple(w.shape)}")
    if a.stride(-1) != 1 or w.stride(-1) != 1:
        raise ValueError("a and w need contiguous last dims")
    if a_scale.shape != (a.shape[0], 1) or w_scale.shape != (w.shape[0],):
        raise ValueError("a_scale must be [M, 1] and w_scale [N]")


BLOCK_M = 16
# Tiles a split-K launch may have (int32 counters, 16 KiB a device): M <= 16 rows and N up to
# 262,144 at BLOCK_N 64, far past every decode linear.
SPLIT_COUNTERS = 4096
_counters_by_device: dict[torch.device, torch.Tensor] = {}


def _split_counters(device: torch.device) -> torch.Tensor:
    """The device's tile counters, all 0 between launches (each tile's last program resets its own).
    Made on the first split-K call, which the engine's warm-up makes before any CUDA-graph capture."""
    counters = _counters_by_device.get(device)
    if counters is None:
        counters = torch.zeros(SPLIT_COUNTERS, dtype=torch.int32, device=device)
        _counters_by_device[device] = counters
    return counters


def fp8_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    block_n: int = 64,
    block_k: int = 256,
    split_k: int | None = None,
    num_warps: int = 4,
    num_stages: int = 4,
) -> torch.Tensor:
    """out [M, N] in out_dtype; see the module rules. split_k > 1 splits K (partial sums added by
    the last program of each tile); None picks it from the shape (auto_split_k), and a grid with
    more tiles than the split counters cover is not split. num_stages is the software pipeline's
    depth: the weight tiles each program has in flight."""
    _check(a, a_scale, w, w_scale)
    M, K = a.shape
    N = w.shape[0]
    out = a.new_empty((M, N), dtype=out_dtype)
    if M == 0:
        return out
    tiles_m, tiles_n = triton.cdiv(M, BLOCK_M), triton.cdiv(N, block_n)
    if split_k is None:
        split_k = auto_split_k(K, block_k)
    if tiles_m * tiles_n > SPLIT_COUNTERS:
        split_k = 1  # thousands of tiles keep every SM busy without splitting K
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
    splits = triton.cdiv(K, k_per_split)
    split = splits > 1
    partials = a.new_empty((splits, M, N), dtype=torch.float32) if split else out
    counters = _split_counters(a.device) if split else out
    _fp8_gemm_kernel[(tiles_m, tiles_n, splits)](
        a, a_scale, w, w_scale, bias if bias is not None else w_scale,
        out, M, N, K, a.stride(0), w.stride(0), k_per_split, partials, partials.stride(0), counters,
        HAS_BIAS=bias is not None, SPLIT=split,
        BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out


_K_BLOCKS_PER_SPLIT = 14


def auto_split_k(K: int, block_k: int) -> int:
    """K splits so that each program streams about 14 K-blocks: on an H100 (bench_fp8_gemm --sweep)
    a long K (Llama-3.1-8B's down_proj, 14,336) ran best in 4 splits, K = 4,096 unsplit, where the
    float32 partial sums cost more than the parallelism buys (measured with the split-K of float32
    atomics, a zero-fill and a rounding pass; the serial reduction is not yet swept)."""
    return max(1, min(8, K // (_K_BLOCKS_PER_SPLIT * block_k)))


def fp8_gemm_ref(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    out = (a.float() @ w.float().t()) * a_scale * w_scale[None, :]
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)
