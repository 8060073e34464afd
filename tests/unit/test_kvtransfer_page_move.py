"""kvtransfer.page_move (the cuda_ipc pool-to-pool copy) against its torch oracle (Triton interpreter).

Both pools hold random bit patterns (NaNs with payloads, infinities, -0 included) and are compared
as integers: the kernel copies bits. Pools of different page counts, pages in any order, layer
ranges that start and end inside the pool, a page size whose bytes only divide into 2-byte words;
pages outside the destination list stay as they were.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from pdserve.kvtransfer.page_move import _word, move_kv_pages, move_kv_pages_ref

_BITS = {2: torch.int16, 4: torch.int32}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PAGE_SHAPES = [(3, 2, 20), (1, 1, 3), (4, 2, 8)]  # page_size, heads, head_dim
MOVES = [([7, 2, 5], [0, 12, 3]), ([3], [9]), ([10, 0, 4, 8, 6, 1, 9], [13, 5, 2, 11, 1, 7, 6])]
LAYERS = [(0, 5), (1, 4), (4, 5)]


def _random_pool(pages: int, page_shape, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    width = 8 * torch.empty((), dtype=dtype).element_size()
    shape = (5, 2, pages, *page_shape)
    raw = torch.randint(-(2 ** (width - 1)), 2 ** (width - 1), shape, generator=gen, dtype=torch.int64)
    return raw.to(_BITS[width // 8]).view(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_BITS[t.element_size()])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_shape", PAGE_SHAPES)
@pytest.mark.parametrize("moves", MOVES)
@pytest.mark.parametrize("layers", LAYERS)
def test_kernel_equals_the_oracle_bit_for_bit(dtype, page_shape, moves, layers):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((dtype, page_shape, moves, layers)).encode()))
    src = _random_pool(11, page_shape, dtype, gen)
    dst = _random_pool(14, page_shape, dtype, gen)
    expected = dst.clone()
    src_pages, dst_pages = torch.tensor(moves[0]), torch.tensor(moves[1], dtype=torch.int32)
    move_kv_pages_ref(src, src_pages, expected, dst_pages, *layers)
    before = dst.clone()
    move_kv_pages(src, src_pages, dst, dst_pages, *layers, use_kernel=True)
    assert torch.equal(_bits(dst), _bits(expected))
    untouched = [p for p in range(14) if p not in moves[1]]
    assert torch.equal(_bits(dst[:, :, untouched]), _bits(before[:, :, untouched]))
    outside = [i for i in range(5) if not layers[0] <= i < layers[1]]
    assert torch.equal(_bits(dst[outside]), _bits(before[outside]))


def test_cpu_path_is_the_oracle_and_empty_moves_do_nothing():
    gen = torch.Generator().manual_seed(3)
    src = _random_pool(6, (2, 1, 4), torch.float16, gen)
    dst = _random_pool(6, (2, 1, 4), torch.float16, gen)
    before = dst.clone()
    empty = torch.tensor([], dtype=torch.int64)
    move_kv_pages(src, empty, dst, empty, 0, 5, use_kernel=True)
    move_kv_pages(src, torch.tensor([1]), dst, torch.tensor([2]), 2, 2)
    assert torch.equal(_bits(dst), _bits(before))
    move_kv_pages(src, torch.tensor([4, 1]), dst, torch.tensor([0, 5]), 0, 5)
    assert torch.equal(_bits(dst[:, :, [0, 5]]), _bits(src[:, :, [4, 1]]))


def test_widest_word_and_shape_checks():
    assert _word(torch.zeros(2, 2, 3, 4, 2, 8, dtype=torch.bfloat16)) == torch.int64  # 128-byte pages
    assert _word(torch.zeros(2, 2, 3, 1, 1, 3, dtype=torch.float16)) == torch.int16  # 6-byte pages
    src = torch.zeros(2, 2, 3, 4, 2, 8)
    with pytest.raises(AssertionError, match="page layouts differ"):
        move_kv_pages(src, torch.tensor([0]), torch.zeros(2, 2, 3, 4, 2, 4), torch.tensor([0]), 0, 2)
    with pytest.raises(AssertionError):
        move_kv_pages(src, torch.tensor([0, 1]), torch.zeros_like(src), torch.tensor([0]), 0, 2)
