"""router/cluster/output_delivery.py: which outputs reach which stream's queue, in which order, per slice."""

from __future__ import annotations

import asyncio

from pdserve.router.cluster.output_delivery import PendingOutputs
from pdserve.shared.protocol import RequestOutput


def _out(rid: str, token: int) -> RequestOutput:
    return RequestOutput(rid=rid, token_ids=[token])


def _drain(queue: asyncio.Queue) -> list[list[int]]:
    """The token ids of each output the queue got, in order."""
    got = []
    while not queue.empty():
        got.append(queue.get_nowait().token_ids)
    return got


def test_slices_serve_first_outputs_first_and_a_stream_s_outputs_together():
    queues = {rid: asyncio.Queue() for rid in "abcd"}
    pending = PendingOutputs()
    for rid in "abc":  # a step of running streams a, b, c
        pending.add(queues[rid], _out(rid, 1), first=False)
    pending.add(queues["a"], _out("a", 2), first=False)  # a fell behind: its next output is here too
    pending.add(queues["d"], _out("d", 1), first=True)  # d's first token arrives last
    assert pending.hand_out(2, queues)  # True: a stream got its first output
    # d first, then a: both its outputs, folded into one
    assert [_drain(queues[r]) for r in "abcd"] == [[[1, 2]], [], [], [[1]]]
    assert pending
    assert not pending.hand_out(None, queues)
    assert [_drain(queues[r]) for r in "abcd"] == [[], [[1]], [[1]], []]
    assert not pending


def test_later_outputs_of_a_first_stream_join_it_and_unsubscribed_streams_get_nothing():
    queues = {rid: asyncio.Queue() for rid in "ab"}
    pending = PendingOutputs()
    pending.add(queues["a"], _out("a", 1), first=True)
    pending.add(queues["a"], _out("a", 2), first=False)  # not first any more, still behind output 1
    pending.add(queues["b"], _out("b", 1), first=False)
    old_b = queues["b"]
    queues["b"] = asyncio.Queue()  # b's stream was replaced (same rid, new subscription)
    pending.hand_out(None, queues)
    assert _drain(queues["a"]) == [[1, 2]]
    assert old_b.empty() and queues["b"].empty()
