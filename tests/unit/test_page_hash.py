"""Chained page hashes: the chain rule, whole pages only, a pinned format, packing for Redis."""

import hashlib
import struct

import pytest

from pdserve.shared.cluster.page_hash import (
    ROOT_HASH,
    iter_page_hashes,
    next_page_hash,
    pack_hashes,
    page_hashes,
    unpack_hashes,
)


def reference_hash(prev: int, page: list[int]) -> int:
    """The documented format, written out: blake2b-64 over prev (u64 LE) then the tokens (i64 LE)."""
    data = struct.pack("<Q", prev) + b"".join(struct.pack("<q", t) for t in page)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def test_chain_rule_and_whole_pages_only():
    tokens = list(range(100, 111))  # 11 tokens, page size 4: two whole pages, 3 tokens left over
    h0 = reference_hash(ROOT_HASH, [100, 101, 102, 103])
    h1 = reference_hash(h0, [104, 105, 106, 107])
    assert page_hashes(tokens, 4) == [h0, h1]
    assert page_hashes(tokens[:8], 4) == [h0, h1]
    assert page_hashes(tokens[:7], 4) == [h0]
    assert page_hashes(tokens[:3], 4) == []
    assert next_page_hash(h0, tokens[4:8]) == h1
    # a node hashes its own pages from its parent's last hash
    assert page_hashes(tokens[4:], 4, prev=h0) == [h1]


def test_a_page_hash_covers_everything_before_it():
    a = page_hashes([1, 2, 3, 4], 2)
    b = page_hashes([9, 2, 3, 4], 2)
    assert a[0] != b[0] and a[1] != b[1]  # same second page, different history
    assert page_hashes([1, 2, 3, 4], 1)[:2] == page_hashes([1, 2], 1)
    assert page_hashes([1, 2], 2) != page_hashes([1, 2], 1)[-1:]  # page size is part of the name


def test_format_is_pinned():
    # routers and workers of different builds must agree: these values may never change
    assert page_hashes([1, 2, 3, 4], 2) == [8901564848246840783, 5144891096145841010]
    assert next_page_hash(ROOT_HASH, [0]) == 0x0E74_94F9_07A5_5052
    assert next_page_hash(7, [2**40, -1]) == reference_hash(7, [2**40, -1])
    assert all(0 <= h < 2**64 for h in page_hashes(list(range(64)), 4))


def test_iteration_is_lazy():
    it = iter_page_hashes(list(range(10_000)), 1)
    assert next(it) == reference_hash(0, [0])
    with pytest.raises(ValueError):
        page_hashes([1], 0)


def test_pack_round_trip():
    hashes = [0, 1, 2**64 - 1, 0x0123_4567_89AB_CDEF]
    data = pack_hashes(hashes)
    assert len(data) == 32 and data[8:16] == b"\x01" + b"\x00" * 7
    assert unpack_hashes(data) == hashes
    assert unpack_hashes(b"") == []
    with pytest.raises(ValueError):
        unpack_hashes(b"\x00" * 9)
