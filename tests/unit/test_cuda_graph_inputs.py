"""The decode graphs' host-side inputs (no GPU needed): buckets and the packing of a step."""

from __future__ import annotations

import torch

from pdserve.shared.engine.cuda_graph_runner import DecodeInputs, batch_size_buckets, pack_decode_inputs


def test_buckets():
    assert batch_size_buckets(1) == [1]
    assert batch_size_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert batch_size_buckets(160)[-3:] == [144, 152, 160]
    for max_bs in (1, 3, 8, 64, 160):
        buckets = batch_size_buckets(max_bs)
        assert buckets[-1] == max_bs and all(any(b >= n for b in buckets) for n in range(1, max_bs + 1))


def test_pack_pads_rows_and_columns():
    step = DecodeInputs(
        input_ids=[11, 12, 13], positions=[0, 17, 40], slots=[33, 49, 72], page_rows=[[2], [3, 5], [4, 6, 7]]
    )
    meta, table = pack_decode_inputs(step, bucket=4, width=3)
    assert meta.dtype == torch.int64 and table.dtype == torch.int32
    assert meta.tolist() == [[11, 12, 13, 0], [0, 17, 40, 0], [33, 49, 72, 0], [1, 18, 41, 0]]
    assert table.tolist() == [[2, 0, 0], [3, 5, 0], [4, 6, 7]]


def test_pack_a_full_bucket_matches_nested_tensors():
    gen = torch.Generator().manual_seed(0)
    bs, width = 64, 80
    lens = torch.randint(1, width + 1, (bs,), generator=gen).tolist()
    rows = [torch.randint(1, 10**6, (n,), generator=gen).tolist() for n in lens]
    positions = [16 * n - 1 for n in lens]
    step = DecodeInputs(list(range(bs)), positions, [p * 3 for p in positions], rows)
    meta, table = pack_decode_inputs(step, bucket=bs, width=width)
    want = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32)
    assert torch.equal(table, want)
    assert torch.equal(meta[3], torch.tensor(positions) + 1)
