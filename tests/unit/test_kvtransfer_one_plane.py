"""KV transfer of a one-plane pool (MLA's compressed KV: V is read out of K), bit for bit.

A message of a one-plane pool is `[layers, 1, pages, ...]`: half the bytes of a two-plane pool of
the same page shape. The host staging copies, the page-copy kernel (interpreter) and the
pool-to-pool page move (kernel and torch) all move exactly the pages asked for, and never touch
another page.
"""

from __future__ import annotations

import torch

from pdserve.kernels.page_copy import gather_kv_pages, gather_kv_pages_ref, scatter_kv_pages
from pdserve.kvtransfer.layout import KVLayout, MessageSpec, plan_messages
from pdserve.kvtransfer.page_move import move_kv_pages
from pdserve.kvtransfer.staging import gather_pages, scatter_pages
from pdserve.shared.engine.kv_pool import KVPoolShape, PagedKVPool

SHAPE = KVPoolShape(num_layers=3, num_pages=12, page_size=4, num_kv_heads=1, head_dim=40, num_planes=1)


def _pool(seed: int) -> PagedKVPool:
    pool = PagedKVPool(SHAPE, torch.float16, "cpu")
    pool.kv.copy_(torch.randn(pool.kv.shape, generator=torch.Generator().manual_seed(seed)))
    return pool


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


def test_layout_and_budget_count_one_plane():
    pool = _pool(0)
    layout = KVLayout.of(pool)
    two_planes = KVLayout(torch.float16, 3, 4, 1, 40)
    assert layout.num_planes == 1 and layout.cell_bytes == layout.page_bytes == two_planes.cell_bytes // 2
    assert layout.to_wire()["planes"] == 1 and layout.to_wire() != two_planes.to_wire()
    spec = MessageSpec(first_page=0, num_pages=2, layer_begin=0, layer_end=3)
    assert spec.shape(layout) == (3, 1, 2, 4, 1, 40) and spec.nbytes(layout) == 6 * 4 * 40 * 2
    assert sum(s.nbytes(layout) for s in plan_messages(0, 5, layout, 2 * layout.cell_bytes)) == 15 * 320
    assert pool.nbytes == 3 * 12 * 4 * 40 * 2 and SHAPE.bytes_per_token == 3 * 40
    budget = 3 * 4 * 40 * 2 * 10  # ten pages of one plane
    assert KVPoolShape.pages_for_budget(budget, 3, 4, 1, 40, torch.float16, num_planes=1) == 10
    assert KVPoolShape.pages_for_budget(budget, 3, 4, 1, 40, torch.float16) == 5


def test_staging_gather_then_scatter_moves_only_the_pages():
    src, dst = _pool(1), _pool(2)
    before = dst.kv.clone()
    layout, spec = KVLayout.of(src), MessageSpec(0, 3, 1, 3)
    buf = torch.empty(spec.shape(layout), dtype=torch.float16)
    gather_pages(src, [5, 2, 9], spec, buf)
    assert torch.equal(_bits(buf), _bits(src.kv[1:3, :, [5, 2, 9]]))
    scatter_pages(dst, [3, 8, 1], spec, buf)
    assert torch.equal(_bits(dst.kv[1:3, :, [3, 8, 1]]), _bits(src.kv[1:3, :, [5, 2, 9]]))
    untouched = torch.ones(dst.kv.shape[:3], dtype=torch.bool)
    untouched[1:3, :, [3, 8, 1]] = False
    assert torch.equal(_bits(dst.kv[untouched]), _bits(before[untouched]))


def test_page_copy_kernel_one_plane():
    src, dst = _pool(3), _pool(4)
    pages = torch.tensor([4, 11, 1])
    out = torch.empty(2, 1, 3, 4, 1, 40, dtype=torch.float16)
    gather_kv_pages(src.kv, pages, 1, 3, out)
    assert torch.equal(_bits(out), _bits(gather_kv_pages_ref(src.kv, pages, 1, 3)))
    before = dst.kv.clone()
    scatter_kv_pages(dst.kv, torch.tensor([6, 0, 9]), 1, 3, out)
    assert torch.equal(_bits(dst.kv[1:3, :, [6, 0, 9]]), _bits(out))
    assert torch.equal(_bits(dst.kv[0]), _bits(before[0]))


def test_page_move_one_plane_kernel_and_torch():
    for use_kernel in (True, False):
        src, dst = _pool(5), _pool(6)
        before = dst.kv.clone()
        move_kv_pages(
            src.kv, torch.tensor([2, 7]), dst.kv, torch.tensor([10, 3]), 0, 2, use_kernel=use_kernel
        )
        assert torch.equal(_bits(dst.kv[0:2, :, [10, 3]]), _bits(src.kv[0:2, :, [2, 7]]))
        assert torch.equal(_bits(dst.kv[2]), _bits(before[2]))
        assert torch.equal(_bits(dst.kv[:, :, 5]), _bits(before[:, :, 5]))
