"""kvtransfer/transfers.py as a state machine: messages in, messages out, no thread and no socket.

Two transfer tables (a prefill side P and a decode side D) with the zmq data plane over CPU pools
talk through an in-memory PeerLink; the test delivers the messages itself, one at a time, so it
sees every message each rule sends, in order:

- a transfer is Ready -> Bound -> Data... -> Ack, both sides Success, the bytes in place, every
  table and peer reference empty afterwards;
- a Ready before its sender is kept and binds it; one nobody claims expires into an Abort;
- data for a transfer the receiver does not know is answered with one Abort, not one per message;
- an abort on either side stops the other, and nothing is written after it;
- more pages than the receiver allocated, another layout, an Ack before the last message, and a
  deadline passed each fail the transfer on both sides with the reason;
- an Abort for a sender that already finished is not kept for a later transfer of the same rid.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict, deque
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from pdserve.kvtransfer import wire
from pdserve.kvtransfer.base import KVPoll, KVTransferConfig
from pdserve.kvtransfer.head_slice import KVRegion
from pdserve.kvtransfer.layout import KVLayout
from pdserve.kvtransfer.records import Chunk, InboundTransfer, OutboundTransfer
from pdserve.kvtransfer.state import TransferState
from pdserve.kvtransfer.transfers import Transfers
from pdserve.kvtransfer.zmq import ZmqDataPlane
from pdserve.shared.engine.kv_pool import KVPoolShape, PagedKVPool

SHAPE = KVPoolShape(num_layers=3, num_pages=64, page_size=4, num_kv_heads=2, head_dim=8)
CELL = SHAPE.page_size * SHAPE.num_kv_heads * SHAPE.head_dim * 2 * 4  # K and V of one page-layer
CONFIG = KVTransferConfig(transfer_timeout_s=10.0)  # below FINISHED_TTL_S: deadlines pass first


class Network:
    """Messages between sides in send order; nothing moves until the test delivers it."""

    def __init__(self) -> None:
        self.sides: dict[str, Side] = {}
        self.queue: deque[tuple[str, str, Any, list]] = deque()
        self.log: list[tuple[str, str, str]] = []  # (src, dst, tag) of every delivered message

    def deliver(self, limit: int = 1000) -> None:
        """Delivers until quiet, letting each side's table submit what it can between messages."""
        for _ in range(limit):
            for side in self.sides.values():
                side.transfers.pump()
            if not self.queue:
                return
            src, dst, msg, payload = self.queue.popleft()
            self.log.append((src, dst, msg.TAG))
            self.sides[dst].handle(src, msg, payload)
        raise AssertionError("the sides never went quiet")

    def tags(self) -> list[str]:
        return [f"{src}>{dst} {tag}" for src, dst, tag in self.log]


class MemoryLink:
    """The PeerLink of one side: sends into the network (payload bytes copied, as a socket would)."""

    def __init__(self, name: str, net: Network):
        self.name, self.net = name, net
        self.active: dict[str, int] = defaultdict(int)

    def send(self, endpoint: str, msg: Any, payload: Any = None, create: bool = True) -> Any:
        if not create and endpoint not in self.active:
            return False
        frames = [] if payload is None else [SimpleNamespace(buffer=bytearray(payload))]
        self.net.queue.append((self.name, endpoint, msg, frames))
        return None

    def retain(self, endpoint: str, now: float) -> None:
        self.active[endpoint] += 1

    def release(self, endpoint: str, now: float) -> None:
        self.active[endpoint] -= 1

    def active_count(self) -> int:
        return sum(1 for n in self.active.values() if n > 0)


class Side:
    """One manager's table and zmq data plane, with this object as the plane's PlaneHost."""

    def __init__(self, name: str, net: Network, seed: int, layers: int = SHAPE.num_layers):
        shape = KVPoolShape(layers, SHAPE.num_pages, SHAPE.page_size, SHAPE.num_kv_heads, SHAPE.head_dim)
        self.pool = PagedKVPool(shape, torch.float32, "cpu")
        self.pool.kv.copy_(torch.randn(self.pool.kv.shape, generator=torch.Generator().manual_seed(seed)))
        self.layout, self.config = KVLayout.of(self.pool), CONFIG
        self.max_message_bytes = 2 * layers * CELL  # two pages of every layer per message
        self.link = MemoryLink(name, net)
        self.transfers = Transfers(self.link, self.config)
        self.plane = self.transfers.plane = ZmqDataPlane(self, 1 << 20, 4)
        t = self.transfers
        self.fail_outbound, self.fail_inbound = t.fail_outbound, t.fail_inbound  # PlaneHost's failing
        self.fail_transfers_with = t.fail_transfers_with
        self.handlers = t.handlers()
        net.sides[name] = self

    def handle(self, src: str, msg: Any, payload: list) -> None:
        self.handlers[type(msg)](src, msg, payload)

    # PlaneHost
    def send(self, peer: str, msg: Any, payload: Any = None) -> Any:
        return self.link.send(peer, msg, payload, create=False)

    def call_soon(self, fn) -> bool:
        fn()
        return True

    # what the handles do (handles.py), without the hop to an I/O thread
    def sender(self, rid: str, dest: str) -> OutboundTransfer:
        rec = OutboundTransfer(rid, dest, TransferState(CONFIG.transfer_timeout_s), KVRegion.of(self.pool))
        self.transfers.register_out(rec)
        return rec

    def receiver(self, rid: str, src: str, pages: list[int]) -> InboundTransfer:
        state = TransferState(CONFIG.transfer_timeout_s)
        rec = InboundTransfer(rid, src, os.urandom(8), state, KVRegion.of(self.pool))
        self.transfers.register_in(rec)
        self.transfers.init_receiver(rec, pages)
        return rec

    def send_pages(self, rec: OutboundTransfer, first: int, pages: list[int], last: bool) -> None:
        self.transfers.queue_chunk(rec, Chunk(first, pages, last, {"token": 7} if last else None))

    def empty(self) -> bool:
        stats = self.transfers.stats()
        return stats == {"senders": 0, "receivers": 0, "early": 0, "sending": 0, "peer_refs": 0}


@pytest.fixture
def net() -> Network:
    net = Network()
    Side("P", net, seed=1)
    Side("D", net, seed=2)
    return net


def kv(side: Side, pages: list[int]) -> torch.Tensor:
    return side.pool.kv[:, :, pages].clone()


def test_a_transfer_is_ready_bound_data_ack_and_leaves_nothing_behind(net):
    p, d = net.sides["P"], net.sides["D"]
    src, dst = [9, 3, 41, 17, 5], [60, 2, 33, 8, 12, 50]  # the receiver allocated one page more
    sender = p.sender("r", "D")
    receiver = d.receiver("r", "P", dst)
    net.deliver()
    assert sender.state.status == KVPoll.WaitingForInput and receiver.state.status == KVPoll.WaitingForInput
    p.send_pages(sender, 0, src[:2], last=False)
    p.send_pages(sender, 2, src[2:], last=True)
    net.deliver()
    # chunk 1: one message (2 pages x 3 layers); chunk 2: pages 2-3, then page 4
    assert net.tags() == ["D>P ready", "P>D bound", "P>D data", "P>D data", "P>D data", "D>P ack"]
    assert sender.state.status == receiver.state.status == KVPoll.Success
    assert receiver.first_output == {"token": 7}
    assert torch.equal(kv(d, dst[:5]), kv(p, src))
    assert p.empty() and d.empty()


def test_a_ready_before_its_sender_binds_it_and_an_unclaimed_one_expires(net):
    p, d = net.sides["P"], net.sides["D"]
    early = d.receiver("early", "P", [1, 2])
    unclaimed = d.receiver("never", "P", [3])
    net.deliver()
    assert p.transfers.stats()["early"] == 2
    sender = p.sender("early", "D")  # binds from the kept Ready at once
    p.send_pages(sender, 0, [4, 5], last=True)
    net.deliver()
    assert sender.state.status == early.state.status == KVPoll.Success
    p.transfers.expire(time.monotonic() + CONFIG.transfer_timeout_s + 1)
    net.deliver()
    assert unclaimed.state.status == KVPoll.Failed
    assert unclaimed.state.reason == "sender aborted: no sender for this request within 10 s"
    d.transfers.expire(time.monotonic() + CONFIG.transfer_timeout_s + 1)
    assert p.empty() and d.empty()


def test_data_for_an_unknown_transfer_gets_one_abort(net):
    p, d = net.sides["P"], net.sides["D"]
    sender = p.sender("gone", "D")
    receiver = d.receiver("gone", "P", [1, 2, 3, 4, 5, 6])
    net.deliver()
    assert receiver.state.status == KVPoll.WaitingForInput
    restarted = Side("D", net, seed=2)  # D restarts: its new table knows no transfer
    p.send_pages(sender, 0, [7, 8, 9, 10, 11, 12], last=True)
    net.deliver()
    # the first message is answered; the two after it (sent before the Abort came) quietly consumed
    assert net.tags()[2:] == ["P>D data", "P>D data", "P>D data", "D>P abort"]
    assert sender.state.status == KVPoll.Failed
    assert sender.state.reason == "receiver aborted: the receiver has no such transfer"
    assert torch.equal(kv(restarted, [1, 2, 3, 4, 5, 6]), kv(d, [1, 2, 3, 4, 5, 6]))  # nothing written


@pytest.mark.parametrize("side", ["sender", "receiver"])
def test_an_abort_on_either_side_stops_the_other_and_nothing_is_written_after(net, side):
    p, d = net.sides["P"], net.sides["D"]
    sender = p.sender("a", "D")
    receiver = d.receiver("a", "P", [20, 21, 22, 23])
    net.deliver()
    p.send_pages(sender, 0, [1, 2], last=False)
    net.deliver()
    written = kv(d, [20, 21])
    untouched = kv(d, [22, 23])
    if side == "sender":
        sender.state.fail("prefill gave up")
        p.transfers.after_local_abort_out(sender)
    else:
        receiver.state.fail("decode gave up")
        d.transfers.after_local_abort_in(receiver)
    p.send_pages(sender, 2, [3, 4], last=True)  # too late: nothing more is queued or written
    net.deliver()
    assert sender.state.status == receiver.state.status == KVPoll.Failed
    other = receiver if side == "sender" else sender
    assert other.state.reason == ("sender aborted: prefill gave up" if side == "sender" else
                                  "receiver aborted: decode gave up")  # fmt: skip
    assert torch.equal(kv(d, [20, 21]), written) and torch.equal(kv(d, [22, 23]), untouched)
    assert p.empty() and d.empty()


def test_more_pages_than_the_receiver_allocated_fail_both_sides(net):
    p, d = net.sides["P"], net.sides["D"]
    sender = p.sender("big", "D")
    receiver = d.receiver("big", "P", [1, 2])
    net.deliver()
    p.send_pages(sender, 0, [3, 4, 5], last=True)
    net.deliver()
    assert sender.state.reason == "3 pages sent, the receiver allocated 2"
    assert receiver.state.reason == "sender aborted: 3 pages sent, the receiver allocated 2"
    assert net.tags()[-1] == "P>D abort" and "P>D data" not in net.tags()
    assert p.empty() and d.empty()


def test_another_layout_fails_the_pair(net):
    other = Side("D2", net, seed=3, layers=2)
    sender = net.sides["P"].sender("x", "D2")
    receiver = other.receiver("x", "P", [1])
    net.deliver()
    assert sender.state.status == receiver.state.status == KVPoll.Failed
    assert sender.state.reason.startswith("KV layout mismatch: sender ")


def test_an_ack_before_the_last_message_fails_the_sender(net):
    p, d = net.sides["P"], net.sides["D"]
    sender = p.sender("early-ack", "D")
    d.receiver("early-ack", "P", [1, 2, 3])
    net.deliver()
    p.handle("D", wire.Ack(sender.nonce), [])
    assert sender.state.reason == "the receiver acknowledged before the last message was sent"


def test_a_passed_deadline_fails_both_sides(net):
    p, d = net.sides["P"], net.sides["D"]
    sender = p.sender("slow", "D")
    receiver = d.receiver("slow", "P", [1, 2])
    net.deliver()
    later = time.monotonic() + CONFIG.transfer_timeout_s + 1
    p.transfers.expire(later)
    d.transfers.expire(later)
    net.deliver()
    assert sender.state.status == receiver.state.status == KVPoll.Failed
    assert "10 s" in sender.state.reason and "10 s" in receiver.state.reason
    assert p.empty() and d.empty()


def one_page_transfer(net: Network, rid: str, src_page: int, dst_page: int) -> OutboundTransfer:
    p, d = net.sides["P"], net.sides["D"]
    sender = p.sender(rid, "D")
    d.receiver(rid, "P", [dst_page])
    net.deliver()
    p.send_pages(sender, 0, [src_page], last=True)
    net.deliver()
    return sender


def test_an_abort_for_a_finished_sender_is_not_kept_for_a_later_transfer(net):
    p = net.sides["P"]
    sender = one_page_transfer(net, "again", 2, 1)
    assert sender.state.status == KVPoll.Success
    p.handle("D", wire.Abort("again", sender.nonce, "late", True), [])  # after the sender is done
    assert p.transfers.stats()["early"] == 0
    assert one_page_transfer(net, "again", 4, 3).state.status == KVPoll.Success
