"""The receiving side of the decode role: one KVReceiver per remote request, polled, never waited on.

A receiver is made when the DecodeRequest arrives (so a sender that fails early, before this worker
had pages to offer, is noticed), `init`ed with the pages once the scheduler pre-allocated them, and
polled every engine step until it is final:

    made (prealloc) ──init(pages)──▶ polled (waiting_for_kv) ── Success ──▶ arrived(req, first_output)
         │                                  │
         └───────── Failed ─────────────────┴───────────────────────────▶ failed(req, reason)

`drop` aborts a receiver (the request was aborted): after it returns the backend writes nothing
more into the request's pages, so they may be freed at once (kvtransfer/base.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pdserve.kvtransfer.base import KVPoll, KVReceiver, KVTransferError
from pdserve.shared.engine.request import Req


@dataclass
class Incoming:
    req: Req
    receiver: KVReceiver
    initialised: bool = False


@dataclass
class Arrival:
    req: Req
    ok: bool
    first_output: Any = None  # the sender's first_output, on success
    reason: str = ""  # why it failed, on failure


class KVReceiveQueue:
    def __init__(self) -> None:
        self._by_rid: dict[str, Incoming] = {}

    def __len__(self) -> int:
        return len(self._by_rid)

    def __contains__(self, rid: str) -> bool:
        return rid in self._by_rid

    def add(self, req: Req, receiver: KVReceiver) -> None:
        self._by_rid[req.rid] = Incoming(req, receiver)

    def init(self, req: Req) -> Arrival | None:
        """Names req's freshly allocated pages to its receiver; an Arrival (failed) if it refuses."""
        inc = self._by_rid[req.rid]
        try:
            inc.receiver.init(list(req.pages))
        except KVTransferError as exc:
            del self._by_rid[req.rid]
            inc.receiver.abort(str(exc))
            return Arrival(req, False, reason=f"KV transfer failed: {exc}")
        inc.initialised = True
        return None

    def poll(self) -> list[Arrival]:
        """Transfers that reached a final state since the last poll (their receivers are forgotten)."""
        done: list[Arrival] = []
        for rid, inc in list(self._by_rid.items()):
            state = inc.receiver.poll()
            if state == KVPoll.Failed:
                reason = inc.receiver.failure_reason or "no reason given by the backend"
                done.append(Arrival(inc.req, False, reason=f"KV transfer failed: {reason}"))
            elif state == KVPoll.Success and inc.initialised:
                done.append(Arrival(inc.req, True, first_output=inc.receiver.first_output))
            else:
                continue
            del self._by_rid[rid]
        return done

    def drop(self, rid: str, reason: str) -> bool:
        """Aborts and forgets rid's receiver; True if it had one."""
        inc = self._by_rid.pop(rid, None)
        if inc is None:
            return False
        inc.receiver.abort(reason)
        return True
