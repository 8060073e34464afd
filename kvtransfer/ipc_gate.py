"""The write gate of the cuda_ipc backend: when another process may write into a receiver's pages.

With cuda_ipc the sender's process writes straight into the receiver's pool, so base.py's rule
(a receiver's pages are written only between init() and a final state) cannot rest on a lock of
the receiver's process. Each receiving manager owns one `GateTable`: a small shared-memory file
(memfd) of slots, one per open inbound transfer, holding the transfer's nonce and whether it is
open. A slot is guarded by a byte-range lock on the file (an open-file-description lock, fcntl
F_OFD_SETLK), which the kernel drops when its holder's process dies, so a killed peer never leaves
a slot locked.

    receiver (GateTable)                         sender (GateView, attached once per peer)
    open(nonce) -> slot       [slot lock]
    slot and locator() go out in Ready ───────▶  with view.writing(slot, nonce) as allowed:  [slot lock]
                                                     if allowed: copy, synchronize the stream
                                                 then the Data header
    close(slot)               [slot lock]        (a copy in progress finishes first; after close()
                                                 returns, no write of that transfer can start)

`close` runs as the receiver's state closer (state.py), so the caller sees Failed or Success only
once the sender is shut out, and may free the pages at once. A sender holds the lock for one copy
(milliseconds); a receiver to flip a slot (microseconds). Waits are bounded by `wait_s`: a sender
that cannot get the lock writes nothing (its transfer fails); a receiver that cannot get it (the
sender is stopped, not dead, mid-copy) closes the slot anyway and logs that a late write is
possible. A slot's nonce is compared by the sender, so a slot reused for the next transfer never
admits a write meant for the last one.

Other processes reach the file as /proc/<pid>/fd/<fd> (same host and PID namespace; a random
token in the header proves they reached the right one). Linux only; no torch here.

    table = GateTable(num_slots=1024, wait_s=5.0)            # receiver
    view = GateView.attach(table.locator(), wait_s=5.0)      # sender, another process
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

logger = logging.getLogger(__name__)

HEADER_BYTES = 64  # the token, then padding
SLOT_BYTES = 16  # nonce (8 bytes), open flag (1 byte), padding
TOKEN_BYTES = 16
OPEN = 1
_FLOCK = "hhqqi4x"  # struct flock on Linux: type, whence, start, len, pid (0 for OFD locks)


class GateError(OSError):
    """A gate that cannot be made or attached (not Linux, no such process, wrong token)."""


def _set_lock(fd: int, slot: int, kind: int) -> bool:
    """One non-blocking attempt; True when done."""
    start = HEADER_BYTES + slot * SLOT_BYTES
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack(_FLOCK, kind, os.SEEK_SET, start, 1, 0))
        return True
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise


def _lock(fd: int, slot: int, wait_s: float) -> bool:
    """Takes the slot's lock, polling (the holder keeps it for one copy at most); False on timeout."""
    deadline = time.monotonic() + wait_s
    delay = 20e-6
    while not _set_lock(fd, slot, fcntl.F_WRLCK):
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 1e-3)
    return True


def _unlock(fd: int, slot: int) -> None:
    _set_lock(fd, slot, fcntl.F_UNLCK)


def _check_platform() -> None:
    if not hasattr(fcntl, "F_OFD_SETLK") or not hasattr(os, "memfd_create"):
        raise GateError("the cuda_ipc write gate needs Linux (memfd, open-file-description locks)")


class GateTable:
    """The receiver's side: opens a slot per inbound transfer and closes it when the transfer ends.
    Thread-safe (the I/O thread opens, whichever thread makes a transfer final closes)."""

    def __init__(self, num_slots: int, wait_s: float):
        _check_platform()
        self.num_slots = num_slots
        self.wait_s = wait_s
        self.token = os.urandom(TOKEN_BYTES)
        self._size = HEADER_BYTES + num_slots * SLOT_BYTES
        self._fd = os.memfd_create("pdserve-kv-gate", os.MFD_CLOEXEC)
        os.ftruncate(self._fd, self._size)
        self._map = mmap.mmap(self._fd, self._size)
        self._map[:TOKEN_BYTES] = self.token
        self._free = list(range(num_slots - 1, -1, -1))
        self._lock = threading.Lock()
        self._closed = False

    def locator(self) -> dict[str, Any]:
        """What a sender needs to attach (msgpack-able)."""
        return {"pid": os.getpid(), "fd": self._fd, "token": self.token, "slots": self.num_slots}

    def open(self, nonce: bytes) -> int | None:
        """A slot open for `nonce`; None when every slot is taken."""
        with self._lock:
            if self._closed or not self._free:
                return None
            slot = self._free.pop()
        if not _lock(self._fd, slot, self.wait_s):  # a sender still inside this slot's last copy
            with self._lock:
                self._free.append(slot)
            return None
        try:
            at = HEADER_BYTES + slot * SLOT_BYTES
            self._map[at : at + 8] = nonce[:8].ljust(8, b"\0")
            self._map[at + 8] = OPEN
        finally:
            _unlock(self._fd, slot)
        return slot

    def close(self, slot: int) -> None:
        """Shuts the slot: waits for a copy in progress, then no write can start. Idempotent per open."""
        with self._lock:
            if self._closed:
                return
        at = HEADER_BYTES + slot * SLOT_BYTES
        locked = _lock(self._fd, slot, self.wait_s)
        if not locked:
            logger.error(
                "KV write gate: slot %d still locked by its sender after %.1f s; closing it anyway "
                "(a copy already started may still land in the freed pages)",
                slot,
                self.wait_s,
            )
        try:
            self._map[at + 8] = 0
            self._map[at : at + 8] = bytes(8)
        finally:
            if locked:
                _unlock(self._fd, slot)
        with self._lock:
            self._free.append(slot)

    def open_slots(self) -> int:
        with self._lock:
            return self.num_slots - len(self._free)

    def shutdown(self) -> None:
        """After every transfer is final: senders attached later find no file; attached ones keep
        theirs until they let go (every slot is closed)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._map.close()
        os.close(self._fd)


class GateView:
    """The sender's side, one per receiving peer: `writing(slot, nonce)` around each copy."""

    def __init__(self, fd: int, view: mmap.mmap, num_slots: int, wait_s: float):
        self._fd = fd
        self._map = view
        self.num_slots = num_slots
        self.wait_s = wait_s

    @classmethod
    def attach(cls, locator: dict[str, Any], wait_s: float) -> GateView:
        _check_platform()
        path = f"/proc/{int(locator['pid'])}/fd/{int(locator['fd'])}"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise GateError(f"cannot open the peer's write gate {path}: {exc.strerror}") from exc
        try:
            size = HEADER_BYTES + int(locator["slots"]) * SLOT_BYTES
            if os.fstat(fd).st_size != size:
                raise GateError(f"{path} is not the peer's write gate (size)")
            view = mmap.mmap(fd, size)
            if view[:TOKEN_BYTES] != locator["token"]:
                view.close()
                raise GateError(f"{path} is not the peer's write gate (token): another PID namespace?")
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, view, int(locator["slots"]), wait_s)

    @contextmanager
    def writing(self, slot: int, nonce: bytes) -> Iterator[bool]:
        """Holds the slot's lock for the body; yields whether the receiver still takes this
        transfer's writes. The body must have finished writing (device work synchronized)."""
        if not 0 <= slot < self.num_slots or self._map.closed:
            yield False
            return
        if not _lock(self._fd, slot, self.wait_s):
            yield False
            return
        try:
            at = HEADER_BYTES + slot * SLOT_BYTES
            yield self._map[at + 8] == OPEN and self._map[at : at + 8] == nonce[:8].ljust(8, b"\0")
        finally:
            _unlock(self._fd, slot)

    def close(self) -> None:
        if not self._map.closed:
            self._map.close()
            os.close(self._fd)
