"""base.py's rules on the cuda_ipc backend with two real managers (their own I/O threads) in one
process, CPU pools (the sender writes into the receiver's pool through the same-host plane and
its write gate, as it does across processes):

- many interleaved requests, odd page counts in random order, arrive bit-exact;
- the sender is done when its last copy is, before the receiver has read a header (no Ack wait);
- nothing is written into a receiver's pages once abort() returned, the sender's or the
  receiver's; a receiver whose page ids repeat is refused before anything is written;
- closing either manager fails the other side's transfers at once, and the sender drops its
  mapping of a receiver that is gone or idle; every write-gate slot is closed in the end.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from pdserve.kvtransfer import KVPoll, KVTransferConfig
from pdserve.kvtransfer.cuda_ipc import CudaIpcKVManager
from pdserve.shared.engine.kv_pool import KVPoolShape, PagedKVPool

SHAPE = KVPoolShape(num_layers=4, num_pages=400, page_size=4, num_kv_heads=2, head_dim=16)


def random_pool(seed: int) -> PagedKVPool:
    pool = PagedKVPool(SHAPE, torch.bfloat16, "cpu")
    gen = torch.Generator().manual_seed(seed)
    pool.kv.view(torch.int16).copy_(
        torch.randint(-(2**15), 2**15, pool.kv.shape, dtype=torch.int16, generator=gen)
    )
    return pool


def bits(pool: PagedKVPool) -> torch.Tensor:
    return pool.kv.view(torch.int16).clone()


def wait_until(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.0005)


@pytest.fixture
def pair() -> Iterator[tuple[CudaIpcKVManager, CudaIpcKVManager]]:
    prefill = CudaIpcKVManager(random_pool(1), "P")
    decode = CudaIpcKVManager(random_pool(2), "D")
    yield prefill, decode
    prefill.close()
    decode.close()


def test_many_interleaved_requests_bit_exact(pair):
    prefill, decode = pair
    rng = random.Random(5)
    src_free, dst_free = list(range(1, 400)), list(range(1, 400))
    rng.shuffle(src_free)
    rng.shuffle(dst_free)
    before = bits(decode.pool)
    requests = []
    for i in range(20):
        n = rng.choice([1, 3, 5, 7, 9, 11, 13])
        src, dst = [src_free.pop() for _ in range(n)], [dst_free.pop() for _ in range(n + rng.randint(0, 2))]
        receiver = decode.make_receiver(f"r{i}", prefill.endpoint)
        receiver.init(dst)
        cuts = sorted(rng.sample(range(1, n), min(n - 1, rng.randint(0, 3)))) if n > 1 else []
        chunks = [src[a:b] for a, b in zip([0, *cuts], [*cuts, n], strict=True)]
        requests.append((f"r{i}", prefill.make_sender(f"r{i}", decode.endpoint), receiver, src, dst, chunks))
    wait_until(lambda: all(s.poll() == KVPoll.WaitingForInput for _, s, *_ in requests))
    for step in range(4):  # round robin: chunk k of every request, then chunk k+1
        for rid, sender, _, _, _, chunks in requests:
            if step < len(chunks):
                last = step == len(chunks) - 1
                sender.send(chunks[step], is_last=last, first_output={"rid": rid} if last else None)
    wait_until(lambda: all(s.poll() == r.poll() == KVPoll.Success for _, s, r, *_ in requests))
    written = set()
    for rid, _, receiver, src, dst, _ in requests:
        assert receiver.first_output == {"rid": rid}
        assert torch.equal(
            prefill.pool.kv[:, :, src].view(torch.int16),
            decode.pool.kv[:, :, dst[: len(src)]].view(torch.int16),
        )
        written.update(dst[: len(src)])
    others = [p for p in range(400) if p not in written]  # reserves and foreign pages: untouched
    assert torch.equal(bits(decode.pool)[:, :, others], before[:, :, others])
    assert prefill.stats()["senders"] == 0 and decode.stats()["receivers"] == 0
    assert prefill.stats()["mapped_pools"] == 1 and decode.stats()["gate_slots"] == 0


def test_the_sender_is_done_when_its_last_copy_is(pair):
    prefill, decode = pair
    receiver = decode.make_receiver("quick", prefill.endpoint)
    sender = prefill.make_sender("quick", decode.endpoint)
    receiver.init([10, 11, 12])
    wait_until(lambda: sender.poll() == receiver.poll() == KVPoll.WaitingForInput)
    held, release = threading.Event(), threading.Event()
    decode.call_soon(lambda: (held.set(), release.wait(10)))  # the receiver reads nothing meanwhile
    held.wait(5)
    try:
        sender.send([1, 2, 3], is_last=True, first_output={"t": 7})
        wait_until(lambda: sender.poll() == KVPoll.Success)
        assert receiver.poll() == KVPoll.WaitingForInput
        assert torch.equal(  # the pages are there before the header is even read
            prefill.pool.kv[:, :, [1, 2, 3]].view(torch.int16),
            decode.pool.kv[:, :, [10, 11, 12]].view(torch.int16),
        )
        assert prefill.stats()["senders"] == 0
    finally:
        release.set()
    wait_until(lambda: receiver.poll() == KVPoll.Success)
    assert receiver.first_output == {"t": 7}

    # A receiver that gives up after the sender finished: its Abort meets a finished nonce and
    # is not kept for a later transfer of the same rid.
    late = decode.make_receiver("again", prefill.endpoint)
    late_sender = prefill.make_sender("again", decode.endpoint)
    late.init([20])
    wait_until(lambda: late_sender.poll() == KVPoll.WaitingForInput)
    held.clear()
    release.clear()  # here, not in the lambda: a late-running lambda would clear the set() below
    decode.call_soon(lambda: (held.set(), release.wait(10)))
    held.wait(5)
    late_sender.send([4], is_last=True, first_output={})
    wait_until(lambda: late_sender.poll() == KVPoll.Success)
    late.abort("changed its mind")
    release.set()
    time.sleep(0.1)
    retry = prefill.make_sender("again", decode.endpoint)
    retry_receiver = decode.make_receiver("again", prefill.endpoint)
    retry_receiver.init([21])
    wait_until(lambda: retry.poll() == KVPoll.WaitingForInput)
    retry.send([5], is_last=True, first_output={"n": 2})
    wait_until(lambda: retry.poll() == retry_receiver.poll() == KVPoll.Success)
    assert retry_receiver.first_output == {"n": 2}
    wait_until(lambda: prefill.stats()["senders"] == 0 and decode.stats()["receivers"] == 0)
    assert decode.stats()["gate_slots"] == 0


@pytest.mark.parametrize("side", ["receiver", "sender"])
def test_no_write_after_abort_returns(pair, side):
    prefill, decode = pair
    pages = list(range(1, 301))
    receiver = decode.make_receiver("big", prefill.endpoint)
    sender = prefill.make_sender("big", decode.endpoint)
    receiver.init(pages)
    wait_until(lambda: sender.poll() == KVPoll.WaitingForInput)
    for p in pages[:-1]:  # 299 chunks, one copy each, while the other side aborts
        sender.send([p], is_last=False)
    wait_until(lambda: receiver.poll() == KVPoll.Transferring)
    (receiver if side == "receiver" else sender).abort(f"{side} gave up")
    after_abort = bits(decode.pool)
    wait_until(lambda: sender.poll() == receiver.poll() == KVPoll.Failed)
    time.sleep(0.2)  # any copy still queued would have run by now
    if side == "receiver":
        assert torch.equal(after_abort, bits(decode.pool))
        # the Abort message, or the closed gate slot if the next copy came first
        assert sender.failure_reason in (
            "receiver aborted: receiver gave up",
            "the receiver no longer takes this transfer's pages",
        )
    else:
        assert receiver.failure_reason == "sender aborted: sender gave up"
    assert torch.equal(after_abort, bits(decode.pool))  # and nothing after the receiver saw Failed
    wait_until(lambda: prefill.stats()["senders"] == 0 and decode.stats()["receivers"] == 0)
    assert decode.stats()["gate_slots"] == 0


def test_repeated_receiver_pages_are_refused_before_any_write(pair):
    prefill, decode = pair
    before = bits(decode.pool)
    receiver = decode.make_receiver("dup", prefill.endpoint)
    sender = prefill.make_sender("dup", decode.endpoint)
    receiver.init([5, 6, 5])
    wait_until(lambda: sender.poll() == receiver.poll() == KVPoll.Failed)
    assert "repeated" in sender.failure_reason and "repeated" in receiver.failure_reason
    sender.send([1, 2, 3], is_last=True, first_output={"t": 1})
    time.sleep(0.1)
    assert torch.equal(before, bits(decode.pool))


def test_closing_either_manager_fails_the_other_side_and_drops_the_mapping():
    config = KVTransferConfig(heartbeat_timeout_s=30.0)  # failures below come from closing, not silence
    prefill, decode = (
        CudaIpcKVManager(random_pool(1), "P", config),
        CudaIpcKVManager(random_pool(2), "D", config),
    )
    try:
        receiver = decode.make_receiver("a", prefill.endpoint)
        sender = prefill.make_sender("a", decode.endpoint)
        receiver.init([1, 2, 3])
        wait_until(lambda: sender.poll() == KVPoll.WaitingForInput)
        sender.send([4], is_last=False)
        wait_until(lambda: receiver.poll() == KVPoll.Transferring)
        assert prefill.stats()["mapped_pools"] == 1
        started = time.monotonic()
        decode.close()
        assert receiver.poll() == KVPoll.Failed
        wait_until(lambda: sender.poll() == KVPoll.Failed, timeout_s=2.0)
        assert time.monotonic() - started < 1.0  # told by the Abort or the dropped connection
        wait_until(lambda: prefill.stats()["mapped_pools"] == 0, timeout_s=2.0)
    finally:
        prefill.close()
        decode.close()


def test_an_idle_peer_mapping_is_dropped_and_made_again(pair):
    prefill, decode = pair
    prefill.IDLE_PEER_CLOSE_S = 0.2  # instance override of the class's minute
    for rid in ("one", "two"):
        receiver = decode.make_receiver(rid, prefill.endpoint)
        sender = prefill.make_sender(rid, decode.endpoint)
        receiver.init([7, 8])
        wait_until(lambda s=sender: s.poll() == KVPoll.WaitingForInput)
        sender.send([1, 2], is_last=True, first_output={"rid": rid})
        wait_until(lambda s=sender, r=receiver: s.poll() == r.poll() == KVPoll.Success)
        assert torch.equal(
            prefill.pool.kv[:, :, [1, 2]].view(torch.int16), decode.pool.kv[:, :, [7, 8]].view(torch.int16)
        )
        wait_until(lambda: prefill.stats()["mapped_pools"] == 0, timeout_s=3.0)
