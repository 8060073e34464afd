"""The worker-facing handles of the control-plane backends: thin, thread-safe, never blocking on I/O.

A handle checks its caller's arguments (misuse raises at once, in the caller's thread), changes
its transfer's state under the state's lock (abort) and hands the rest to the manager's I/O thread
(control.py). `poll()` reads one attribute. `abort()` may wait for a page copy already running for
this transfer (milliseconds), never for the network: that wait is what makes "nothing is written
after abort() returns" true.
"""

from __future__ import annotations

from typing import Any

from pdserve.kvtransfer.base import KVPoll, KVReceiver, KVSender
from pdserve.kvtransfer.plane_host import HandleHost
from pdserve.kvtransfer.records import Chunk, InboundTransfer, OutboundTransfer
from pdserve.kvtransfer.state import check_send_args

CLOSED = "KV manager closed"


class ChannelSender(KVSender):
    def __init__(self, manager: HandleHost, rec: OutboundTransfer):
        self.rid = rec.rid
        self._manager = manager
        self._rec = rec
        self._next_page = 0
        self._last_sent = False

    @property
    def failure_reason(self) -> str | None:  # type: ignore[override]
        return self._rec.state.reason

    def send(self, pages: list[int], is_last: bool, first_output: dict[str, Any] | None = None) -> None:
        check_send_args(self.rid, self._last_sent, is_last, first_output)
        self._last_sent = is_last
        page_ids = [int(p) for p in pages]
        if not page_ids and not is_last:
            return
        chunk = Chunk(self._next_page, page_ids, is_last, first_output, self._manager.ready_event())
        self._next_page += len(page_ids)
        if self._rec.state.is_final:
            return
        if not self._manager.queue_chunk(self._rec, chunk):
            self._rec.state.fail(CLOSED)

    def poll(self) -> KVPoll:
        return self._rec.state.status

    def abort(self, reason: str = "aborted by the prefill worker") -> None:
        if self._rec.state.fail(reason):
            self._manager.aborted_out(self._rec)


class ChannelReceiver(KVReceiver):
    def __init__(self, manager: HandleHost, rec: InboundTransfer):
        self.rid = rec.rid
        self._manager = manager
        self._rec = rec
        self._initialized = False

    @property
    def failure_reason(self) -> str | None:  # type: ignore[override]
        return self._rec.state.reason

    def init(self, pages: list[int]) -> None:
        if self._initialized:
            raise RuntimeError(f"KV transfer {self.rid}: init() called twice")
        self._initialized = True
        page_ids = [int(p) for p in pages]
        if self._rec.state.is_final:
            return
        if not self._manager.init_receiver(self._rec, page_ids):
            self._rec.state.fail(CLOSED)

    def poll(self) -> KVPoll:
        return self._rec.state.status

    @property
    def first_output(self) -> dict[str, Any] | None:
        return self._rec.first_output if self._rec.state.status == KVPoll.Success else None

    def abort(self, reason: str = "aborted by the decode worker") -> None:
        if self._rec.state.fail(reason):
            self._manager.aborted_in(self._rec)
