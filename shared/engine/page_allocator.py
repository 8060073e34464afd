"""The free list of KV pages: plain ints, no torch (STYLE.md rule 3).

Page ids run 1..num_pages-1. Page 0 is reserved and never handed out: padded page tables point at
it, so writes from padded rows land there harmlessly (kv_pool.py).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable


class PageAllocator:
    """Hands out page ids and takes them back, exactly once each.

    Ownership: a page returned by `alloc` belongs to the caller until it is passed to `free`
    exactly once (or its ownership is handed to the radix cache, which then frees it on eviction).
    Freeing a page that is already free, page 0, or an id out of range raises ValueError and
    changes nothing: such a call is always a bookkeeping bug somewhere else.

    Order: lowest free id first (a min-heap). A fresh allocator hands out 1, 2, 3, ...; a freed page
    is reused before any higher free one. Deterministic, so tests can assert exact ids, and live
    pages stay packed at the low end of the pool.
    """

    def __init__(self, num_pages: int) -> None:
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is reserved), got {num_pages}")
        self._num_pages = num_pages
        self._heap: list[int] = []
        self._is_free = bytearray(num_pages)
        self.reset()

    def reset(self) -> None:
        """Makes every page free again; whatever callers still hold is forgotten."""
        self._heap = list(range(1, self._num_pages))  # ascending, hence already a valid heap
        self._is_free = bytearray(b"\x01") * self._num_pages
        self._is_free[0] = 0

    @property
    def num_total(self) -> int:
        """Pages that can ever be handed out (page 0 excluded)."""
        return self._num_pages - 1

    @property
    def num_free(self) -> int:
        return len(self._heap)

    def alloc(self, n: int) -> list[int] | None:
        """Returns n page ids (lowest first), or None when fewer than n are free: never a partial list."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > len(self._heap):
            return None
        pages = [heapq.heappop(self._heap) for _ in range(n)]
        for p in pages:
            self._is_free[p] = 0
        return pages

    def free(self, pages: Iterable[int]) -> None:
        """Returns pages to the free list. The whole call is checked before anything changes."""
        pages = list(pages)
        seen: set[int] = set()
        for p in pages:
            if not 1 <= p < self._num_pages:
                raise ValueError(f"page {p} is not a page of this pool (1..{self._num_pages - 1})")
            if self._is_free[p] or p in seen:
                raise ValueError(f"double free of page {p}")
            seen.add(p)
        for p in pages:
            self._is_free[p] = 1
            heapq.heappush(self._heap, p)

    def is_free(self, page: int) -> bool:
        return 1 <= page < self._num_pages and bool(self._is_free[page])

    def free_pages(self) -> list[int]:
        """The free page ids, ascending (a copy; for invariant checks and tests)."""
        return sorted(self._heap)
