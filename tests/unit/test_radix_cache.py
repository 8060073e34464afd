"""RadixCache: whole-page matching, splits, insert's prefix length, LRU eviction order, locks."""

import pytest

from pdserve.shared.engine.page_allocator import PageAllocator
from pdserve.shared.engine.radix_cache import RadixCache


def make(page_size: int, num_pages: int = 32) -> tuple[PageAllocator, RadixCache]:
    alloc = PageAllocator(num_pages)
    return alloc, RadixCache(alloc, page_size)


def eviction_order(alloc: PageAllocator, cache: RadixCache) -> list[int]:
    """Evicts one page at a time and reports which page each step freed."""
    order = []
    while cache.evictable_pages:
        before = set(alloc.free_pages())
        assert cache.evict(1) == 1
        (page,) = set(alloc.free_pages()) - before
        order.append(page)
        cache.check_invariants()
    return order


def test_only_whole_pages_match():
    alloc, cache = make(page_size=16)
    prompt = list(range(37))
    pages = alloc.alloc(3)
    assert pages == [1, 2, 3]
    assert cache.insert(prompt, pages) == 0
    assert cache.total_pages == 2  # page 3 (the partial one) stays the caller's
    alloc.free([3])
    hit = cache.match_prefix(prompt)
    assert (hit.pages, hit.num_tokens) == ([1, 2], 32)
    hit = cache.match_prefix(prompt[:31])
    assert (hit.pages, hit.num_tokens) == ([1], 16)
    hit = cache.match_prefix(prompt[:15])
    assert (hit.pages, hit.num_tokens, hit.node) == ([], 0, cache.root)
    assert cache.match_prefix([5] + prompt[1:]).pages == []
    cache.check_invariants()


def test_match_splits_a_node_where_it_ends():
    alloc, cache = make(page_size=4)
    a = list(range(12))
    assert cache.insert(a, alloc.alloc(3)) == 0
    hit = cache.match_prefix(list(range(8)) + [99, 99, 99, 99])
    assert (hit.pages, hit.num_tokens) == ([1, 2], 8)
    assert (
        cache.pretty()
        == "[0, 1, 2, 3, 4, 5, 6, 7] pages=[1, 2] lock=0 t=2\n  [8, 9, 10, 11] pages=[3] lock=0 t=1"
    )
    # A later match ending on that boundary returns the same handle; one ending inside splits again.
    assert cache.match_prefix(list(range(10))).node is hit.node
    short = cache.match_prefix(list(range(5)))
    assert (short.pages, short.node.parent) == ([1], cache.root)
    assert cache.prefix_len(hit.node) == 8 and cache.prefix_len(short.node) == 4
    assert cache.match_prefix(a).pages == [1, 2, 3]
    cache.check_invariants()


def test_splitting_a_locked_node_keeps_the_lock_on_both_parts():
    alloc, cache = make(page_size=4)
    a = list(range(12))
    cache.insert(a, alloc.alloc(3))
    held = cache.match_prefix(a).node
    cache.lock(held)
    assert (cache.protected_pages, cache.evictable_pages) == (3, 0)
    upper = cache.match_prefix(list(range(4))).node  # splits the locked node
    assert upper.lock_ref == 1 and held.lock_ref == 1 and held.parent is upper
    cache.check_invariants()
    cache.unlock(held)
    assert (cache.protected_pages, cache.evictable_pages) == (0, 3)
    cache.check_invariants()


def test_insert_returns_the_prefix_already_present():
    alloc, cache = make(page_size=4)
    a = list(range(12))
    assert cache.insert(a, alloc.alloc(3)) == 0
    longer = a + [12, 13, 14, 15, 16]
    mine = alloc.alloc(5)
    assert mine == [4, 5, 6, 7, 8]
    # 12 tokens were there: the caller's pages 4, 5, 6 are duplicates it must free; page 7 goes to
    # the tree; page 8 (partial) was never looked at.
    assert cache.insert(longer, mine) == 12
    alloc.free([4, 5, 6, 8])
    assert cache.match_prefix(longer).pages == [1, 2, 3, 7]
    assert cache.insert(longer, [1, 2, 3, 7]) == 16
    assert cache.insert(a[:6], [1]) == 4  # ends inside a node: splits it, still all present
    assert cache.total_pages == 4
    with pytest.raises(ValueError):
        cache.insert([50] * 8, [9])  # two whole pages, one page given
    cache.check_invariants()
    assert sorted(cache.all_pages() + alloc.free_pages()) == list(range(1, 32))


def build_lru_tree(alloc: PageAllocator, cache: RadixCache) -> None:
    """page_size 2. Leaves by last use: B (7,7,8,8) oldest, then C's tail (9,9), then A's tail (3,3)."""
    assert cache.insert([1, 1, 2, 2, 3, 3], alloc.alloc(3)) == 0  # A: pages 1, 2, 3
    assert cache.insert([7, 7, 8, 8], alloc.alloc(2)) == 0  # B: pages 4, 5
    c_pages = alloc.alloc(3)
    assert c_pages == [6, 7, 8]
    assert cache.insert([1, 1, 2, 2, 9, 9], c_pages) == 4  # C shares A's first two pages
    alloc.free([6, 7])
    assert cache.match_prefix([1, 1, 2, 2, 3, 3]).pages == [1, 2, 3]  # A used last


def test_eviction_takes_lru_leaves_tail_first_then_parents():
    alloc, cache = make(page_size=2)
    build_lru_tree(alloc, cache)
    assert cache.evictable_pages == 6
    # B's tail then head, C's leaf, A's leaf, and only then their shared parent (tail first).
    assert eviction_order(alloc, cache) == [5, 4, 8, 3, 2, 1]
    assert cache.total_pages == 0
    assert alloc.num_free == alloc.num_total


def test_evict_frees_at_most_what_is_asked_and_trims_a_leaf():
    alloc, cache = make(page_size=2)
    build_lru_tree(alloc, cache)
    assert cache.evict(3) == 3
    assert [p for p in range(1, 9) if alloc.is_free(p)] == [4, 5, 6, 7, 8]  # B whole, C's leaf (8)
    assert cache.evict(1) == 1  # A's tail (3,3); A is now just the shared prefix
    assert cache.match_prefix([1, 1, 2, 2, 3, 3]).pages == [1, 2]
    assert cache.evict(100) == 2
    assert cache.evict(1) == 0
    cache.check_invariants()


def test_locked_nodes_survive_eviction():
    alloc, cache = make(page_size=2)
    build_lru_tree(alloc, cache)
    c = cache.match_prefix([1, 1, 2, 2, 9, 9]).node
    cache.lock(c)  # also protects the shared (1,1,2,2) parent
    assert (cache.protected_pages, cache.evictable_pages) == (3, 3)
    assert eviction_order(alloc, cache) == [5, 4, 3]
    assert cache.evict(10) == 0
    assert cache.match_prefix([1, 1, 2, 2, 9, 9]).pages == [1, 2, 8]
    with pytest.raises(RuntimeError):
        cache.reset()
    cache.unlock(c)
    with pytest.raises(ValueError):
        cache.unlock(c)
    assert (cache.protected_pages, cache.evictable_pages) == (0, 3)
    assert eviction_order(alloc, cache) == [8, 2, 1]
    with pytest.raises(ValueError):
        cache.lock(c)  # evicted: a stale handle
    cache.lock(None)
    cache.lock(cache.root)  # nothing to lock
    cache.check_invariants()


def test_reset_returns_every_page():
    alloc, cache = make(page_size=2)
    build_lru_tree(alloc, cache)
    cache.reset()
    assert cache.total_pages == 0 and alloc.num_free == alloc.num_total
    assert cache.match_prefix([1, 1, 2, 2]).pages == []
    cache.check_invariants()


def test_disabled_cache_stores_nothing():
    alloc = PageAllocator(8)
    cache = RadixCache(alloc, page_size=2, disable=True)
    pages = alloc.alloc(2)
    assert cache.insert([1, 1, 2, 2], pages) == 0
    hit = cache.match_prefix([1, 1, 2, 2])
    assert (hit.pages, hit.num_tokens, hit.node) == ([], 0, None)
    cache.lock(hit.node)
    cache.unlock(hit.node)
    assert (cache.total_pages, cache.evict(5)) == (0, 0)
    assert alloc.num_free == 5  # the caller still owns its two pages
