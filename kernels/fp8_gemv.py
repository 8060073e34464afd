"""fp8 GEMV for decode's fewest rows: out = (a @ w.T) * sa * sw on CUDA cores, without tl.dot.

Rules:
- The operands and the result are those of kernels.fp8_gemm (a [M, K] and w [N, K] float8_e4m3fn,
  a_scale [M, 1], w_scale [N] float32, optional bias [N]); M <= MAX_ROWS.
- At M = 1 a GEMM is a read of the weights, and tl.dot's smallest tile pads the rows to 16: 15/16
  of its tensor-core work is padding, and its tile shapes keep few weight bytes in flight per SM.
  Here each program owns BLOCK_N weight rows and streams them along K in wide, K-contiguous loads
  (16 bytes per thread), converts to float32 and multiplies by every input row (all M rows share
  one read of the weights); the products are summed along K in registers.
- Split-K (split_k > 1) adds scaled partial sums atomically into a float32 buffer, rounded to
  out_dtype once at the end, as kernels.fp8_gemm does.
- The reference is kernels.fp8_gemm.fp8_gemm_ref.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.fp8_gemm import check_fp8_operands, gemm_output, scale_and_store

MAX_ROWS = 4


@triton.jit
def _fp8_gemv_kernel(
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
    HAS_BIAS: tl.constexpr,
    ATOMIC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, ROWS)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < k_end
        w_tile = tl.load(
            w + rn[:, None].to(tl.int64) * w_stride + rk[None, :],
            mask=n_ok[:, None] & k_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        a_tile = tl.load(
            a + rm[:, None].to(tl.int64) * a_stride + rk[None, :],
            mask=m_ok[:, None] & k_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(a_tile[:, None, :] * w_tile[None, :, :], axis=2)
    scale_and_store(
        acc, a_scale, w_scale, bias, out, rm, rn, m_ok, n_ok, N, pid_k, HAS_BIAS=HAS_BIAS, ATOMIC=ATOMIC
    )


def fp8_gemv(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    block_n: int = 16,
    block_k: int = 512,
    split_k: int = 1,
    num_warps: int = 4,
) -> torch.Tensor:
    """out [M, N] in out_dtype for M <= MAX_ROWS; see the module rules."""
    check_fp8_operands(a, a_scale, w, w_scale)
    M, K = a.shape
    N = w.shape[0]
    if M > MAX_ROWS:
        raise ValueError(f"fp8_gemv takes at most {MAX_ROWS} rows, got {M}")
    atomic = split_k > 1
    out = gemm_output(a, N, out_dtype, atomic)
    if M == 0:
        return out.to(out_dtype)
    rows = triton.next_power_of_2(M)
    # The [ROWS, BLOCK_N, BLOCK_K] products live in registers: more rows, shorter K steps.
    block_k = max(16, block_k // rows)
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
    grid = (triton.cdiv(N, block_n), triton.cdiv(K, k_per_split))
    _fp8_gemv_kernel[grid](
        a, a_scale, w, w_scale, bias if bias is not None else w_scale,
        out, M, N, K, a.stride(0), w.stride(0), k_per_split,
        HAS_BIAS=bias is not None, ATOMIC=atomic,
        ROWS=rows, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
    )  # fmt: skip
    return out.to(out_dtype) if atomic else out
