"""How page bytes move between two managers; everything else is the control plane's (control.py).

The control plane decides what to send and when (after the receiver's Ready, in order, cut into
messages by layout.plan_messages), validates what arrives, counts cells and owns every state
change. A data plane only copies:

- `submit()` (sender, I/O thread): stage the message's pages and get the `Data` header plus bytes
  to the peer. It reads the sender's pages only under `rec.state.lock` and only while the state is
  not final, and must have finished reading when it lets go of the lock. It sends the header
  through `host.send()` only for bytes it really sent, in submission order.
- `receive()` (receiver): write the bytes into `dst_pages` under `rec.state.lock`, only while the
  state is not final, finished (device work synchronized) before letting go, then call `done()` on
  the I/O thread via `host.call_soon` (or directly when already on it), in arrival order.
- `discard()`: bytes announced by a header whose transfer is unknown or failed validation: consume
  them (NCCL must post the matching receive) and write nothing.

A plane whose sender writes straight into the receiver's pages (cuda_ipc) hands the receiver's
page ids and whatever else the sender needs to the sender through `offer()` (carried by Ready);
the sender finds it in `rec.offer` when `on_bound(rec)` is called. Its sender is done when its
last write is (`done_when_written`): the Ack would only say what the finished copy already does. Such a plane keeps the
receiver's rule (nothing written after a final state) with a closer on the receiver's state
(state.py), since the writing happens in the other process.

Plane-specific control messages (NCCL's link set-up) are registered through `handlers()`.

A plane that copies with torch indexing (zmq) may move a head slice of the pool (head_slice.py):
it says so with `moves_head_slices` and copies from and into the record's `region`; the others
are only given transfers of the whole pool.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from pdserve.kvtransfer.layout import MessageSpec
from pdserve.kvtransfer.plane_host import PlaneHost
from pdserve.kvtransfer.records import InboundTransfer, OutboundTransfer
from pdserve.kvtransfer.wire import Data


class DataPlane(ABC):
    moves_head_slices = False

    def __init__(self, host: PlaneHost):
        self.host = host

    def handlers(self) -> dict[type, Callable[[str, Any, list], None]]:
        return {}

    def payload_error(self, msg: Data, payload: list) -> str | None:
        """Why the frames that came with `msg` are wrong for this plane, or None."""
        return None

    def offer(self, rec: InboundTransfer) -> dict[str, Any] | None:
        """Receiver, I/O thread, from init(): what goes to the sender in Ready.plane (None: nothing).
        May fail `rec` (through the host) instead."""
        return None

    def on_bound(self, rec: OutboundTransfer) -> None:
        """A sender of this manager is bound to its receiver (`rec.peer`, `rec.offer`); NCCL opens
        its link now. May fail `rec` (through the host)."""

    def message_bytes(self, rec: OutboundTransfer) -> int:
        """The most bytes one message of `rec` may carry (send() chunks are cut to it)."""
        return self.host.max_message_bytes

    def done_when_written(self, rec: OutboundTransfer) -> bool:
        """True when the sender's own writes finish `rec` (cuda_ipc writes the receiver's pages
        itself): it is Success once its last message is submitted, without the receiver's Ack."""
        return False

    @abstractmethod
    def submit(
        self, rec: OutboundTransfer, msg: Data, spec: MessageSpec, src_pages: list[int], ready_event: Any
    ) -> bool:
        """Takes one message; False (nothing taken) when out of staging room: asked again later."""

    @abstractmethod
    def receive(
        self,
        rec: InboundTransfer,
        msg: Data,
        spec: MessageSpec,
        dst_pages: list[int],
        payload: list,
        done: Callable[[], None],
    ) -> None: ...

    @abstractmethod
    def discard(self, peer: str, msg: Data, payload: list) -> None: ...

    def on_peer_lost(self, peer: str) -> None:
        """Every transfer with `peer` has failed (dead, restarted): drop what is held for it."""

    def on_peer_idle(self, peer: str) -> None:
        """`peer` has had no transfer for a while and its connection is closed: a plane may drop
        what it keeps for it (nothing would tell it of the peer's death any more)."""

    def stats(self) -> dict[str, int]:
        """What the plane holds, for leak checks (merged into the manager's stats())."""
        return {}

    def close(self) -> None: ...
