"""kernels.rope.rotary_store_kv against its torch oracle (Triton interpreter).

q, k and v are strided views of one fused qkv output, with a spare column block after v that must
come out untouched; caches start as NaN so a slot the kernel should write and does not fails, and
so does a slot it touches and should not. Padded rows (as in a CUDA-graph batch) point into page 0.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels.rope import rotary_store_kv, rotary_store_kv_ref
from pdserve.shared.models.rope import RopeConfig, RotaryEmbedding
from tests.helpers.kernel_checks import assert_matches_ref

HEAD_DIMS = [64, 80, 96, 128]
LLAMA31 = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _rope(head_dim: int, rope_type: str) -> RotaryEmbedding:
    if rope_type == "llama3":
        return RotaryEmbedding(RopeConfig("llama3", 500000.0, head_dim, **LLAMA31))
    return RotaryEmbedding(RopeConfig("default", 10000.0, head_dim))


def _fused_qkv(tokens: int, hq: int, hkv: int, d: int, dtype: torch.dtype, gen: torch.Generator):
    """(qkv, q, k, v): views of one [T, (hq + 2 hkv + 1) * d] output, a spare block of d at the end."""
    qkv = torch.randn(tokens, (hq + 2 * hkv + 1) * d, generator=gen).to(dtype)
    q = qkv[:, : hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(tokens, hkv, d)
    v = qkv[:, (hq + hkv) * d : (hq + 2 * hkv) * d].view(tokens, hkv, d)
    return qkv, q, k, v


def _slots(tokens: int, padded: int, num_pages: int, page_size: int, gen: torch.Generator) -> torch.Tensor:
    """Distinct slots outside page 0 for the real rows, then `padded` distinct slots inside page 0."""
    real = torch.randperm((num_pages - 1) * page_size, generator=gen)[: tokens - padded] + page_size
    return torch.cat((real, torch.arange(padded)))


def _nan_caches(num_pages: int, page_size: int, hkv: int, d: int, dtype: torch.dtype):
    k_cache = torch.full((num_pages, page_size, hkv, d), float("nan"), dtype=dtype)
    return k_cache, torch.full_like(k_cache, float("nan"))


def _assert_caches_match(got: torch.Tensor, want: torch.Tensor, written: int) -> None:
    """Written in exactly the oracle's places, with its values."""
    assert torch.equal(got.isnan(), want.isnan())
    assert int((~got.isnan()).sum()) == written
    assert_matches_ref(got[~got.isnan()], want[~want.isnan()])


def _run_both(q, k, v, positions, emb, slots, k_cache, v_cache):
    """Runs the kernel on (q, k, caches) and the oracle on clones; returns the oracle's tensors."""
    want = [t.clone() for t in (q, k, k_cache, v_cache)]
    rotary_store_kv_ref(
        want[0], want[1], v, positions, emb.inv_freq, emb.attention_scaling, want[2], want[3], slots
    )
    rotary_store_kv(q, k, v, positions, emb.inv_freq, emb.attention_scaling, k_cache, v_cache, slots)
    return want


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize(
    "dtype,cache_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16)]
)
@pytest.mark.parametrize(
    "heads,tokens,padded", [((4, 2), 11, 3), ((3, 1), 1, 0), ((40, 8), 5, 1), ((8, 8), 4, 0)]
)
def test_matches_reference(head_dim, dtype, cache_dtype, heads, tokens, padded):
    hq, hkv = heads
    gen = torch.Generator().manual_seed(head_dim * 31 + tokens)
    emb = _rope(head_dim, "llama3")
    qkv, q, k, v = _fused_qkv(tokens, hq, hkv, head_dim, dtype, gen)
    untouched = qkv[:, (hq + hkv) * head_dim :].clone()  # v and the spare block
    q_before = q.clone()
    positions = torch.randint(1, 131072, (tokens,), generator=gen)
    num_pages, page_size = 7, 4
    slots = _slots(tokens, padded, num_pages, page_size, gen)
    k_cache, v_cache = _nan_caches(num_pages, page_size, hkv, head_dim, cache_dtype)
    want_q, want_k, want_k_cache, want_v_cache = _run_both(q, k, v, positions, emb, slots, k_cache, v_cache)
    assert_matches_ref(q, want_q)
    assert_matches_ref(k, want_k)
    assert not torch.equal(q, q_before)  # rotated in place (no position is 0 here)
    written = tokens * hkv * head_dim
    _assert_caches_match(k_cache, want_k_cache, written)
    _assert_caches_match(v_cache, want_v_cache, written)
    assert torch.equal(qkv[:, (hq + hkv) * head_dim :], untouched)
    flat_k = k_cache.view(-1, hkv, head_dim)
    assert torch.equal(flat_k[slots], k)  # the cache holds the k that was written back, bit for bit
    assert torch.equal(v_cache.view(-1, hkv, head_dim)[slots], v)


@pytest.mark.parametrize("rope_type", ["default", "llama3"])
def test_float32_source_into_float16_cache_and_int32_indices(rope_type):
    """The cache takes the rotated k rounded to k's dtype, then to its own (as rope then store)."""
    gen = torch.Generator().manual_seed(5)
    emb = _rope(64, rope_type)
    _, q, k, v = _fused_qkv(6, 4, 2, 64, torch.float32, gen)
    positions = torch.tensor([0, 1, 7, 8191, 65536, 100000], dtype=torch.int32)
    slots = _slots(6, 2, 5, 3, gen).to(torch.int32)
    k_cache, v_cache = _nan_caches(5, 3, 2, 64, torch.float16)
    want_q, want_k, want_k_cache, want_v_cache = _run_both(q, k, v, positions, emb, slots, k_cache, v_cache)
    assert_matches_ref(q, want_q)
    assert_matches_ref(k, want_k)
    _assert_caches_match(k_cache, want_k_cache, 6 * 2 * 64)
    _assert_caches_match(v_cache, want_v_cache, 6 * 2 * 64)
    assert torch.equal(k_cache.view(-1, 2, 64)[slots.long()], k.half())


def test_empty_batch_launches_nothing():
    emb = _rope(64, "default")
    q, k, v = torch.randn(0, 4, 64), torch.randn(0, 2, 64), torch.randn(0, 2, 64)
    k_cache, v_cache = _nan_caches(2, 4, 2, 64, torch.float32)
    rotary_store_kv(
        q,
        k,
        v,
        torch.zeros(0, dtype=torch.int64),
        emb.inv_freq,
        1.0,
        k_cache,
        v_cache,
        torch.zeros(0, dtype=torch.int64),
    )
    assert k_cache.isnan().all() and v_cache.isnan().all()


def test_launcher_rejects_what_it_does_not_handle():
    emb = _rope(64, "default")
    q, k, v = torch.randn(3, 4, 64), torch.randn(3, 2, 64), torch.randn(3, 2, 64)
    positions, slots = torch.arange(3), torch.tensor([4, 5, 6])
    k_cache, v_cache = torch.zeros(3, 4, 2, 64), torch.zeros(3, 4, 2, 64)

    def call(**changes):
        args = {
            "q": q,
            "k": k,
            "v": v,
            "positions": positions,
            "inv_freq": emb.inv_freq,
            "attention_scaling": 1.0,
        }
        args.update(k_cache=k_cache, v_cache=v_cache, slots=slots)
        args.update(changes)
        rotary_store_kv(**args)

    for bad in (
        {"v": v[:2]},
        {"v": torch.randn(3, 64, 2).transpose(1, 2)},  # last dim strided
        {"k_cache": torch.zeros(3, 4, 1, 64), "v_cache": torch.zeros(3, 4, 1, 64)},  # head count
        {"k_cache": k_cache.transpose(0, 1)},
        {"v_cache": v_cache.half()},
        {"slots": slots.float()},
        {"slots": slots[:2]},
        {"k": k.half()},
        {"positions": positions.float()},
    ):
        with pytest.raises(AssertionError):
            call(**bad)
