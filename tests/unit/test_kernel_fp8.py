"""kernels.fp8_quant and kernels.fp8_gemm against their torch references (Triton interpreter).

Quantization is exact: both sides divide in float32 and round to e4m3 to nearest even. The GEMM sums
the same float8 products in float32 in another order (and, split-K, in several partial sums added
by each tile's last program), so it agrees to float32 rounding; the result is rounded once to the
output dtype.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels.fp8_gemm import fp8_gemm, fp8_gemm_ref
from pdserve.kernels.fp8_quant import (
    FP8_E4M3_MAX,
    per_channel_quant_fp8,
    per_token_quant_fp8,
    per_token_quant_fp8_ref,
)


@pytest.mark.parametrize("rows,cols", [(1, 64), (5, 100), (17, 576), (3, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_per_token_quant_matches_ref_exactly(rows, cols, dtype):
    gen = torch.Generator().manual_seed(rows * cols)
    x = (10 * torch.randn(rows, cols, generator=gen)).to(dtype)
    x[0, 0] = 0.0
    q, scales = per_token_quant_fp8(x)
    q_ref, scales_ref = per_token_quant_fp8_ref(x)
    assert q.dtype == torch.float8_e4m3fn and scales.shape == (rows, 1)
    assert torch.equal(scales, scales_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    # each row's largest magnitude lands on e4m3's largest value; the round trip is within one step
    nonzero = x.float().abs().amax(dim=1) > 0
    assert torch.equal(q.float().abs().amax(dim=1)[nonzero], torch.full((int(nonzero.sum()),), FP8_E4M3_MAX))
    err = (q.float() * scales - x.float()).abs()
    assert (err <= x.float().abs() / 16 + 1e-6).all()  # 3 mantissa bits: half a step is 1/16


def test_zero_rows_quantize_to_zero():
    q, scales = per_token_quant_fp8(torch.zeros(3, 32))
    assert not q.float().any() and (scales > 0).all()


def test_per_channel_weights_round_trip():
    w = torch.randn(48, 80, generator=torch.Generator().manual_seed(0))
    q, scales = per_channel_quant_fp8(w)
    assert q.shape == w.shape and scales.shape == (48,)
    assert ((q.float() * scales[:, None] - w).abs() <= w.abs() / 16 + 1e-6).all()


def _operands(m: int, n: int, k: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    a, a_scale = per_token_quant_fp8_ref(torch.randn(m, k, generator=gen))
    w, w_scale = per_channel_quant_fp8(torch.randn(n, k, generator=gen) / k**0.5)
    return a, a_scale, w, w_scale, torch.randn(n, generator=gen)


@pytest.mark.parametrize("m,n,k", [(1, 64, 128), (3, 96, 200), (16, 64, 256), (21, 130, 72)])
@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fp8_gemm_matches_ref(m, n, k, split_k, with_bias):
    a, a_scale, w, w_scale, bias = _operands(m, n, k, seed=m + n + k)
    bias = bias if with_bias else None
    out = fp8_gemm(a, a_scale, w, w_scale, bias, torch.float32, block_n=32, block_k=32, split_k=split_k)
    want = fp8_gemm_ref(a, a_scale, w, w_scale, bias, torch.float32)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_fp8_gemm_rounds_once_to_half():
    a, a_scale, w, w_scale, bias = _operands(4, 64, 96, seed=3)
    out = fp8_gemm(a, a_scale, w, w_scale, bias.half(), torch.float16, block_n=32, block_k=32)
    want = fp8_gemm_ref(a, a_scale, w, w_scale, bias.half(), torch.float16)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, want, rtol=1e-3, atol=1e-3)


def test_split_k_rounds_the_sum_of_its_slabs_once_and_leaves_its_counters_at_zero():
    """Split-K's last program per tile adds the float32 slabs in split order and rounds once; the
    tile counters are back at 0 for the next launch (they are shared by every call on the device)."""
    from pdserve.kernels.fp8_gemm import _split_counters

    a, a_scale, w, w_scale, bias = _operands(5, 96, 320, seed=6)
    want = fp8_gemm_ref(a, a_scale, w, w_scale, bias.half(), torch.float16)
    for _ in range(2):  # the second launch finds the counters as the first left them
        out = fp8_gemm(a, a_scale, w, w_scale, bias.half(), torch.float16, block_n=32, block_k=32, split_k=4)
        torch.testing.assert_close(out, want, rtol=1e-3, atol=1e-3)
        assert not _split_counters(a.device).any()


def test_a_grid_past_the_split_counters_is_not_split(monkeypatch):
    from pdserve.kernels import fp8_gemm as module

    monkeypatch.setattr(module, "SPLIT_COUNTERS", 2)  # 2 x 3 tiles below: more than the counters cover
    monkeypatch.setattr(module, "_split_counters", lambda device: pytest.fail("split past the counters"))
    a, a_scale, w, w_scale, _ = _operands(20, 96, 128, seed=7)
    out = fp8_gemm(a, a_scale, w, w_scale, None, torch.float32, block_n=32, block_k=32, split_k=4)
    torch.testing.assert_close(
        out, fp8_gemm_ref(a, a_scale, w, w_scale, None, torch.float32), rtol=1e-5, atol=1e-5
    )


def test_fp8_gemm_refuses_other_dtypes_and_shapes():
    a, a_scale, w, w_scale, _ = _operands(2, 32, 64, seed=4)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_gemm(a.float(), a_scale, w, w_scale, None, torch.float32)
    with pytest.raises(ValueError, match="agree on K"):
        fp8_gemm(a[:, :32], a_scale, w, w_scale, None, torch.float32)


def test_rounding_carries_into_the_exponent_and_keeps_subnormals():
    """Ties and carries (124 -> 128, 62 -> 64), subnormals (2**-9 steps), signs: as torch rounds."""
    row = torch.tensor(
        [
            448.0,
            124.0,
            -124.0,
            123.9,
            62.0,
            30.9,
            15.5,
            0.97,
            0.0146,
            0.0019,
            0.0029,
            -0.0015,
            1e-5,
            240.0,
            250.0,
        ]
    )
    q, scales = per_token_quant_fp8(row[None, :])
    assert scales.item() == 1.0
    assert torch.equal(q.view(torch.uint8), row[None, :].to(torch.float8_e4m3fn).view(torch.uint8))


def test_tiny_negatives_keep_their_sign():
    row = torch.tensor([[448.0, -1e-5, 1e-5, -0.0009, 0.0]])
    q, _ = per_token_quant_fp8(row)
    assert torch.equal(q.view(torch.uint8), row.to(torch.float8_e4m3fn).view(torch.uint8))
