"""Writing K/V into an fp8 pool (kernels.fp8_kv rules) under the Triton interpreter: store_kv and the
fused rope + store, bit for bit against their torch oracles, for float8_e4m3fn and float8_e5m2.

Inputs span fp8's whole range on purpose: values whose mantissa carries into the exponent when
rounded (the interpreter's own conversion gets those wrong), subnormals, exact ties, and values
past the format's largest finite one (clamped). Caches start as NaN bytes, so a slot written that
should not be, or not written that should, fails the byte comparison.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels.fp8_kv_format import FP8_MAX, quantize_kv_ref
from pdserve.kernels.kv_store import store_kv, store_kv_ref
from pdserve.kernels.rope import rotary_store_kv, rotary_store_kv_ref
from pdserve.shared.models.rope import RopeConfig, RotaryEmbedding

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]


def _wide_values(shape: tuple[int, ...], fp8: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random signs and magnitudes from far below fp8's smallest subnormal to 2x its largest value."""
    limit = FP8_MAX[fp8]
    exponent = torch.rand(shape, generator=gen) * (torch.log2(torch.tensor(2 * limit)) + 20) - 20
    sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
    return sign * torch.exp2(exponent)


def _nan_caches(num_pages: int, page_size: int, heads: int, dim: int, fp8: torch.dtype):
    k_cache = torch.full((num_pages, page_size, heads, dim), float("nan")).to(fp8)
    return k_cache, k_cache.clone()


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


@pytest.mark.parametrize("fp8", FP8)
def test_reference_rounds_ties_and_carries_as_the_format_does(fp8):
    one = torch.ones(())
    if fp8 == torch.float8_e4m3fn:  # 3 mantissa bits: 120, 128 are neighbours; 124 ties to 128
        x, want = torch.tensor([124.0, 500.0, -1e9, 2.0**-10]), [128.0, 448.0, -448.0, 0.0]
    else:  # 2 mantissa bits: 112, 128 are neighbours; 120 ties to 128
        x, want = torch.tensor([120.0, 6e4, -1e9, 2.0**-18]), [128.0, 57344.0, -57344.0, 0.0]
    assert quantize_kv_ref(x, one, fp8).float().tolist() == want
    half = torch.tensor(0.5)
    assert quantize_kv_ref(torch.tensor([3.0]), half, fp8).float().tolist() == [6.0]  # x / scale


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("src_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_pages,page_size,heads,dim,tokens", [(6, 4, 3, 24, 13), (5, 16, 1, 80, 1)])
def test_store_kv_is_bit_exact(fp8, src_dtype, num_pages, page_size, heads, dim, tokens):
    gen = torch.Generator().manual_seed(num_pages + tokens)
    qkv = _wide_values((tokens, 3 * heads * dim), fp8, gen).to(src_dtype)
    k = qkv[:, heads * dim : 2 * heads * dim].view(tokens, heads, dim)  # strided, as a fused qkv's
    v = qkv[:, 2 * heads * dim :].view(tokens, heads, dim)
    slots = torch.randperm(num_pages * page_size, generator=gen)[:tokens]
    k_scale, v_scale = torch.tensor([0.37]), torch.tensor([3.1])
    k_cache, v_cache = _nan_caches(num_pages, page_size, heads, dim, fp8)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv(k_cache, v_cache, slots, k, v, k_scale, v_scale)
    store_kv_ref(k_ref, v_ref, slots, k, v, k_scale, v_scale)
    assert torch.equal(_bytes(k_cache), _bytes(k_ref)) and torch.equal(_bytes(v_cache), _bytes(v_ref))
    stored = k_cache.view(-1, heads, dim)[slots].float()
    assert stored.abs().max() <= FP8_MAX[fp8] and not stored.isnan().any()


def test_store_kv_demands_scales_for_fp8_only():
    k_cache, v_cache = _nan_caches(2, 4, 1, 16, torch.float8_e4m3fn)
    k = torch.randn(1, 1, 16)
    slots = torch.tensor([5])
    with pytest.raises(AssertionError, match="needs k_scale"):
        store_kv(k_cache, v_cache, slots, k, k)
    with pytest.raises(AssertionError, match="scales given"):
        store_kv(k_cache.float(), v_cache.float(), slots, k, k, torch.ones(1), torch.ones(1))


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("head_dim", [64, 80])
def test_rotary_store_kv_is_bit_exact(fp8, head_dim):
    gen = torch.Generator().manual_seed(head_dim)
    tokens, hq, hkv, num_pages, page_size = 11, 4, 2, 5, 4
    qkv = (torch.randn(tokens, (hq + 2 * hkv) * head_dim, generator=gen) * 40).to(torch.float16)
    q = qkv[:, : hq * head_dim].view(tokens, hq, head_dim)
    k = qkv[:, hq * head_dim : (hq + hkv) * head_dim].view(tokens, hkv, head_dim)
    v = qkv[:, (hq + hkv) * head_dim :].view(tokens, hkv, head_dim)
    rope = RotaryEmbedding(RopeConfig("default", 10000.0, head_dim))
    positions = torch.randint(0, 4000, (tokens,), generator=gen)
    slots = torch.randperm(num_pages * page_size, generator=gen)[:tokens]
    k_scale, v_scale = torch.tensor([0.05]), torch.tensor([0.2])
    k_cache, v_cache = _nan_caches(num_pages, page_size, hkv, head_dim, fp8)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    q_ref, kk_ref = q.clone(), k.clone()
    args = (positions, rope.inv_freq, rope.attention_scaling)
    rotary_store_kv(q, k, v, *args, k_cache, v_cache, slots, k_scale, v_scale)
    rotary_store_kv_ref(q_ref, kk_ref, v.clone(), *args, k_ref, v_ref, slots, k_scale, v_scale)
    assert torch.equal(_bytes(v_cache), _bytes(v_ref))
    # rope itself may differ from its oracle by an ulp of float16 (kernels.rope); where the rotated
    # k agrees, so do the stored fp8 bytes
    same_k = (k == kk_ref).all(dim=-1)  # [T, Hkv]
    got = k_cache.view(-1, hkv, head_dim)[slots]
    want = k_ref.view(-1, hkv, head_dim)[slots]
    assert same_k.float().mean() > 0.5
    assert torch.equal(_bytes(got[same_k]), _bytes(want[same_k]))
    assert torch.equal(quantize_kv_ref(k, k_scale, fp8).view(torch.uint8), _bytes(got))
