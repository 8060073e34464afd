"""kernels.kv_store.store_kv against its torch oracle and PagedKVPool's CPU store (Triton interpreter).

Caches start as NaN, so a slot the kernel should write and does not fails, and a slot it should
leave alone and touches fails too. Also the pool's single-tensor layout that the kernels rely on.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels.kv_store import store_kv, store_kv_ref
from pdserve.shared.engine.kv_pool import KVPoolShape, PagedKVPool


def _qkv_views(tokens: int, heads: int, dim: int, dtype: torch.dtype, gen: torch.Generator):
    """k and v as the model hands them over: strided slices of one fused q/k/v projection output."""
    q_size = (2 * heads + 1) * dim
    qkv = torch.randn(tokens, q_size + 2 * heads * dim, generator=gen).to(dtype)
    k = qkv[:, q_size : q_size + heads * dim].view(tokens, heads, dim)
    v = qkv[:, q_size + heads * dim :].view(tokens, heads, dim)
    return k, v


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit where written, and NaN (never written) in the same places."""
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a[~nan], b[~nan])


@pytest.mark.parametrize(
    "num_pages,page_size,heads,dim,tokens",
    [(6, 4, 3, 24, 13), (5, 16, 1, 80, 1), (9, 1, 8, 128, 9), (4, 5, 2, 40, 20), (3, 7, 5, 96, 21)],
)
@pytest.mark.parametrize(
    "src_dtype,cache_dtype",
    [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.float32, torch.float16)],
)
@pytest.mark.parametrize("strided", [True, False])
def test_store_kv_matches_reference(
    num_pages, page_size, heads, dim, tokens, src_dtype, cache_dtype, strided
):
    gen = torch.Generator().manual_seed(num_pages * 100 + tokens)
    k, v = _qkv_views(tokens, heads, dim, src_dtype, gen)
    if not strided:
        k, v = k.contiguous(), v.contiguous()
    slots = torch.randperm(num_pages * page_size, generator=gen)[:tokens]
    k_cache = torch.full((num_pages, page_size, heads, dim), float("nan"), dtype=cache_dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv(k_cache, v_cache, slots, k, v)
    store_kv_ref(k_ref, v_ref, slots, k, v)
    assert _same(k_cache, k_ref) and _same(v_cache, v_ref)
    assert int((~k_cache.isnan()).sum()) == tokens * heads * dim
    flat_k = k_cache.view(-1, heads, dim)
    assert torch.equal(flat_k[slots], k.to(cache_dtype))  # cast rounds like Tensor.to


def test_int32_slots_and_empty_batch():
    gen = torch.Generator().manual_seed(3)
    k, v = _qkv_views(5, 2, 16, torch.float32, gen)
    slots = torch.tensor([11, 0, 7, 3, 8], dtype=torch.int32)
    k_cache = torch.full((4, 3, 2, 16), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv(k_cache, v_cache, slots, k, v)
    store_kv_ref(k_ref, v_ref, slots, k, v)
    assert _same(k_cache, k_ref) and _same(v_cache, v_ref)
    store_kv(k_cache, v_cache, slots[:0], k[:0], v[:0])  # nothing to write, no launch
    assert _same(k_cache, k_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_equals_pool_store_cpu_path(dtype):
    """The kernel on a pool's layer buffers writes what PagedKVPool.store's torch path writes."""
    shape = KVPoolShape(num_layers=3, num_pages=6, page_size=4, num_kv_heads=2, head_dim=48)
    torch_pool, kernel_pool = PagedKVPool(shape, dtype, "cpu"), PagedKVPool(shape, dtype, "cpu")
    torch_pool.kv.fill_(float("nan"))
    kernel_pool.kv.fill_(float("nan"))
    gen = torch.Generator().manual_seed(9)
    for layer in (2, 0):
        k, v = _qkv_views(10, 2, 48, torch.float32, gen)
        slots = torch.randperm(24, generator=gen)[:10]
        torch_pool.store(layer, slots, k, v)
        store_kv(kernel_pool.k_buffers[layer], kernel_pool.v_buffers[layer], slots, k, v)
    assert _same(kernel_pool.kv, torch_pool.kv)
    assert torch_pool.kv[1].isnan().all()  # layer 1 untouched


def test_pool_is_one_tensor_of_views():
    shape = KVPoolShape(num_layers=4, num_pages=5, page_size=3, num_kv_heads=2, head_dim=8)
    pool = PagedKVPool(shape, torch.float16, "cpu")
    assert pool.kv.shape == (4, 2, 5, 3, 2, 8) and pool.kv.is_contiguous()
    assert pool.nbytes == 4 * 2 * 5 * 3 * 2 * 8 * 2  # counted once, not once per view as well
    assert pool.total_tokens == 4 * 3
    for layer in range(4):
        assert pool.k_buffers[layer].shape == (5, 3, 2, 8) and pool.k_buffers[layer].is_contiguous()
        assert pool.k_buffers[layer].data_ptr() == pool.kv[layer, 0].data_ptr()
        assert pool.v_buffers[layer].data_ptr() == pool.kv[layer, 1].data_ptr()
    gen = torch.Generator().manual_seed(1)
    k, v = torch.randn(4, 2, 8, generator=gen), torch.randn(4, 2, 8, generator=gen)
    pool.store(2, torch.tensor([3, 4, 5, 9]), k, v)  # pages 1 and 3
    assert torch.equal(pool.kv[2, 0, 1].reshape(-1, 2, 8), k[:3].half())
    assert torch.equal(pool.kv[2, 1, 3, 0], v[3].half())
    gk, gv = pool.gather(2, torch.tensor([1, 3]), 4)
    assert torch.equal(gk[:3], k[:3].half()) and torch.equal(gv[3], v[3].half())


def test_launcher_rejects_what_it_does_not_handle():
    k_cache = torch.zeros(2, 4, 2, 8)
    v_cache = torch.zeros(2, 4, 2, 8)
    k, v = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    slots = torch.tensor([0, 1, 2])
    with pytest.raises(AssertionError):
        store_kv(k_cache, v_cache, slots.float(), k, v)
    with pytest.raises(AssertionError):
        store_kv(k_cache, v_cache, slots, torch.randn(3, 8, 2).transpose(1, 2), v)  # last dim strided
    with pytest.raises(AssertionError):
        store_kv(k_cache, v_cache, slots[:2], k, v)
    with pytest.raises(AssertionError):
        store_kv(k_cache.transpose(0, 1), v_cache, slots, k, v)
