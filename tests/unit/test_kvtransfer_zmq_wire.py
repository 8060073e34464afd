"""A zmq KV manager against a raw peer that speaks the wire protocol (kvtransfer/wire.py) by hand:
messages out of order, for unknown transfers, malformed or lying. The manager never crashes, fails
what must fail with a reason, answers what must be answered, and keeps no state afterwards."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch
import zmq

from pdserve.kvtransfer import KVPoll, KVTransferConfig, KVTransferError, wire
from pdserve.kvtransfer.layout import KVLayout
from pdserve.kvtransfer.zmq import ZmqKVManager
from pdserve.shared.engine.kv_pool import KVPoolShape, PagedKVPool

SHAPE = KVPoolShape(num_layers=2, num_pages=16, page_size=2, num_kv_heads=1, head_dim=4)
LAYOUT = KVLayout(torch.float16, 2, 2, 1, 4)
CELL = LAYOUT.cell_bytes  # 32 bytes


class RawPeer:
    """A ROUTER to be reached at `endpoint` and a DEALER to the manager under test."""

    def __init__(self, target: str):
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.bind("tcp://127.0.0.1:0")
        self.endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.connect(target)

    def send(self, msg, payload: bytes | None = None, src: str | None = None) -> None:
        header = wire.encode(src or self.endpoint, "raw-1", msg)
        self.dealer.send_multipart([header] if payload is None else [header, payload])

    def send_frames(self, frames: list[bytes]) -> None:
        self.dealer.send_multipart(frames)

    def expect(self, cls: type, timeout_s: float = 3.0):
        """The next message of type cls (pings and pongs skipped), with its payload frames."""
        deadline = time.monotonic() + timeout_s
        while self.router.poll(max(1, int((deadline - time.monotonic()) * 1000))):
            frames = self.router.recv_multipart()
            _, _, msg = wire.decode(frames[1])
            if isinstance(msg, wire.Ping):
                self.send(wire.Pong())
            elif isinstance(msg, cls):
                return msg, frames[2:]
            elif not isinstance(msg, wire.Pong):
                pytest.fail(f"expected {cls.__name__}, got {msg}")
            if time.monotonic() > deadline:
                break
        pytest.fail(f"no {cls.__name__} within {timeout_s} s")

    def silent(self, timeout_s: float = 0.3) -> bool:
        """True when nothing but pings arrives within timeout_s."""
        try:
            self.expect(object, timeout_s)  # any non-ping message returns
        except pytest.fail.Exception as exc:
            return str(exc).startswith("no object")
        return False

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def pool(seed: int) -> PagedKVPool:
    p = PagedKVPool(SHAPE, torch.float16, "cpu")
    gen = torch.Generator().manual_seed(seed)
    for t in p.k_buffers + p.v_buffers:
        t.copy_(torch.randn(t.shape, generator=gen).to(torch.float16))
    return p


def wait_final(handle, timeout_s: float = 3.0) -> KVPoll:
    deadline = time.monotonic() + timeout_s
    while handle.poll() not in (KVPoll.Success, KVPoll.Failed) and time.monotonic() < deadline:
        time.sleep(0.002)
    return handle.poll()


def wait_state(handle, state: KVPoll, timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while handle.poll() != state and time.monotonic() < deadline:
        time.sleep(0.002)
    assert handle.poll() == state, (handle.poll(), handle.failure_reason)


def no_state(manager: ZmqKVManager) -> bool:
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        stats = manager.stats()
        if stats == {"senders": 0, "receivers": 0, "early": 0, "sending": 0, "peer_refs": 0}:
            return True
        time.sleep(0.01)
    return False


@pytest.fixture
def manager() -> Iterator[ZmqKVManager]:
    m = ZmqKVManager(pool(1), "M", KVTransferConfig(transfer_timeout_s=5.0), slab_bytes=2 * CELL)
    yield m
    m.close()


@pytest.fixture
def raw(manager) -> Iterator[RawPeer]:
    peer = RawPeer(manager.endpoint)
    yield peer
    peer.close()


def test_garbage_is_dropped_and_pings_answered(manager, raw):
    raw.send_frames([b"not msgpack"])
    raw.send_frames([wire.encode(raw.endpoint, "i", wire.Ping())[:5]])
    raw.send_frames([b"\x94\xa4ping\xa3bad\xa1i\x80"])  # src is not an endpoint
    raw.send(wire.Ping())
    raw.expect(wire.Pong)
    assert manager.make_sender("after-garbage", raw.endpoint).poll() == KVPoll.Bootstrapping


def test_ready_before_make_sender_then_a_normal_transfer(manager, raw):
    raw.send(wire.Ready("r1", b"n1", 3, LAYOUT.to_wire()))
    time.sleep(0.1)  # the Ready is kept until the sender exists
    sender = manager.make_sender("r1", raw.endpoint)
    bound, _ = raw.expect(wire.Bound)
    assert bound.nonce == b"n1"
    wait_state(sender, KVPoll.WaitingForInput)
    sender.send([4, 9, 2], is_last=True, first_output={"token": 7})
    messages = [raw.expect(wire.Data) for _ in range(3)]  # 2 cells per message: 3 pages x 2 layers
    assert [(m.first_page, m.num_pages, m.layer_begin, m.layer_end) for m, _ in messages] == [
        (0, 2, 0, 1),
        (0, 2, 1, 2),
        (2, 1, 0, 2),
    ]
    last, payload = messages[-1]
    assert (last.is_last, last.total_pages, last.first_output, last.dtype) == (
        True,
        3,
        {"token": 7},
        "float16",
    )
    expected = torch.stack(
        [
            torch.stack([b[[2]] for b in (manager.pool.k_buffers[i], manager.pool.v_buffers[i])])
            for i in range(2)
        ]
    )
    assert payload[0] == expected.contiguous().view(torch.uint8).numpy().tobytes()
    assert sender.poll() == KVPoll.Transferring
    raw.send(wire.Ack(b"n1"))
    wait_state(sender, KVPoll.Success)
    assert no_state(manager)


def test_abort_before_make_sender_fails_it_at_once(manager, raw):
    raw.send(wire.Abort("r2", b"n2", "decode is full", to_sender=True))
    time.sleep(0.1)
    sender = manager.make_sender("r2", raw.endpoint)
    assert wait_final(sender) == KVPoll.Failed
    assert sender.failure_reason == "receiver aborted: decode is full"
    assert no_state(manager)


def test_data_for_an_unknown_transfer_is_answered_once(manager, raw):
    for _ in range(2):
        raw.send(wire.Data("ghost", b"nx", 0, 1, 0, 2, "float16", 2 * CELL), b"\0" * (2 * CELL))
    abort, _ = raw.expect(wire.Abort)
    assert (abort.rid, abort.nonce, abort.to_sender) == ("ghost", b"nx", True)
    assert abort.reason == "the receiver has no such transfer"
    assert raw.silent()


def test_layout_mismatch_fails_the_sender_and_tells_the_receiver(manager, raw):
    sender = manager.make_sender("r3", raw.endpoint)
    raw.send(wire.Ready("r3", b"n3", 4, {**LAYOUT.to_wire(), "dtype": "bfloat16"}))
    raw.expect(wire.Bound)
    abort, _ = raw.expect(wire.Abort)
    assert wait_final(sender) == KVPoll.Failed
    assert sender.failure_reason.startswith(
        "KV cache dtype mismatch: the prefill worker stores float16, the decode worker bfloat16"
    )
    assert (abort.nonce, abort.reason, abort.to_sender) == (b"n3", sender.failure_reason, False)
    assert no_state(manager)


def test_more_pages_than_the_receiver_allocated(manager, raw):
    sender = manager.make_sender("r4", raw.endpoint)
    sender.send([1, 2, 3], is_last=False)
    raw.send(wire.Ready("r4", b"n4", 2, LAYOUT.to_wire()))
    raw.expect(wire.Bound)
    abort, _ = raw.expect(wire.Abort)
    assert wait_final(sender) == KVPoll.Failed
    assert sender.failure_reason == abort.reason == "3 pages sent, the receiver allocated 2"
    assert no_state(manager)


def test_early_ack_fails_the_sender(manager, raw):
    sender = manager.make_sender("r5", raw.endpoint)
    raw.send(wire.Ready("r5", b"n5", 2, LAYOUT.to_wire()))
    wait_state(sender, KVPoll.WaitingForInput)
    raw.send(wire.Ack(b"n5"))
    assert wait_final(sender) == KVPoll.Failed
    assert sender.failure_reason == "the receiver acknowledged before the last message was sent"


def _receiver(manager, raw, rid: str, pages: list[int]):
    receiver = manager.make_receiver(rid, raw.endpoint)
    receiver.init(pages)
    ready, _ = raw.expect(wire.Ready)
    assert (ready.rid, ready.num_pages, ready.layout) == (rid, len(pages), LAYOUT.to_wire())
    raw.send(wire.Bound(ready.nonce))
    wait_state(receiver, KVPoll.WaitingForInput)
    return receiver, ready.nonce


@pytest.mark.parametrize(
    ("data", "payload_bytes", "reason"),
    [
        ({"first_page": 1, "num_pages": 2}, 4 * CELL, "pages [1, +2) beyond the 2 given to init()"),
        ({"dtype": "bfloat16"}, 2 * CELL, "dtype bfloat16, the pool holds float16"),
        ({"layer_end": 3}, 3 * CELL, "layers [0, 3) of 2"),
        ({"nbytes": CELL}, CELL, f"{CELL} bytes announced, the layout needs {2 * CELL}"),
        ({}, CELL, f"{CELL} payload bytes, the header says {2 * CELL}"),
    ],
)
def test_bad_data_fails_the_receiver_and_writes_nothing(manager, raw, data, payload_bytes, reason):
    receiver, nonce = _receiver(manager, raw, "bad", [5, 6])
    before = [t.clone() for t in manager.pool.k_buffers + manager.pool.v_buffers]
    fields = {
        "first_page": 0,
        "num_pages": 1,
        "layer_begin": 0,
        "layer_end": 2,
        "dtype": "float16",
        "nbytes": 2 * CELL,
    } | data
    raw.send(wire.Data("bad", nonce, **fields), b"\1" * payload_bytes)
    abort, _ = raw.expect(wire.Abort)
    assert wait_final(receiver) == KVPoll.Failed
    assert receiver.failure_reason == abort.reason == f"bad data message: {reason}"
    assert all(torch.equal(a, b) for a, b in zip(before, manager.pool.k_buffers + manager.pool.v_buffers))
    assert no_state(manager)


def test_missing_message_is_incomplete_kv_not_success(manager, raw):
    receiver, nonce = _receiver(manager, raw, "gap", [5, 6])
    # page 0 only for layer 0, then the last message for page 1: layer 1 of page 0 never came
    raw.send(wire.Data("gap", nonce, 0, 1, 0, 1, "float16", CELL), b"\2" * CELL)
    raw.send(wire.Data("gap", nonce, 1, 1, 0, 2, "float16", 2 * CELL, True, 2, {"t": 1}), b"\3" * (2 * CELL))
    abort, _ = raw.expect(wire.Abort)
    assert wait_final(receiver) == KVPoll.Failed
    assert receiver.failure_reason == "incomplete KV: 3 page-layers written, the sender sent 4"
    assert receiver.first_output is None
    assert abort.reason == receiver.failure_reason


def test_raw_sender_transfer_and_ack(manager, raw):
    receiver, nonce = _receiver(manager, raw, "ok", [7, 3, 12])
    data = torch.arange(2 * 2 * 2 * SHAPE.page_size * 4, dtype=torch.float16).view(2, 2, 2, 2, 1, 4)
    raw.send(
        wire.Data("ok", nonce, 0, 2, 0, 2, "float16", 4 * CELL, True, 2, {"token": 3}), data.numpy().tobytes()
    )
    ack, _ = raw.expect(wire.Ack)
    assert ack.nonce == nonce
    wait_state(receiver, KVPoll.Success)
    assert receiver.first_output == {"token": 3}
    for layer in range(2):
        assert torch.equal(manager.pool.k_buffers[layer][[7, 3]], data[layer, 0])
        assert torch.equal(manager.pool.v_buffers[layer][[7, 3]], data[layer, 1])
    assert no_state(manager)


def test_sender_abort_before_ready_reaches_the_receiver_side(manager, raw):
    raw.send(wire.Abort("pre", None, "prefill failed", to_sender=False))
    time.sleep(0.1)
    receiver = manager.make_receiver("pre", raw.endpoint)
    assert wait_final(receiver) == KVPoll.Failed
    assert receiver.failure_reason == "sender aborted: prefill failed"
    assert no_state(manager)


def test_unclaimed_ready_expires_with_an_abort(raw):
    manager = ZmqKVManager(pool(1), "short", KVTransferConfig(transfer_timeout_s=0.3))
    try:
        peer = RawPeer(manager.endpoint)
        peer.send(wire.Ready("never", b"nv", 1, LAYOUT.to_wire()))
        abort, _ = peer.expect(wire.Abort, timeout_s=2.0)
        assert (abort.rid, abort.nonce) == ("never", b"nv")
        assert abort.reason == "no sender for this request within 0.3 s"
        assert no_state(manager)
        peer.close()
    finally:
        manager.close()


def test_close_fails_everything_and_rejects_new_transfers(manager, raw):
    sender = manager.make_sender("c", raw.endpoint)
    raw.send(wire.Ping())
    raw.expect(wire.Pong)
    manager.close()
    assert (sender.poll(), sender.failure_reason) == (KVPoll.Failed, "KV manager closed")
    with pytest.raises(KVTransferError, match="closed"):
        manager.make_receiver("d", raw.endpoint)
    with pytest.raises(KVTransferError, match="not a KV endpoint"):
        ZmqKVManager(pool(1), "x").make_sender("e", "localhost:5")
