"""Message planning (kvtransfer/layout.py): exact plans, and for any sizes a plan covers every
(page, layer) cell exactly once, in order, within the byte limit."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from pdserve.kvtransfer.layout import KVLayout, MessageSpec, plan_messages, typed_view

LLAMA_8B = KVLayout(torch.bfloat16, num_layers=32, page_size=16, num_kv_heads=8, head_dim=128)


def test_llama_8b_sizes():
    assert LLAMA_8B.page_bytes == 32 * 1024
    assert LLAMA_8B.cell_bytes == 64 * 1024  # 128 KiB per token over 32 layers, 16 tokens a page
    # 1024 tokens = 64 pages = 128 MiB: 4 layers (16 MiB) per 16 MiB message
    plan = plan_messages(0, 64, LLAMA_8B, 16 << 20)
    assert plan == [MessageSpec(0, 64, l0, l0 + 4) for l0 in range(0, 32, 4)]
    assert {spec.nbytes(LLAMA_8B) for spec in plan} == {16 << 20}


def test_exact_plans():
    tiny = KVLayout(torch.float16, num_layers=3, page_size=2, num_kv_heads=1, head_dim=4)  # 32-byte cells
    assert plan_messages(5, 0, tiny, 1000) == []
    assert plan_messages(5, 2, tiny, 1000) == [MessageSpec(5, 2, 0, 3)]
    assert plan_messages(0, 3, tiny, 64) == [
        MessageSpec(0, 2, 0, 1),
        MessageSpec(0, 2, 1, 2),
        MessageSpec(0, 2, 2, 3),
        MessageSpec(2, 1, 0, 2),
        MessageSpec(2, 1, 2, 3),
    ]
    assert plan_messages(0, 2, tiny, 10) == [
        MessageSpec(p, 1, layer, layer + 1) for p in (0, 1) for layer in range(3)
    ]


@given(
    first=st.integers(0, 50),
    pages=st.integers(0, 40),
    layers=st.integers(1, 9),
    max_cells=st.integers(1, 100),
)
def test_plan_covers_every_cell_once_within_the_limit(first, pages, layers, max_cells):
    layout = KVLayout(torch.float32, layers, page_size=1, num_kv_heads=1, head_dim=1)  # 8-byte cells
    plan = plan_messages(first, pages, layout, max_cells * layout.cell_bytes)
    cells = [
        (p, layer)
        for s in plan
        for p in range(s.first_page, s.first_page + s.num_pages)
        for layer in range(s.layer_begin, s.layer_end)
    ]
    assert sorted(cells) == [(p, layer) for p in range(first, first + pages) for layer in range(layers)]
    assert len(set(cells)) == len(cells)
    assert all(s.cells <= max_cells for s in plan)
    assert [s.first_page for s in plan] == sorted(s.first_page for s in plan)  # pages in request order


def test_typed_view_is_raw_bytes_without_copy():
    raw = torch.arange(256, dtype=torch.uint8)
    spec = MessageSpec(0, 2, 0, 1)
    layout = KVLayout(torch.bfloat16, 1, 2, 1, 4)  # 2 x 2 x 2 x 1 x 4 bf16 = 64 bytes
    view = typed_view(raw, layout, spec)
    assert view.shape == (1, 2, 2, 2, 1, 4) and view.dtype == torch.bfloat16
    assert view.data_ptr() == raw.data_ptr()
    assert torch.equal(view.view(torch.uint8).flatten(), raw[:64])
