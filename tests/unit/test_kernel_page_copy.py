"""kernels.page_copy against its torch oracle and kvtransfer.staging's CPU path (Triton interpreter).

Pools hold random bit patterns (NaNs with payloads, infinities, subnormals, -0 included), and
everything is compared as integers: the kernels copy bits. Output buffers start poisoned.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels.page_copy import (
    gather_kv_pages,
    gather_kv_pages_ref,
    scatter_kv_pages,
    scatter_kv_pages_ref,
)
from pdserve.kvtransfer.layout import MessageSpec
from pdserve.kvtransfer.staging import gather_pages, scatter_pages
from pdserve.shared.engine.kv_pool import KVPoolShape, PagedKVPool

SHAPE = KVPoolShape(num_layers=5, num_pages=11, page_size=3, num_kv_heads=2, head_dim=20)
SHAPE_TAIL = (SHAPE.page_size, SHAPE.num_kv_heads, SHAPE.head_dim)
_BITS = {2: torch.int16, 4: torch.int32}
# bfloat16 works here although the interpreter cannot compute in it: the kernel sees int16.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PAGES = [[7, 2, 5], [3], [10, 0, 4, 8, 6, 1, 9]]
LAYERS = [(0, 5), (1, 4), (4, 5)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_BITS[t.element_size()])


def _random_bits(shape, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    width = 8 * torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(-(2 ** (width - 1)), 2 ** (width - 1), shape, generator=gen, dtype=torch.int64)
    return raw.to(_BITS[width // 8]).view(dtype)


def _pool(dtype: torch.dtype, seed: int) -> PagedKVPool:
    pool = PagedKVPool(SHAPE, dtype, "cpu")
    pool.kv.copy_(_random_bits(pool.kv.shape, dtype, torch.Generator().manual_seed(seed)))
    return pool


def _poisoned(shape, dtype: torch.dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype)


def _message(pages: list[int], layers: tuple[int, int]) -> MessageSpec:
    return MessageSpec(first_page=0, num_pages=len(pages), layer_begin=layers[0], layer_end=layers[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pages", PAGES)
@pytest.mark.parametrize("layers", LAYERS)
def test_gather_is_a_bit_copy(dtype, pages, layers):
    pool = _pool(dtype, seed=len(pages) + layers[0])
    before = _bits(pool.kv).clone()
    idx = torch.tensor(pages)
    shape = (layers[1] - layers[0], 2, len(pages), *pool.kv.shape[3:])
    out = _poisoned(shape, dtype)
    gather_kv_pages(pool.kv, idx, layers[0], layers[1], out)
    assert torch.equal(_bits(out), _bits(gather_kv_pages_ref(pool.kv, idx, *layers)))
    # The same bytes as the per-layer index_select path of staging (CPU pools keep using it).
    staged = _poisoned(shape, dtype)
    gather_pages(pool, pages, _message(pages, layers), staged)
    assert torch.equal(_bits(out), _bits(staged))
    assert torch.equal(_bits(pool.kv), before)  # the pool is only read


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pages", PAGES)
@pytest.mark.parametrize("layers", LAYERS)
def test_scatter_is_a_bit_copy(dtype, pages, layers):
    kernel_pool, ref_pool, staging_pool = (_pool(dtype, seed=5) for _ in range(3))
    idx = torch.tensor(pages)
    shape = (layers[1] - layers[0], 2, len(pages), *kernel_pool.kv.shape[3:])
    src = _random_bits(shape, dtype, torch.Generator().manual_seed(len(pages)))
    scatter_kv_pages(kernel_pool.kv, idx, layers[0], layers[1], src)
    scatter_kv_pages_ref(ref_pool.kv, idx, layers[0], layers[1], src)
    scatter_pages(staging_pool, pages, _message(pages, layers), src)
    # Whole pools compared: the pages written and every byte that must stay as it was.
    assert torch.equal(_bits(kernel_pool.kv), _bits(ref_pool.kv))
    assert torch.equal(_bits(kernel_pool.kv), _bits(staging_pool.kv))
    assert not torch.equal(_bits(kernel_pool.kv), _bits(_pool(dtype, seed=5).kv))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_round_trip_between_pools(dtype):
    """A message gathered from one pool and scattered into other pages of another reads back equal."""
    src_pool, dst_pool = _pool(dtype, seed=1), _pool(dtype, seed=2)
    src_pages, dst_pages = torch.tensor([9, 3, 4, 1, 6]), torch.tensor([2, 10, 5, 7, 8])
    buf = _poisoned((3, 2, 5, *SHAPE_TAIL), dtype)
    gather_kv_pages(src_pool.kv, src_pages, 2, 5, buf)
    scatter_kv_pages(dst_pool.kv, dst_pages.to(torch.int32), 2, 5, buf)
    back = _poisoned(buf.shape, dtype)
    gather_kv_pages(dst_pool.kv, dst_pages, 2, 5, back)
    assert torch.equal(_bits(back), _bits(buf))
    assert torch.equal(_bits(dst_pool.kv[:2]), _bits(_pool(dtype, seed=2).kv[:2]))  # other layers kept


def test_empty_message_and_launcher_checks():
    pool = _pool(torch.float16, seed=3)
    before = _bits(pool.kv).clone()
    gather_kv_pages(
        pool.kv, torch.tensor([], dtype=torch.long), 0, 5, torch.empty(5, 2, 0, *SHAPE_TAIL).half()
    )
    scatter_kv_pages(pool.kv, torch.tensor([1, 2]), 3, 3, torch.empty(0, 2, 2, *SHAPE_TAIL).half())
    assert torch.equal(_bits(pool.kv), before)
    idx = torch.tensor([1, 2])
    with pytest.raises(AssertionError):  # wrong page count
        gather_kv_pages(pool.kv, idx, 0, 2, torch.empty(2, 2, 3, *SHAPE_TAIL).half())
    with pytest.raises(AssertionError):  # wrong dtype
        gather_kv_pages(pool.kv, idx, 0, 2, torch.empty(2, 2, 2, *SHAPE_TAIL))
    with pytest.raises(AssertionError):  # not contiguous
        gather_kv_pages(pool.kv, idx, 0, 2, torch.empty(2, 2, 2, *SHAPE_TAIL).half().transpose(0, 2))
    with pytest.raises(AssertionError):  # layer range past the pool
        scatter_kv_pages(pool.kv, idx, 4, 6, torch.empty(2, 2, 2, *SHAPE_TAIL).half())
    with pytest.raises(AssertionError):  # not the pool's 6-d tensor
        gather_kv_pages(pool.k_buffers[0], idx, 0, 1, torch.empty(1, 2, 2, *SHAPE_TAIL).half())
