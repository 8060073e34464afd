"""The scheduler's only door to KV pages (STYLE.md rule 4): a page allocator plus a radix prefix cache.

A request's page list is always [tree pages][own pages]: the first num_tree_pages(node) pages
belong to the radix tree and are kept alive by the lock the request holds on `node`; the rest were
allocated for it and are its alone. The calls, in a request's life:

    hit = match_prefix(tokens)       # longest cached whole-page prefix; locks nothing
    acquire(hit)                     # lock it: pages = hit.pages, node = hit.node
    pages += allocate(n)             # None: not enough even after evicting; retry later or retract
    pages, node = cache_request(computed_tokens, pages, node)   # after a chunk: share what is done
    release(computed_tokens, pages, node, cache=...)            # finish / abort / retract

No torch here: page ids are plain ints (STYLE.md rule 3).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

from pdserve.shared.engine.page_allocator import PageAllocator
from pdserve.shared.engine.radix_cache import RadixCache
from pdserve.shared.engine.radix_node import PrefixHit, RadixListener, RadixNode


class KVCacheManager:
    """Owns every page of one KV pool (ids 1..num_pages-1) and the prefix cache over them.

    With enable_radix=False nothing is shared: hits are empty (node None), cache_request changes
    nothing and release frees every page of the request.
    `listener` hears the prefix cache's stored, evicted and cleared pages (radix_node.py): the
    prefix index's source (shared/cluster/kv_events.py).
    """

    def __init__(
        self, num_pages: int, page_size: int, enable_radix: bool = True, listener: RadixListener | None = None
    ) -> None:
        self.page_size = page_size
        self.enable_radix = enable_radix
        self._allocator = PageAllocator(num_pages)
        self._radix = RadixCache(self._allocator, page_size, disable=not enable_radix, listener=listener)

    # ---- counters ----

    @property
    def num_total_pages(self) -> int:
        return self._allocator.num_total

    @property
    def num_free_pages(self) -> int:
        return self._allocator.num_free

    @property
    def num_evictable_pages(self) -> int:
        """Cached pages no running request holds: allocate() may take them."""
        return self._radix.evictable_pages

    @property
    def num_cached_pages(self) -> int:
        """Pages in the prefix cache, held by requests or not."""
        return self._radix.total_pages

    @property
    def available_pages(self) -> int:
        """What allocate() can hand out right now: free pages plus evictable cached ones."""
        return self._allocator.num_free + self._radix.evictable_pages

    # ---- the request's life ----

    def match_prefix(self, tokens: Sequence[int]) -> PrefixHit:
        """Longest cached whole-page prefix of `tokens`. Locks nothing: acquire(hit) before any allocate."""
        return self._radix.match_prefix(tokens)

    def acquire(self, hit: PrefixHit) -> None:
        """The request now holds hit.pages (its page list starts with them) and hit.node, locked."""
        self._radix.lock(hit.node)

    def allocate(self, num_pages: int) -> list[int] | None:
        """num_pages pages owned by the caller, evicting least recently used unlocked cache pages if needed.

        Returns None when free plus evictable pages are fewer than num_pages; nothing is evicted
        then, so a failed attempt does not cost the cache anything.
        """
        short = num_pages - self._allocator.num_free
        if short > 0:
            if short > self._radix.evictable_pages:
                return None
            self._radix.evict(short)
        return self._allocator.alloc(num_pages)

    def cache_request(
        self, tokens: Sequence[int], pages: Sequence[int], node: RadixNode | None
    ) -> tuple[list[int], RadixNode | None]:
        """Shares a running request's computed whole pages through the tree; returns (pages, node) to keep.

        tokens: the tokens whose KV is computed (at least the prefix `node` covers); pages: the
        request's full page list, which may reach beyond the tokens; node: the handle it holds
        (None or the root when it matched nothing). The whole pages of `tokens` go into the tree;
        where another request got there first, the request's duplicate pages are freed and replaced
        in the returned list by the tree's. The new deepest node is locked and `node` unlocked.
        Pages past the whole-page prefix stay the request's own.
        """
        if not self.enable_radix:
            return list(pages), node
        n = self._check_request(tokens, pages, node)
        tree_pages, new_node = self._insert(tokens, pages)
        self._radix.lock(new_node)  # before the unlock, so shared ancestors never drop to zero
        self._radix.unlock(node)
        return tree_pages + list(pages[n:]), new_node

    def release(
        self, tokens: Sequence[int], pages: Sequence[int], node: RadixNode | None, cache: bool = True
    ) -> None:
        """The request gives back everything it holds: finish, abort or retraction.

        cache=True (radix enabled): the whole pages of `tokens` (those whose KV is computed) go into
        the tree, duplicates are freed, and every other page of the request (a partly filled last
        page, pages allocated beyond the tokens) is freed. cache=False: the request's own pages are
        freed and `tokens` is not looked at. Either way `node` is unlocked. Radix disabled: every
        page is freed. Afterwards the request holds nothing and must drop pages and node.
        """
        if not self.enable_radix:
            self._allocator.free(pages)
            return
        if cache:
            own_from = self._check_request(tokens, pages, node)
            self._insert(tokens, pages)
        else:
            own_from = self.num_tree_pages(node)
            if len(pages) < own_from:
                raise ValueError(f"node covers {own_from} pages, request lists only {len(pages)}")
        self._allocator.free(pages[own_from:])
        self._radix.unlock(node)

    def num_tree_pages(self, node: RadixNode | None) -> int:
        """How many leading pages of a request's list belong to the tree, given the handle it holds.

        0 for None or the root; the pages after these are the request's own. Raises ValueError for a
        handle that is not held (never acquired, already released, or evicted): using it to release
        would free or unlock something twice. Checked before anything changes.
        """
        if not self._radix.is_locked(node):
            raise ValueError(f"{node} is not held by any request")
        return self._radix.prefix_len(node) // self.page_size

    def flush(self) -> bool:
        """Empties the prefix cache; returns False and changes nothing while any request holds cached pages."""
        if self._radix.protected_pages:
            return False
        self._radix.reset()
        return True

    # ---- helpers ----

    def _check_request(self, tokens: Sequence[int], pages: Sequence[int], node: RadixNode | None) -> int:
        """Whole pages of `tokens`, after checking that tokens and pages cover what node already covers."""
        n = len(tokens) // self.page_size
        held = self.num_tree_pages(node) * self.page_size
        if len(tokens) < held:
            raise ValueError(
                f"{len(tokens)} computed tokens, fewer than the {held} the request's node covers"
            )
        if len(pages) < n:
            raise ValueError(f"{len(tokens)} computed tokens need {n} pages, request lists {len(pages)}")
        return n

    def _insert(self, tokens: Sequence[int], pages: Sequence[int]) -> tuple[list[int], RadixNode | None]:
        """Inserts the whole pages of tokens, frees the caller's duplicates; returns the tree's pages and node."""
        present = self._radix.insert(tokens, pages) // self.page_size
        hit = self._radix.match_prefix(tokens)  # now covers every whole page; ends on a node boundary
        duplicates = [mine for mine, tree in zip(pages[:present], hit.pages) if mine != tree]
        self._allocator.free(duplicates)
        return hit.pages, hit.node

    def check_invariants(self, held_outside: Iterable[int] = ()) -> None:
        """For tests: raises AssertionError unless every page is in exactly one place.

        held_outside: the pages requests hold outside the tree (their own pages, not the tree
        pages their node covers). Free + tree + held must be each page 1..num_total exactly once;
        the tree's own structure and lock counts are checked too.
        """
        free = self._allocator.free_pages()
        tree = self._radix.all_pages()
        held = list(held_outside)
        counts = Counter(free)
        counts.update(tree)
        counts.update(held)
        twice = sorted(p for p, c in counts.items() if c > 1)
        if twice:
            where = {
                p: [name for name, group in (("free", free), ("tree", tree), ("held", held)) if p in group]
                for p in twice[:5]
            }
            raise AssertionError(f"pages in more than one place (or held twice): {where}")
        expected = set(range(1, self.num_total_pages + 1))
        if set(counts) != expected:
            raise AssertionError(
                f"leaked pages {sorted(expected - set(counts))[:10]}, unknown pages {sorted(set(counts) - expected)[:10]}"
            )
        self._radix.check_invariants()
