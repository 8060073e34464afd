"""Head-slice transfers on one KV manager (kvtransfer/head_slice.py): a zmq manager moves single KV
heads of its pool, beside whole-pool transfers of the same rid with the same peer, bit-exact and
into nothing but the named heads; a slice pairing that does not fit fails by name; managers whose
copies need whole pools refuse a slice when the handle is made; a worker's rank opens one manager."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from pdserve.kvtransfer import KVPoll, KVTransferError
from pdserve.kvtransfer.cuda_ipc import CudaIpcKVManager
from pdserve.kvtransfer.head_slice import leg_rid
from pdserve.kvtransfer.rank_kv import RankKV
from pdserve.kvtransfer.zmq import ZmqKVManager
from pdserve.shared.engine.kv_pool import KVPoolShape, PagedKVPool

HEADS = 4
SHAPE = KVPoolShape(num_layers=3, num_pages=20, page_size=2, num_kv_heads=HEADS, head_dim=8)


def random_pool(seed: int) -> PagedKVPool:
    pool = PagedKVPool(SHAPE, torch.float16, "cpu")
    pool.kv.view(torch.int16).copy_(
        torch.randint(
            -(2**15), 2**15, pool.kv.shape, dtype=torch.int16, generator=torch.Generator().manual_seed(seed)
        )
    )
    return pool


def settle(handles, state: KVPoll, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(h.poll() == state for h in handles):
        assert time.monotonic() < deadline, [(h.poll(), h.failure_reason) for h in handles]
        time.sleep(0.002)


@pytest.fixture
def pair():
    prefill, decode = ZmqKVManager(random_pool(1), "P"), ZmqKVManager(random_pool(2), "D")
    yield prefill, decode
    prefill.close()
    decode.close()


def test_single_heads_and_the_whole_pool_move_side_by_side_bit_exact(pair):
    prefill, decode = pair
    src_pages, dst_pages = [3, 7, 1], [11, 4, 9]
    before = decode.pool.kv.clone()
    # head 2 of P into head 0 of D, head 0 of P into head 3 of D, and every head of pages 5, 6 into 15, 16
    moves = [((2, 3), (0, 1), leg_rid("r", 2)), ((0, 1), (3, 4), leg_rid("r", 0)), (None, None, "r")]
    pairs = []
    for src_heads, dst_heads, rid in moves:
        receiver = decode.make_receiver(rid, prefill.endpoint, dst_heads)
        receiver.init(dst_pages if src_heads else [15, 16])
        pairs.append((prefill.make_sender(rid, decode.endpoint, src_heads), receiver))
    settle([s for s, _ in pairs], KVPoll.WaitingForInput)
    for (sender, _), (src_heads, _, _) in zip(pairs, moves, strict=True):
        sender.send(src_pages if src_heads else [5, 6], is_last=True, first_output={"t": 1})
    settle([h for p in pairs for h in p], KVPoll.Success)
    expected = before.clone()
    src_idx, dst_idx = torch.tensor(src_pages), torch.tensor(dst_pages)
    expected[:, :, dst_idx, :, 0] = prefill.pool.kv[:, :, src_idx, :, 2]
    expected[:, :, dst_idx, :, 3] = prefill.pool.kv[:, :, src_idx, :, 0]
    expected[:, :, 15:17] = prefill.pool.kv[:, :, 5:7]
    assert torch.equal(decode.pool.kv.view(torch.int16), expected.view(torch.int16))
    assert pairs[0][1].first_output == {"t": 1}


def test_a_slice_of_two_heads_into_one_fails_by_its_layout(pair):
    prefill, decode = pair
    receiver = decode.make_receiver("r", prefill.endpoint, (1, 2))
    receiver.init([2])
    sender = prefill.make_sender("r", decode.endpoint, (0, 2))
    settle([sender, receiver], KVPoll.Failed)
    assert "KV layout mismatch" in sender.failure_reason


def test_heads_outside_the_pool_are_refused_when_the_handle_is_made(pair):
    prefill, decode = pair
    with pytest.raises(KVTransferError, match="head slice"):
        prefill.make_sender("r", decode.endpoint, (3, 5))


def test_a_manager_that_copies_whole_pools_refuses_a_head_slice():
    manager = CudaIpcKVManager(random_pool(3), "W")
    try:
        assert not manager.moves_head_slices
        with pytest.raises(KVTransferError, match="whole pools"):
            manager.make_receiver("r", "tcp://127.0.0.1:1", (0, 1))
    finally:
        manager.close()


def test_a_rank_opens_one_manager_whatever_its_kv_heads():
    threads_before = {t.name for t in threading.enumerate()}
    rank = RankKV.open("zmq", random_pool(4), "W", [4, 5, 6, 7])
    try:
        opened = {t.name for t in threading.enumerate()} - threads_before
        assert opened == {"kv-W"}
        endpoint = rank.endpoint()
        assert (endpoint.full, endpoint.heads, endpoint.slices) == (rank.full.endpoint, [4, 5, 6, 7], True)
    finally:
        rank.close()
