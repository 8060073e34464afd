"""The KV transfer interface: how a prefill worker's pages reach a decode worker.

One `KVManager` per worker and backend owns the sockets, threads or communicators; it makes one
`KVSender` (prefill side) or `KVReceiver` (decode side) per request. Locations are page ids of each
side's own `PagedKVPool` (layout `[num_pages, page_size, kv_heads, head_dim]` per layer, K and V):
the sender names its pages, the receiver names its pages, and the backend moves page i of the one
list into page i of the other. No model-specific field crosses this interface.

The life of one request's transfer:

    decode worker                                   prefill worker
    receiver = mgr.make_receiver(rid, src)          sender = mgr.make_sender(rid, dest)
    receiver.init(dest_pages)  ──"where"──▶         sender.poll() == WaitingForInput
                                                    sender.send(pages of chunk 1, is_last=False)
                               ◀──pages────         ...
                               ◀──pages + first──   sender.send(last pages, is_last=True, first_output={...})
    receiver.poll() == Success                      sender.poll() == Success (receiver acknowledged,
    receiver.first_output                           or the sender's own last write into its pages
                                                    finished); the sender's pages may be reused

Rules every backend keeps:
- `poll()` never blocks; it reports a `KVPoll`. States only move forward, except to Failed, which is
  final. The enum is ordered (Failed < Bootstrapping < WaitingForInput < Transferring < Success), so
  several ranks of one request can agree by taking the minimum.
- A sender's pages must stay untouched (not freed, not reused) from `send()` until the sender is
  Success or Failed. A receiver's pages are written only between `init()` and a final state; after
  `abort()` returns, the backend writes nothing more into them, so the caller may free them at once.
- `send()` calls are ordered: the pages of successive calls continue the request's page list;
  the last call has `is_last=True` and carries `first_output` (the first sampled token and its
  logprob data, a msgpack-able dict) that the receiver exposes after Success.
- A peer that dies, aborts or stops answering heartbeats makes the transfer Failed within
  `heartbeat_timeout_s` (seconds, not minutes); `failure_reason` then says why. A transfer that does
  not finish within `transfer_timeout_s` fails too.
- `abort()` is idempotent, tells the peer when it can, and leaves the transfer Failed.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from pdserve.shared.engine.kv_pool import PagedKVPool

HeadRange = tuple[int, int]  # [start, stop) of a pool's KV heads (kvtransfer/head_slice.py)


class KVPoll(enum.IntEnum):
    Failed = 0
    Bootstrapping = 1  # the peer is not known to be ready yet (receiver: no sender contact yet)
    WaitingForInput = 2  # ready; sender: waiting for send() calls; receiver: waiting for pages
    Transferring = 3
    Success = 4


class KVTransferError(RuntimeError):
    """A transfer that cannot even start (unknown peer address, closed manager)."""


@dataclass(frozen=True)
class KVTransferConfig:
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 5.0
    transfer_timeout_s: float = 60.0


class KVSender(ABC):
    """Prefill side of one request's transfer. Owned and polled by the prefill worker's loop."""

    rid: str
    failure_reason: str | None = None

    @abstractmethod
    def send(self, pages: list[int], is_last: bool, first_output: dict[str, Any] | None = None) -> None:
        """Queues the next pages of the request (sender page ids) for transfer; never blocks."""

    @abstractmethod
    def poll(self) -> KVPoll: ...

    @abstractmethod
    def abort(self, reason: str = "aborted by the prefill worker") -> None: ...


class KVReceiver(ABC):
    """Decode side of one request's transfer. Owned and polled by the decode worker's loop."""

    rid: str
    failure_reason: str | None = None

    @abstractmethod
    def init(self, pages: list[int]) -> None:
        """Names the pre-allocated destination pages (receiver page ids, in request order) and tells
        the sender it may start. Called once."""

    @abstractmethod
    def poll(self) -> KVPoll: ...

    @property
    @abstractmethod
    def first_output(self) -> dict[str, Any] | None:
        """The sender's `first_output`, once Success; None before."""

    @abstractmethod
    def abort(self, reason: str = "aborted by the decode worker") -> None: ...


class KVManager(ABC):
    """One per worker: reachable at `endpoint`; makes senders and receivers; `close()` ends all.

    `heads` (start, stop) on a handle moves only those KV heads of this manager's pool, into the
    peer's handle's own range of as many heads (kvtransfer/head_slice.py). Only a manager whose
    `moves_head_slices` is true takes it; others raise KVTransferError."""

    endpoint: str
    moves_head_slices: bool = False

    def __init__(self, pool: PagedKVPool, worker_id: str, config: KVTransferConfig | None = None):
        self.pool = pool
        self.worker_id = worker_id
        self.config = config or KVTransferConfig()

    @abstractmethod
    def make_sender(self, rid: str, dest_endpoint: str, heads: HeadRange | None = None) -> KVSender: ...

    @abstractmethod
    def make_receiver(self, rid: str, src_endpoint: str, heads: HeadRange | None = None) -> KVReceiver: ...

    @abstractmethod
    def close(self) -> None: ...
