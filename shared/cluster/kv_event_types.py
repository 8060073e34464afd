"""The prefix index's Redis schema: KV events on one stream, and one snapshot per worker.

Stream `pdserve:kv_events` (XADD with MAXLEN ~ STREAM_MAXLEN): one entry per run of same-kind
events of one worker, fields
    worker  the worker_id (as in its membership key)
    kind    stored | removed | cleared
    hashes  the pages' chain hashes (shared/cluster/page_hash.py), packed little-endian uint64 ("" for cleared)
"stored": the worker's radix cache now holds these pages; "removed": it no longer does (evicted);
"cleared": it holds nothing (cache flushed or reset, or the worker (re)started).

Snapshot `pdserve:kv_snapshot:<worker_id>`: a hash with
    stream_id  the id of the worker's last entry folded into it ("0-0": none yet)
    page_size  the worker's page size (an index with another page size ignores the worker)
    hashes     every page the worker held after that entry, packed as above
written by the worker's publisher with a TTL of SNAPSHOT_TTL_S that it keeps refreshing. A reader
that takes the snapshot and then the worker's entries with ids above `stream_id` has the worker's
exact state, without replaying the stream from its start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pdserve.shared.cluster.page_hash import pack_hashes, unpack_hashes

STREAM_KEY = "pdserve:kv_events"
SNAPSHOT_PREFIX = "pdserve:kv_snapshot:"
STREAM_MAXLEN = 100_000  # entries; each is a batch, so minutes of a busy cluster's events
SNAPSHOT_TTL_S = 30.0
KINDS = ("stored", "removed", "cleared")


def snapshot_key(worker_id: str) -> str:
    return SNAPSHOT_PREFIX + worker_id


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def stream_id_key(stream_id: Any) -> tuple[int, int]:
    """A stream id ("ms-seq", str or bytes) as a tuple that orders like the stream."""
    ms, _, seq = _text(stream_id).partition("-")
    return int(ms), int(seq or 0)


@dataclass
class KVEvent:
    """One stream entry: `kind` of `hashes` on `worker_id` (hashes empty for cleared)."""

    worker_id: str
    kind: str
    hashes: list[int]

    def to_fields(self) -> dict[str, bytes]:
        return {
            "worker": self.worker_id.encode(),
            "kind": self.kind.encode(),
            "hashes": pack_hashes(self.hashes),
        }

    @classmethod
    def from_fields(cls, fields: dict[Any, Any]) -> KVEvent:
        """ValueError for an entry this reader cannot use (unknown kind, torn hashes)."""
        get = {_text(k): v for k, v in fields.items()}
        kind = _text(get.get("kind", b""))
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}")
        raw = get.get("hashes", b"")
        return cls(_text(get.get("worker", b"")), kind, unpack_hashes(raw if isinstance(raw, bytes) else b""))


@dataclass
class KVSnapshot:
    stream_id: str
    page_size: int
    hashes: list[int]

    def to_fields(self) -> dict[str, bytes]:
        return {
            "stream_id": self.stream_id.encode(),
            "page_size": str(self.page_size).encode(),
            "hashes": pack_hashes(self.hashes),
        }

    @classmethod
    def from_fields(cls, fields: dict[Any, Any]) -> KVSnapshot:
        """ValueError (or KeyError) for a malformed snapshot."""
        get = {_text(k): v for k, v in fields.items()}
        stream_id = _text(get["stream_id"])
        stream_id_key(stream_id)  # validates
        return cls(stream_id, int(_text(get["page_size"])), unpack_hashes(get["hashes"]))
