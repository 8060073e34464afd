"""The two narrow interfaces inside a control-plane manager (control.py), so that its parts do not
reach into each other:

- `PlaneHost`: what a data plane (zmq.py, nccl.py, cuda_ipc.py, auto.py) and NCCL's links may ask
  of their manager: the pool and its layout, the config, sending to a peer, running something on
  the I/O thread, and failing transfers (the transfer table decides what failing means).
- `PeerLink`: what the transfer table (transfers.py) asks of the peer layer (peers.py): send, and
  count the transfers in progress with each peer. The table touches no socket itself, so it runs
  in tests against an in-memory link.
- `HandleHost`: what the worker-side handles (handles.py) ask of their manager, from the worker's
  thread: hand a chunk, a receiver's pages or an abort to the I/O thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from pdserve.kvtransfer.base import KVTransferConfig
from pdserve.kvtransfer.layout import KVLayout
from pdserve.kvtransfer.records import Chunk, InboundTransfer, OutboundTransfer
from pdserve.shared.engine.kv_pool import PagedKVPool


class PlaneHost(Protocol):
    pool: PagedKVPool
    layout: KVLayout
    config: KVTransferConfig
    max_message_bytes: int

    def send(self, peer: str, msg: Any, payload: Any = None) -> Any:
        """Queues msg (and a zero-copy payload) for a peer with transfers in progress, in call
        order; the payload's MessageTracker, None without payload, False if the peer is gone."""

    def call_soon(self, fn: Callable[[], None]) -> bool:
        """Runs fn on the I/O thread; False when the manager is closed."""

    def fail_outbound(self, rec: OutboundTransfer, reason: str, tell: bool = True) -> None: ...

    def fail_inbound(self, rec: InboundTransfer, reason: str, tell: bool = True) -> None: ...

    def fail_transfers_with(
        self, peer: str, reason: str, outbound: bool = True, inbound: bool = True
    ) -> None: ...


class PeerLink(Protocol):
    def send(self, endpoint: str, msg: Any, payload: Any = None, create: bool = True) -> Any:
        """Queues msg for `endpoint`; with `create` off, only to a peer already known."""

    def retain(self, endpoint: str, now: float) -> None:
        """A transfer with `endpoint` starts (connect if needed)."""

    def release(self, endpoint: str, now: float) -> None:
        """A transfer with `endpoint` is over."""

    def active_count(self) -> int:
        """Peers with a transfer in progress."""


class HandleHost(Protocol):
    """Each call hands work to the I/O thread; False when the manager is closed (nothing will run)."""

    def ready_event(self) -> Any:
        """CUDA pools: an event on the caller's stream, so copies wait for its kernels; else None."""

    def queue_chunk(self, rec: OutboundTransfer, chunk: Chunk) -> bool: ...

    def init_receiver(self, rec: InboundTransfer, pages: list[int]) -> bool: ...

    def aborted_out(self, rec: OutboundTransfer) -> None:
        """The worker aborted `rec` (its state is Failed already): tell the receiver, drop it."""

    def aborted_in(self, rec: InboundTransfer) -> None:
        """The worker aborted `rec` (its state is Failed already): tell the sender, drop it."""
