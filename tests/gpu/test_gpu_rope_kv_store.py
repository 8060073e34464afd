"""On a CUDA GPU: kernels.rope.rotary_store_kv in bfloat16 (and float32) against its torch oracle, on a
Llama-3.1-8B-shaped layer (GQA 32/8, llama3 rope) and awkward shapes, and replayed from a CUDA graph.

q, k, v are strided views of one fused qkv output; caches start as NaN. bfloat16: the kernel and
the oracle round in the same places, but hardware cos/sin may flip a rounding now and then, so
values agree within one ulp (2**-7 relative) and nearly all bit for bit. The cache must hold
exactly the k written back and exactly v, whatever the rounding.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels.rope import rotary_store_kv, rotary_store_kv_ref
from pdserve.shared.models.rope import RopeConfig, RotaryEmbedding

pytestmark = pytest.mark.gpu

DEVICE = "cuda"


def _case(tokens: int, hq: int, hkv: int, d: int, dtype: torch.dtype, num_pages: int, seed: int):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, generator=gen, device=DEVICE).to(dtype)
    q = qkv[:, : hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(tokens, hkv, d)
    v = qkv[:, (hq + hkv) * d :].view(tokens, hkv, d)
    positions = torch.randint(1, 131072, (tokens,), generator=gen, device=DEVICE)
    # the last row is a CUDA-graph padding row: slot 0, in page 0
    slots = torch.randperm((num_pages - 1) * 16, generator=gen, device=DEVICE)[:tokens] + 16
    slots[-1] = 0
    k_cache = torch.full((num_pages, 16, hkv, d), float("nan"), dtype=dtype, device=DEVICE)
    return q, k, v, positions, slots, k_cache, torch.full_like(k_cache, float("nan"))


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        return
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-6)
    assert (got != want).float().mean().item() < 0.005


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128])
@pytest.mark.parametrize("tokens,hq,hkv", [(1, 32, 8), (64, 32, 8), (2048, 32, 8), (7, 14, 2), (33, 9, 3)])
def test_matches_reference(dtype, head_dim, tokens, hq, hkv):
    cfg = RopeConfig("llama3", 500000.0, head_dim, factor=8.0, original_max_position_embeddings=8192)
    emb = RotaryEmbedding(cfg).to(DEVICE)
    q, k, v, positions, slots, k_cache, v_cache = _case(
        tokens, hq, hkv, head_dim, dtype, 200, tokens + head_dim
    )
    want = [t.clone() for t in (q, k, k_cache, v_cache)]
    rotary_store_kv_ref(
        want[0], want[1], v, positions, emb.inv_freq, emb.attention_scaling, want[2], want[3], slots
    )
    rotary_store_kv(q, k, v, positions, emb.inv_freq, emb.attention_scaling, k_cache, v_cache, slots)
    _assert_close(q, want[0])
    _assert_close(k, want[1])
    for got, oracle in ((k_cache, want[2]), (v_cache, want[3])):
        assert torch.equal(got.isnan(), oracle.isnan())  # written exactly where the oracle writes
    hd = (hkv, head_dim)
    assert torch.equal(k_cache.view(-1, *hd)[slots], k) and torch.equal(v_cache.view(-1, *hd)[slots], v)


def test_replays_from_a_cuda_graph():
    emb = RotaryEmbedding(RopeConfig("default", 10000.0, 128)).to(DEVICE)
    q, k, v, positions, slots, k_cache, v_cache = _case(8, 32, 8, 128, torch.bfloat16, 40, 3)
    inputs = [t.clone() for t in (q, k, v)]
    rotary_store_kv(q, k, v, positions, emb.inv_freq, 1.0, k_cache, v_cache, slots)  # compiles outside
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rotary_store_kv(q, k, v, positions, emb.inv_freq, 1.0, k_cache, v_cache, slots)
    eager = [t.clone() for t in (q, k, k_cache, v_cache)]
    for static, fresh in zip((q, k, v), inputs):
        static.copy_(fresh)
    k_cache.fill_(float("nan"))
    v_cache.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip((q, k, k_cache, v_cache), eager):
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
