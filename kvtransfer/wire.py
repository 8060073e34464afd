"""Control messages between KV managers: one dataclass each, msgpack on the wire.

Each manager binds one ROUTER socket (its endpoint) and reaches every peer through a DEALER
connected to the peer's ROUTER, so messages of one direction between two managers travel in order
over one connection. A message is a ZMQ multipart message:

    frame 0  msgpack [tag, src endpoint, src incarnation, {field: value}]
    frame 1  (Data over the zmq data plane only) the page bytes, sent zero-copy

`src` names the sending manager (peers key everything by it, never by ZMQ identities, which a
restarted process could reuse); `inc` is random per manager instance, so a peer restarted on the
same port is noticed (and logged: its old transfers fail through the dropped connection, and its
new ones must not).

A request's transfer is named by (peer endpoint, rid) until the receiver's `Ready` gives it a
`nonce` (random per receiver), which every later message carries: a retry that reuses the rid on
the same pair is a different transfer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack


class WireError(ValueError):
    """A frame that is not a known control message."""


@dataclass
class Ping:
    """Sent to every peer this manager has transfers with, each heartbeat interval."""

    TAG: ClassVar[str] = "ping"


@dataclass
class Pong:
    """The answer to any Ping, whether or not the answering manager knows of the transfers."""

    TAG: ClassVar[str] = "pong"


@dataclass
class Ready:
    """Receiver -> sender, from init(): where the pages go is local; the sender learns how many.

    `plane`: what the receiver's data plane offers this transfer (cuda_ipc: its shared pool, a
    write-gate slot and the destination page ids), None when it offers nothing beyond the usual."""

    TAG: ClassVar[str] = "ready"
    rid: str
    nonce: bytes
    num_pages: int
    layout: dict[str, Any]
    plane: dict[str, Any] | None = None


@dataclass
class Bound:
    """Sender -> receiver: a sender took the Ready (the receiver moves to WaitingForInput)."""

    TAG: ClassVar[str] = "bound"
    nonce: bytes


@dataclass
class Data:
    """Sender -> receiver: pages [first_page, +num_pages) x layers [layer_begin, layer_end).

    The bytes follow as frame 1 (zmq) or over the pair's NCCL link `link` (nccl), or are already in
    the receiver's pages when `via` is "cuda_ipc" (the sender wrote them before sending this). The
    last message of a transfer has is_last, the request's total page count and the first_output."""

    TAG: ClassVar[str] = "data"
    rid: str
    nonce: bytes
    first_page: int
    num_pages: int
    layer_begin: int
    layer_end: int
    dtype: str
    nbytes: int
    is_last: bool = False
    total_pages: int = -1
    first_output: dict[str, Any] | None = None
    link: int = 0
    via: str = ""


@dataclass
class Ack:
    """Receiver -> sender: every page of the transfer is written; the sender is Success."""

    TAG: ClassVar[str] = "ack"
    nonce: bytes


@dataclass
class Abort:
    """Either way: the transfer failed on the sending side. `nonce` is None when the sender aborts
    before any Ready reached it; `to_sender` tells which side of the addressee it concerns."""

    TAG: ClassVar[str] = "abort"
    rid: str
    nonce: bytes | None
    reason: str
    to_sender: bool


@dataclass
class NcclHello:
    """nccl data plane, sender -> receiver: join communicator `link` (rank 1) from this unique id."""

    TAG: ClassVar[str] = "nccl_hello"
    link: int
    uid: bytes


@dataclass
class NcclLinkDown:
    """nccl data plane, either way: communicator `link` is gone; fail what used it."""

    TAG: ClassVar[str] = "nccl_down"
    link: int
    reason: str


MESSAGE_TYPES: dict[str, type] = {
    cls.TAG: cls for cls in (Ping, Pong, Ready, Bound, Data, Ack, Abort, NcclHello, NcclLinkDown)
}


def encode(src: str, inc: str, msg: Any) -> bytes:
    fields = {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg)}
    return msgpack.packb([msg.TAG, src, inc, fields], use_bin_type=True)


def decode(frame: bytes) -> tuple[str, str, Any]:
    """(src, inc, message); raises WireError on anything else."""
    try:
        tag, src, inc, fields = msgpack.unpackb(frame, raw=False, strict_map_key=False)
        if not isinstance(src, str) or not isinstance(inc, str):
            raise TypeError("src and inc must be strings")
        return src, inc, MESSAGE_TYPES[tag](**fields)
    except (KeyError, TypeError, ValueError, msgpack.exceptions.ExtraData) as exc:
        raise WireError(f"bad control frame: {exc!r}") from exc
