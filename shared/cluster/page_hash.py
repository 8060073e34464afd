"""Chained page hashes: the names workers and routers give to whole KV pages of a token sequence.

    hashes = page_hashes(input_ids, page_size)      # one per whole page; a partial last page has none
    h = next_page_hash(prev, input_ids[j * ps : (j + 1) * ps])   # the same chain, one page at a time

Rules:
- The hash of page j covers every token in [0, (j + 1) * page_size): it is
  `next_page_hash(hash of page j - 1, tokens of page j)`, and page 0 chains from `ROOT_HASH`. A KV
  page depends on everything before it, so two sequences share page j's hash exactly when (up to
  collisions) they share their first j + 1 pages.
- Stable across processes, machines and Python versions: BLAKE2b with an 8-byte digest over the
  previous hash and the page's token ids packed as little-endian int64, read back as an unsigned
  little-endian 64-bit int. Never Python's `hash()`, which is salted per process.
- Only whole pages are hashed; the radix cache holds whole pages only, so a router never needs more.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator, Sequence

ROOT_HASH = 0  # the "previous hash" of page 0
HASH_BYTES = 8


def next_page_hash(prev: int, page: Sequence[int]) -> int:
    """The chain hash of one page given the hash of the page before it (ROOT_HASH for page 0)."""
    data = prev.to_bytes(HASH_BYTES, "little") + struct.pack(f"<{len(page)}q", *page)
    return int.from_bytes(hashlib.blake2b(data, digest_size=HASH_BYTES).digest(), "little")


def iter_page_hashes(tokens: Sequence[int], page_size: int, prev: int = ROOT_HASH) -> Iterator[int]:
    """The chain hashes of the whole pages of `tokens`, lazily: a caller that stops early hashes less.

    `prev` is the hash of the page just before tokens[0] (ROOT_HASH when tokens start the sequence),
    so a tree node can hash its own pages from its parent's last hash.
    """
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    for start in range(0, len(tokens) // page_size * page_size, page_size):
        prev = next_page_hash(prev, tokens[start : start + page_size])
        yield prev


def page_hashes(tokens: Sequence[int], page_size: int, prev: int = ROOT_HASH) -> list[int]:
    """All chain hashes of the whole pages of `tokens` (see iter_page_hashes)."""
    return list(iter_page_hashes(tokens, page_size, prev))


def pack_hashes(hashes: Sequence[int]) -> bytes:
    """Hashes as bytes for Redis: little-endian uint64s, 8 bytes each."""
    return struct.pack(f"<{len(hashes)}Q", *hashes)


def unpack_hashes(data: bytes) -> list[int]:
    """The inverse of pack_hashes; ValueError when the length is not a multiple of 8."""
    if len(data) % HASH_BYTES:
        raise ValueError(f"{len(data)} bytes is not a whole number of {HASH_BYTES}-byte hashes")
    return list(struct.unpack(f"<{len(data) // HASH_BYTES}Q", data))
