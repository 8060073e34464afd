"""Bookkeeping of one transfer on the control plane's I/O thread (control.py).

Only the I/O thread reads or writes these fields, except `state`, which the worker's handles read
(poll) and fail (abort) under its lock (state.py). A record is in the manager's tables from its
registration until it is final and its peer has been told (or cannot be): then it is `dropped`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from pdserve.kvtransfer.head_slice import KVRegion
from pdserve.kvtransfer.layout import MessageSpec
from pdserve.kvtransfer.state import TransferState


@dataclass(eq=False)
class Chunk:
    """One send() call: its sender page ids and where they start in the request's page list."""

    first_page: int
    pages: list[int]
    is_last: bool
    first_output: dict[str, Any] | None
    # CUDA pools: an event recorded on the caller's stream by send(); the copy-out waits for it, so
    # KV written by kernels still in flight when send() was called is what gets sent.
    ready_event: Any = None
    specs: list[MessageSpec] | None = None  # planned by the I/O thread when the chunk is reached
    next_spec: int = 0


@dataclass(eq=False)
class OutboundTransfer:
    rid: str
    peer: str
    state: TransferState
    region: KVRegion  # what it reads: the manager's pool or a head slice of it (head_slice.py)
    nonce: bytes | None = None  # from the receiver's Ready
    dest_num_pages: int | None = None
    chunks: deque[Chunk] = field(default_factory=deque)
    pages_queued: int = 0  # pages of all chunks queued so far (the request's page count once last)
    last_submitted: bool = False  # the is_last message went to the data plane
    dropped: bool = False
    offer: dict[str, Any] | None = None  # the receiver's Ready.plane
    via: str = ""  # the data plane chosen for this transfer, where a manager has several (auto)

    @property
    def key(self) -> tuple[str, str]:
        return (self.peer, self.rid)


@dataclass(eq=False)
class InboundTransfer:
    rid: str
    peer: str
    nonce: bytes
    state: TransferState
    region: KVRegion  # what it writes: the manager's pool or a head slice of it (head_slice.py)
    pages: list[int] | None = None  # receiver page ids, from init()
    cells_written: int = 0
    first_output: dict[str, Any] | None = None
    dropped: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.peer, self.rid)
