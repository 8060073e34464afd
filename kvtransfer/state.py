"""One side of one transfer: an ordered `KVPoll` that only moves forward, a failure reason, a lock.

Rules:
- `status` is read without the lock, so `poll()` never blocks; every change happens under `lock`.
- Final states (Success, Failed) never change again; Failed can be reached from any other state.
- A backend thread that reads a sender's pages or writes a receiver's pages holds `lock` and checks
  `is_final` first. `fail()` takes the same lock, so once it returns no backend thread touches the
  request's pages any more: that is how base.py's "nothing is written after abort() returns" holds.
- The lock is re-entrant so a backend holding it (mid-copy) may itself move the state.
- `closer` (optional, set through `set_closer`) runs under the lock just before the state becomes
  final, whoever makes it final: a data plane whose pages are written by another process (cuda_ipc)
  uses it to shut that writer out before the caller can see the final state and free the pages.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack

from pdserve.kvtransfer.base import KVPoll

logger = logging.getLogger(__name__)

FINAL_STATES = (KVPoll.Failed, KVPoll.Success)


class TransferState:
    __slots__ = ("closer", "deadline", "lock", "reason", "status", "timeout_s")

    def __init__(self, timeout_s: float):
        self.status = KVPoll.Bootstrapping
        self.reason: str | None = None
        self.lock = threading.RLock()
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.closer: Callable[[], None] | None = None

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATES

    def advance(self, to: KVPoll) -> bool:
        """Moves forward to `to` (not Failed: use fail()); False when final or already there/beyond."""
        assert to != KVPoll.Failed
        with self.lock:
            if self.is_final or to <= self.status:
                return False
            if to in FINAL_STATES:
                self._close()
            self.status = to
            return True

    def fail(self, reason: str) -> bool:
        """Makes the state Failed with `reason`; False (and no change) when it was already final."""
        with self.lock:
            if self.is_final:
                return False
            self._close()
            self.reason = reason
            self.status = KVPoll.Failed
            return True

    def set_closer(self, closer: Callable[[], None]) -> bool:
        """Installs `closer` (see the rules); False, and nothing installed, when already final."""
        with self.lock:
            if self.is_final:
                return False
            self.closer = closer
            return True

    def _close(self) -> None:
        closer, self.closer = self.closer, None
        if closer is not None:
            try:
                closer()
            except Exception:  # the state must still become final
                logger.exception("closing a transfer's writers failed")

    def expired(self, now: float) -> bool:
        return not self.is_final and now > self.deadline

    def timeout_reason(self) -> str:
        return f"transfer did not finish within {self.timeout_s:g} s (transfer_timeout_s)"


def check_send_args(rid: str, last_sent: bool, is_last: bool, first_output: dict[str, Any] | None) -> None:
    """The caller-side rules of KVSender.send() (misuse raises at once, in the caller's thread)."""
    if last_sent:
        raise RuntimeError(f"KV transfer {rid}: send() after the call with is_last=True")
    if first_output is not None and not is_last:
        raise ValueError(f"KV transfer {rid}: first_output goes with the last send() only")
    if first_output is not None:
        try:
            msgpack.packb(first_output, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as exc:
            raise TypeError(f"KV transfer {rid}: first_output is not msgpack-able: {exc}") from exc


def msgpack_roundtrip(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a receiver sees of `value` after the wire: the fake backend hands out exactly this."""
    if value is None:
        return None
    return msgpack.unpackb(msgpack.packb(value, use_bin_type=True), raw=False, strict_map_key=False)
