"""The sending side of the prefill role: one KVSender per request, fed as chunks complete.

Each engine step, `advance` visits every request that has a sender, in arrival order:

    poll the sender ── Failed ─────────────────────────────────────────────▶ outcome (False, why)
         │ Bootstrapping: the decode side has not named its pages yet; nothing is sent, the pages
         │                wait in the request (prefill goes on, so the transfer catches up later)
         ▼ ready (WaitingForInput or later)
    send pages[sent:ready] ── prompt done? ── last call: is_last=True + first_output
         │                                             │
         ▼                                             ▼ a later poll: Success ──▶ outcome (True, "")

Rules kept here (kvtransfer/base.py): send() calls are ordered and never repeat a page; the last
call goes out once, after the last chunk; a page handed to send() is neither freed nor reused until
the sender is final (the scheduler holds every page of a request until `finish_transfer`, and pages
are only sent once they sit in the radix tree or are the request's own, so no cache swap replaces
them); `drop` aborts a sender before the caller frees anything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pdserve.kvtransfer.base import KVPoll, KVSender
from pdserve.shared.engine.request import Req, ReqStatus

logger = logging.getLogger(__name__)


@dataclass
class Outgoing:
    req: Req
    sender: KVSender
    pages_sent: int = 0
    last_sent: bool = False


@dataclass
class TransferOutcome:
    req: Req
    ok: bool
    reason: str = ""


class KVSendQueue:
    def __init__(self, pages_ready: Callable[[Req], int], first_output: Callable[[Req], dict[str, Any]]):
        self._pages_ready = pages_ready
        self._first_output = first_output
        self._by_rid: dict[str, Outgoing] = {}

    def __len__(self) -> int:
        return len(self._by_rid)

    def __contains__(self, rid: str) -> bool:
        return rid in self._by_rid

    def add(self, req: Req, sender: KVSender) -> None:
        self._by_rid[req.rid] = Outgoing(req, sender)

    def num_bootstrapping(self) -> int:
        """Senders whose decode side has not named its pages yet."""
        return sum(1 for out in self._by_rid.values() if out.sender.poll() == KVPoll.Bootstrapping)

    def pages_sent(self, rid: str) -> int:
        """How many of rid's pages were handed to its sender (0 for a rid without one)."""
        out = self._by_rid.get(rid)
        return 0 if out is None else out.pages_sent

    def advance(self) -> list[TransferOutcome]:
        """Sends what is ready and collects the transfers that reached a final state (their senders
        are forgotten; the caller ends the requests and gives their pages back)."""
        done: list[TransferOutcome] = []
        for out in list(self._by_rid.values()):
            outcome = self._advance_one(out)
            if outcome is not None:
                del self._by_rid[out.req.rid]
                done.append(outcome)
        return done

    def _advance_one(self, out: Outgoing) -> TransferOutcome | None:
        state = out.sender.poll()
        if state == KVPoll.Failed:
            return TransferOutcome(out.req, False, _failure(out.sender))
        if state == KVPoll.Bootstrapping:
            return None
        if not out.last_sent:
            self._send_ready(out)
            state = out.sender.poll()  # an in-process backend may finish at once
            if state == KVPoll.Failed:
                return TransferOutcome(out.req, False, _failure(out.sender))
        if out.last_sent and state == KVPoll.Success:
            return TransferOutcome(out.req, True)
        return None

    def _send_ready(self, out: Outgoing) -> None:
        req = out.req
        ready = self._pages_ready(req)
        if req.status == ReqStatus.TRANSFERRING:
            out.sender.send(
                req.pages[out.pages_sent : ready], is_last=True, first_output=self._first_output(req)
            )
            out.pages_sent, out.last_sent = ready, True
        elif ready > out.pages_sent:
            out.sender.send(req.pages[out.pages_sent : ready], is_last=False)
            out.pages_sent = ready

    def drop(self, rid: str, reason: str) -> bool:
        """Aborts and forgets rid's sender (abort at any stage); True if it had one. The backend reads
        none of the request's pages after this returns, so they may be given back at once."""
        out = self._by_rid.pop(rid, None)
        if out is None:
            return False
        out.sender.abort(reason)
        return True


def _failure(sender: KVSender) -> str:
    return f"KV transfer failed: {sender.failure_reason or 'no reason given by the backend'}"
