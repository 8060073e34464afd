"""kernels.fp8_gemv against fp8_gemm_ref (Triton interpreter): the same float8 products summed in
float32 in another order (and, split-K, in several partial sums), so they agree to float32
rounding; the result is rounded once to the output dtype."""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels.fp8_gemm import fp8_gemm_ref
from pdserve.kernels.fp8_gemv import MAX_ROWS, fp8_gemv
from tests.helpers.fp8_reference import gemm_operands


@pytest.mark.parametrize("m,n,k", [(1, 64, 128), (2, 40, 200), (3, 96, 72), (4, 17, 64)])
@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fp8_gemv_matches_ref(m, n, k, split_k, with_bias):
    a, a_scale, w, w_scale, bias = gemm_operands(m, n, k, seed=m + n + k)
    bias = bias if with_bias else None
    out = fp8_gemv(a, a_scale, w, w_scale, bias, torch.float32, block_n=16, block_k=64, split_k=split_k)
    want = fp8_gemm_ref(a, a_scale, w, w_scale, bias, torch.float32)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_fp8_gemv_rounds_once_to_half_and_reads_a_row_stride():
    a, a_scale, w, w_scale, bias = gemm_operands(2, 48, 96, seed=5)
    wide = torch.zeros(2, 128, dtype=a.dtype)
    wide[:, :96] = a
    rows = wide[:, :96]  # a view whose row stride is not K
    out = fp8_gemv(rows, a_scale, w, w_scale, bias.half(), torch.float16, block_n=16, block_k=32)
    want = fp8_gemm_ref(a, a_scale, w, w_scale, bias.half(), torch.float16)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, want, rtol=1e-3, atol=1e-3)


def test_fp8_gemv_refuses_too_many_rows_and_other_dtypes():
    a, a_scale, w, w_scale, _ = gemm_operands(MAX_ROWS + 1, 32, 64, seed=6)
    with pytest.raises(ValueError, match="at most"):
        fp8_gemv(a, a_scale, w, w_scale, None, torch.float32)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_gemv(a[:1].float(), a_scale[:1], w, w_scale, None, torch.float32)
