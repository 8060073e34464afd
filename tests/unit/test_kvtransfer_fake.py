"""The fake KV backend keeps every rule of kvtransfer/base.py: states, page order, aborts, timeouts,
close, misuse, layout checks, no leaked links. Pools hold random bits, so copies are checked exactly."""

from __future__ import annotations

import time

import pytest
import torch

from pdserve.kvtransfer import (
    FakeKVManager,
    FakeTransferHub,
    KVPoll,
    KVTransferConfig,
    KVTransferError,
    make_kv_manager,
)
from pdserve.shared.engine.kv_pool import KVPoolShape, PagedKVPool

SHAPE = KVPoolShape(num_layers=3, num_pages=24, page_size=4, num_kv_heads=2, head_dim=8)


def random_pool(seed: int, dtype: torch.dtype = torch.bfloat16, shape: KVPoolShape = SHAPE) -> PagedKVPool:
    pool = PagedKVPool(shape, dtype, "cpu")
    gen = torch.Generator().manual_seed(seed)
    for t in pool.k_buffers + pool.v_buffers:
        raw = t.view(torch.uint8)
        raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=gen))
    return pool


def pages_equal(src: PagedKVPool, src_pages: list[int], dst: PagedKVPool, dst_pages: list[int]) -> bool:
    return all(
        torch.equal(s[src_pages].view(torch.uint8), d[dst_pages].view(torch.uint8))
        for s, d in zip(src.k_buffers + src.v_buffers, dst.k_buffers + dst.v_buffers, strict=True)
    )


@pytest.fixture
def hub() -> FakeTransferHub:
    return FakeTransferHub()


@pytest.fixture
def pair(hub):
    prefill = FakeKVManager(random_pool(1), "P", hub)
    decode = FakeKVManager(random_pool(2), "D", hub)
    return prefill, decode


def test_states_move_forward_and_pages_arrive_in_order(hub, pair):
    prefill, decode = pair
    assert (prefill.endpoint, decode.endpoint) == ("fake://P", "fake://D")
    receiver = decode.make_receiver("r1", prefill.endpoint)
    sender = prefill.make_sender("r1", decode.endpoint)
    assert (sender.poll(), receiver.poll()) == (KVPoll.Bootstrapping, KVPoll.Bootstrapping)
    dst = [9, 3, 17, 4, 11]
    receiver.init(dst)
    assert (sender.poll(), receiver.poll()) == (KVPoll.WaitingForInput, KVPoll.WaitingForInput)
    sender.send([5, 6], is_last=False)
    assert (sender.poll(), receiver.poll()) == (KVPoll.Transferring, KVPoll.Transferring)
    assert receiver.first_output is None
    sender.send([20, 1, 13], is_last=True, first_output={"token": 42, "logprob": -0.5, "top": {7: -1.0}})
    assert (sender.poll(), receiver.poll()) == (KVPoll.Success, KVPoll.Success)
    assert receiver.first_output == {"token": 42, "logprob": -0.5, "top": {7: -1.0}}
    assert pages_equal(prefill.pool, [5, 6, 20, 1, 13], decode.pool, dst)
    assert (sender.failure_reason, receiver.failure_reason) == (None, None)
    assert hub.open_links() == 0


def test_sends_before_init_and_sender_made_after_init(hub, pair):
    prefill, decode = pair
    sender = prefill.make_sender("early-send", decode.endpoint)
    sender.send([2, 3], is_last=False)
    sender.send([4], is_last=True, first_output={"token": 1})
    assert sender.poll() == KVPoll.Bootstrapping  # nothing copied before the receiver said where
    receiver = decode.make_receiver("early-send", prefill.endpoint)
    receiver.init([7, 8, 9])
    assert (sender.poll(), receiver.poll(), receiver.first_output) == (
        KVPoll.Success,
        KVPoll.Success,
        {"token": 1},
    )
    assert pages_equal(prefill.pool, [2, 3, 4], decode.pool, [7, 8, 9])

    receiver = decode.make_receiver("late-sender", prefill.endpoint)
    receiver.init([10, 12])
    assert receiver.poll() == KVPoll.Bootstrapping  # no sender contact yet
    sender = prefill.make_sender("late-sender", decode.endpoint)
    assert (sender.poll(), receiver.poll()) == (KVPoll.WaitingForInput, KVPoll.WaitingForInput)
    sender.send([15, 16], is_last=True, first_output={"token": 2})
    assert receiver.poll() == KVPoll.Success
    assert pages_equal(prefill.pool, [15, 16], decode.pool, [10, 12])
    assert hub.open_links() == 0


def test_fewer_pages_than_allocated_and_empty_last_send(hub, pair):
    prefill, decode = pair
    receiver = decode.make_receiver("r", prefill.endpoint)
    sender = prefill.make_sender("r", decode.endpoint)
    receiver.init([1, 2, 3, 4, 5, 6])  # prompt pages plus a decode reserve
    before = decode.pool.k_buffers[0][[3, 4, 5, 6]].clone()
    sender.send([7], is_last=False)
    sender.send([], is_last=True, first_output={"token": 3})
    assert receiver.poll() == KVPoll.Success
    assert pages_equal(prefill.pool, [7], decode.pool, [1])
    assert torch.equal(decode.pool.k_buffers[0][[3, 4, 5, 6]].view(torch.uint8), before.view(torch.uint8))


def test_receiver_abort_mid_transfer_fails_both_and_stops_writes(hub, pair):
    prefill, decode = pair
    receiver = decode.make_receiver("r", prefill.endpoint)
    sender = prefill.make_sender("r", decode.endpoint)
    receiver.init([1, 2, 3])
    sender.send([4], is_last=False)
    receiver.abort("client went away")
    receiver.abort("again")  # idempotent: the first reason stays
    assert (receiver.poll(), receiver.failure_reason) == (KVPoll.Failed, "client went away")
    assert (sender.poll(), sender.failure_reason) == (KVPoll.Failed, "receiver aborted: client went away")
    page2 = decode.pool.v_buffers[2][2].clone()
    sender.send([5], is_last=True, first_output={"token": 9})  # a late send is a no-op
    assert torch.equal(decode.pool.v_buffers[2][2].view(torch.uint8), page2.view(torch.uint8))
    assert receiver.first_output is None
    assert hub.open_links() == 0


def test_sender_abort_before_receiver_exists_fails_it_when_made(hub, pair):
    prefill, decode = pair
    sender = prefill.make_sender("gone", decode.endpoint)
    sender.abort()
    assert (sender.poll(), sender.failure_reason) == (KVPoll.Failed, "aborted by the prefill worker")
    assert hub.open_links() == 1  # the tombstone waits for the receiver
    receiver = decode.make_receiver("gone", prefill.endpoint)
    assert (receiver.poll(), receiver.failure_reason) == (
        KVPoll.Failed,
        "sender aborted: aborted by the prefill worker",
    )
    assert hub.open_links() == 0


def test_receiver_abort_before_sender_exists(hub, pair):
    prefill, decode = pair
    receiver = decode.make_receiver("r", prefill.endpoint)
    receiver.abort("decode out of memory")
    sender = prefill.make_sender("r", decode.endpoint)
    assert (sender.poll(), sender.failure_reason) == (KVPoll.Failed, "receiver aborted: decode out of memory")
    sender.send([1], is_last=True)  # no error, no effect
    assert hub.open_links() == 0


def test_too_many_pages_fails_both(hub, pair):
    prefill, decode = pair
    receiver = decode.make_receiver("r", prefill.endpoint)
    sender = prefill.make_sender("r", decode.endpoint)
    receiver.init([1, 2])
    sender.send([3, 4, 5], is_last=True)
    assert (sender.poll(), receiver.poll()) == (KVPoll.Failed, KVPoll.Failed)
    assert sender.failure_reason == "3 pages sent, the receiver allocated 2"
    assert receiver.failure_reason == "3 pages sent, the receiver allocated 2"
    assert hub.open_links() == 0


def test_timeout_fails_both_sides(hub):
    config = KVTransferConfig(transfer_timeout_s=0.05)
    prefill = FakeKVManager(random_pool(1), "P", hub, config)
    decode = FakeKVManager(random_pool(2), "D", hub, config)
    receiver = decode.make_receiver("slow", prefill.endpoint)
    sender = prefill.make_sender("slow", decode.endpoint)
    receiver.init([1])
    sender.send([2], is_last=False)
    time.sleep(0.06)
    assert receiver.poll() == KVPoll.Failed
    assert receiver.failure_reason == "transfer did not finish within 0.05 s (transfer_timeout_s)"
    assert sender.poll() == KVPoll.Failed
    assert (
        sender.failure_reason == "peer timed out: transfer did not finish within 0.05 s (transfer_timeout_s)"
    )
    assert hub.open_links() == 0


def test_close_fails_the_peers_transfers(hub, pair):
    prefill, decode = pair
    r1 = decode.make_receiver("a", prefill.endpoint)
    s1 = prefill.make_sender("a", decode.endpoint)
    r1.init([1])
    s2 = prefill.make_sender("b", decode.endpoint)  # its receiver was never made
    prefill.close()
    assert (s1.poll(), s1.failure_reason) == (KVPoll.Failed, "KV manager closed")
    assert (r1.poll(), r1.failure_reason) == (KVPoll.Failed, "KV peer fake://P closed")
    assert s2.poll() == KVPoll.Failed
    with pytest.raises(KVTransferError, match="closed"):
        prefill.make_sender("c", decode.endpoint)
    with pytest.raises(KVTransferError, match="no fake KV manager"):
        decode.make_receiver("c", prefill.endpoint)
    assert hub.open_links() == 0


def test_layout_mismatch_fails(hub):
    prefill = FakeKVManager(random_pool(1, torch.float16), "P", hub)
    decode = FakeKVManager(random_pool(2, torch.bfloat16), "D", hub)
    receiver = decode.make_receiver("r", prefill.endpoint)
    sender = prefill.make_sender("r", decode.endpoint)
    receiver.init([1])
    assert receiver.poll() == KVPoll.Failed
    assert receiver.failure_reason.startswith(
        "KV cache dtype mismatch: the prefill worker stores float16, the decode worker bfloat16"
    )
    assert sender.poll() == KVPoll.Failed


def test_misuse_raises_in_the_caller(hub, pair):
    prefill, decode = pair
    receiver = decode.make_receiver("r", prefill.endpoint)
    sender = prefill.make_sender("r", decode.endpoint)
    receiver.init([1, 2])
    with pytest.raises(RuntimeError, match="init\\(\\) called twice"):
        receiver.init([3])
    with pytest.raises(ValueError, match="first_output goes with the last"):
        sender.send([1], is_last=False, first_output={"token": 1})
    with pytest.raises(TypeError, match="not msgpack-able"):
        sender.send([1], is_last=True, first_output={"token": object()})
    sender.send([1], is_last=True, first_output={"token": 1})
    with pytest.raises(RuntimeError, match="after the call with is_last=True"):
        sender.send([2], is_last=True)
    decode.make_receiver("x", prefill.endpoint)
    with pytest.raises(KVTransferError, match="already in progress"):
        decode.make_receiver("x", prefill.endpoint)
    with pytest.raises(KVTransferError, match="no fake KV manager"):
        prefill.make_sender("r2", "fake://nobody")
    with pytest.raises(KVTransferError, match="already registered"):
        FakeKVManager(random_pool(3), "P", hub)


def test_retry_with_the_same_rid_after_failure(hub, pair):
    prefill, decode = pair
    receiver = decode.make_receiver("r", prefill.endpoint)
    sender = prefill.make_sender("r", decode.endpoint)
    receiver.init([1])
    sender.abort()
    receiver = decode.make_receiver("r", prefill.endpoint)
    sender = prefill.make_sender("r", decode.endpoint)
    receiver.init([2])
    sender.send([3], is_last=True, first_output={"token": 4})
    assert (sender.poll(), receiver.poll()) == (KVPoll.Success, KVPoll.Success)
    assert pages_equal(prefill.pool, [3], decode.pool, [2])


def test_ranks_agree_by_taking_the_minimum():
    assert min(KVPoll.Success, KVPoll.Transferring, KVPoll.WaitingForInput) == KVPoll.WaitingForInput
    assert min(KVPoll.Success, KVPoll.Failed) == KVPoll.Failed
    assert list(KVPoll) == sorted(KVPoll)


def test_factory(hub):
    manager = make_kv_manager("fake", random_pool(1), "W", hub=hub)
    assert isinstance(manager, FakeKVManager) and manager.endpoint == "fake://W"
    assert hub.manager("fake://W") is manager
    # warm-up: a manager alone in a private hub sends to itself
    alone = make_kv_manager("fake", random_pool(2), "warm")
    receiver = alone.make_receiver("w", alone.endpoint)
    sender = alone.make_sender("w", alone.endpoint)
    receiver.init([10, 11])
    sender.send([1, 2], is_last=True, first_output={})
    assert receiver.poll() == KVPoll.Success
    assert pages_equal(alone.pool, [1, 2], alone.pool, [10, 11])
    with pytest.raises(ValueError, match="unknown KV transfer backend 'rdma': choose one of fake, zmq, nccl"):
        make_kv_manager("rdma", random_pool(1), "W")
    with pytest.raises(TypeError, match="takes no option port"):
        make_kv_manager("fake", random_pool(1), "W2", port=5)
