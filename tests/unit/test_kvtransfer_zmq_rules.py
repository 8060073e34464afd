"""base.py's rules on the zmq backend with two real managers (their own I/O threads) in one process:
nothing is written into a receiver's pages once abort() returned, even with messages still in
flight; many interleaved requests arrive bit-exact; closing a manager fails its peer's transfers."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

import pytest
import torch

from pdserve.kvtransfer import KVPoll, KVTransferConfig
from pdserve.kvtransfer.zmq import ZmqKVManager
from pdserve.shared.engine.kv_pool import KVPoolShape, PagedKVPool

SHAPE = KVPoolShape(num_layers=4, num_pages=400, page_size=4, num_kv_heads=2, head_dim=16)
CELL = 2 * 4 * 2 * 16 * 2  # bytes of K and V of one page in one layer, bfloat16


def random_pool(seed: int) -> PagedKVPool:
    pool = PagedKVPool(SHAPE, torch.bfloat16, "cpu")
    gen = torch.Generator().manual_seed(seed)
    for t in pool.k_buffers + pool.v_buffers:
        t.view(torch.int16).copy_(torch.randint(-(2**15), 2**15, t.shape, dtype=torch.int16, generator=gen))
    return pool


def snapshot(pool: PagedKVPool) -> list[torch.Tensor]:
    return [t.clone() for t in pool.k_buffers + pool.v_buffers]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


def wait_until(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.0005)


@pytest.fixture
def pair() -> Iterator[tuple[ZmqKVManager, ZmqKVManager]]:
    prefill = ZmqKVManager(random_pool(1), "P", slab_bytes=4 * CELL, max_slabs=2)
    decode = ZmqKVManager(random_pool(2), "D")
    yield prefill, decode
    prefill.close()
    decode.close()


def test_no_write_after_receiver_abort_returns(pair):
    prefill, decode = pair
    pages = list(range(1, 301))  # 300 pages x 4 layers / 4 cells per message: 300 messages
    receiver = decode.make_receiver("big", prefill.endpoint)
    sender = prefill.make_sender("big", decode.endpoint)
    receiver.init(pages)
    wait_until(lambda: sender.poll() == KVPoll.WaitingForInput)
    sender.send(pages, is_last=True, first_output={"token": 1})
    wait_until(lambda: receiver.poll() == KVPoll.Transferring)
    receiver.abort("client disconnected")
    after_abort = snapshot(decode.pool)
    wait_until(lambda: sender.poll() == KVPoll.Failed)
    time.sleep(0.2)  # any message still in flight has arrived by now
    assert all(same_bits(a, b) for a, b in zip(after_abort, snapshot(decode.pool), strict=True))
    assert sender.failure_reason == "receiver aborted: client disconnected"
    wait_until(lambda: prefill.stats()["senders"] == 0 and decode.stats()["receivers"] == 0)


def test_many_interleaved_requests_bit_exact(pair):
    prefill, decode = pair
    rng = random.Random(5)
    src_free, dst_free = list(range(1, 400)), list(range(1, 400))
    rng.shuffle(src_free)
    rng.shuffle(dst_free)
    requests = []
    for i in range(20):
        n = rng.randint(1, 15)
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
    for rid, _, receiver, src, dst, _ in requests:
        assert receiver.first_output == {"rid": rid}
        for s, d in zip(
            prefill.pool.k_buffers + prefill.pool.v_buffers,
            decode.pool.k_buffers + decode.pool.v_buffers,
            strict=True,
        ):
            assert same_bits(s[src], d[dst[: len(src)]])
    assert prefill.stats()["senders"] == 0 and decode.stats()["receivers"] == 0


def test_closing_the_sender_manager_fails_the_receiver_at_once():
    prefill = ZmqKVManager(random_pool(1), "P")
    decode = ZmqKVManager(random_pool(2), "D", KVTransferConfig(heartbeat_timeout_s=30.0))
    try:
        receiver = decode.make_receiver("r", prefill.endpoint)
        sender = prefill.make_sender("r", decode.endpoint)
        receiver.init([1, 2])
        wait_until(lambda: receiver.poll() == KVPoll.WaitingForInput)
        started = time.monotonic()
        prefill.close()
        assert (sender.poll(), sender.failure_reason) == (KVPoll.Failed, "KV manager closed")
        wait_until(lambda: receiver.poll() == KVPoll.Failed, timeout_s=2.0)
        assert time.monotonic() - started < 1.0  # told by the Abort, not by a 30 s heartbeat
        assert receiver.failure_reason == "sender aborted: KV manager closed"
    finally:
        prefill.close()
        decode.close()
