"""Extend and decode attention over an fp8 pool (Triton interpreter) against their torch oracles,
for float8_e4m3fn and float8_e5m2, with K and V scales far from 1.

The bound: kernel and oracle read the same fp8 values; the kernel multiplies K's scale into the
score scale and V's into the output where the oracle dequantizes first, so in float32 they differ
by a few roundings (rtol 1e-5, atol 2e-5, the float32 bound of the 16-bit tests). With float16 q
the kernel's dots take float16 operands (fp8 values are exact there) and p rounded to float16, the
bound of the float16 tests (2e-3). Pool slots outside the sequences hold NaN bytes: a stray read
shows.
"""

from __future__ import annotations

import math

import pytest
import torch

from pdserve.kernels.decode_attention import decode_attention, decode_attention_ref
from pdserve.kernels.extend_attention import extend_attention, extend_attention_ref
from pdserve.kernels.fp8_kv_format import quantize_kv_ref
from tests.helpers.paged_kv import PagedKV, random_paged_kv

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
K_SCALE, V_SCALE = torch.tensor([0.02]), torch.tensor([0.5])


def _fp8_pool(seq_lens: list[int], page_size: int, hkv: int, d: int, fp8: torch.dtype, seed: int):
    """Paged K/V quantized into fp8 (K of magnitude ~2, so K_SCALE spreads it over the format)."""
    gen = torch.Generator().manual_seed(seed)
    kv: PagedKV = random_paged_kv(seq_lens, page_size, hkv, d, torch.float32, gen)
    k_pages = quantize_kv_ref(kv.k_pages * 2.0, K_SCALE, fp8)  # NaN slots stay NaN
    v_pages = quantize_kv_ref(kv.v_pages, V_SCALE, fp8)
    return k_pages, v_pages, kv.page_table, gen


def _tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-5, "atol": 2e-5} if dtype == torch.float32 else {"rtol": 2e-3, "atol": 2e-3}


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("page_size,hq,hkv,d", [(16, 8, 2, 64), (1, 4, 4, 80)])
def test_decode_attention_matches_reference(fp8, dtype, page_size, hq, hkv, d):
    seq_lens = [1, 17, 0, 36]
    k_pages, v_pages, table, gen = _fp8_pool(seq_lens, page_size, hkv, d, fp8, seed=d + hq)
    q = torch.randn(len(seq_lens), hq, d, generator=gen).to(dtype)
    lens = torch.tensor(seq_lens)
    out = torch.full_like(q, math.nan)
    scale = d**-0.5
    decode_attention(
        q, k_pages, v_pages, table, lens, scale, out, 3, block_n=16, k_scale=K_SCALE, v_scale=V_SCALE
    )
    want = decode_attention_ref(
        q.float(), k_pages, v_pages, table, lens, scale, k_scale=K_SCALE, v_scale=V_SCALE
    )
    torch.testing.assert_close(out.float(), want, **_tolerance(dtype))


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window,softcap", [(None, None), (7, 30.0)])
def test_extend_attention_matches_reference(fp8, dtype, window, softcap):
    requests = [(1, 0), (15, 5), (0, 7), (33, 31)]  # (extend_len, prefix_len)
    seq_lens = [e + p for e, p in requests]
    hq, hkv, d = 4, 2, 64
    k_pages, v_pages, table, gen = _fp8_pool(seq_lens, 16, hkv, d, fp8, seed=len(str(window)))
    extend_lens = torch.tensor([e for e, _ in requests])
    starts = torch.cumsum(extend_lens, 0) - extend_lens
    q = torch.randn(int(extend_lens.sum()), hq, d, generator=gen).to(dtype)
    out = torch.full_like(q, math.nan)
    args = (table, torch.tensor(seq_lens), extend_lens, starts)
    limits = {"window": window, "softcap": softcap}
    scales = {"k_scale": K_SCALE, "v_scale": V_SCALE}
    extend_attention(q, k_pages, v_pages, *args, 33, d**-0.5, out, block_m=16, block_n=16, **limits, **scales)
    want = extend_attention_ref(q.float(), k_pages, v_pages, *args, d**-0.5, **limits, **scales)
    torch.testing.assert_close(out.float(), want, **_tolerance(dtype))


def test_reference_reads_what_was_stored_times_the_scale():
    # the oracle's fp8 read is the dequantized float32 pool: same result as a float32 pool of those values
    k_pages, v_pages, table, gen = _fp8_pool([9, 20], 4, 1, 16, torch.float8_e4m3fn, seed=1)
    q = torch.randn(2, 2, 16, generator=gen)
    lens = torch.tensor([9, 20])
    got = decode_attention_ref(q, k_pages, v_pages, table, lens, 0.25, k_scale=K_SCALE, v_scale=V_SCALE)
    want = decode_attention_ref(q, k_pages.float() * K_SCALE, v_pages.float() * V_SCALE, table, lens, 0.25)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_an_fp8_pool_needs_its_scales():
    k_pages, v_pages, table, gen = _fp8_pool([3], 4, 1, 16, torch.float8_e5m2, seed=2)
    q = torch.randn(1, 1, 16, generator=gen)
    with pytest.raises(AssertionError, match="needs k_scale"):
        decode_attention(q, k_pages, v_pages, table, torch.tensor([3]), 0.25)
