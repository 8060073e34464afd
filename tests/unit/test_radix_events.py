"""The radix cache's listener: exact stored/removed/cleared events with their page chain hashes.

page_hashes (shared/cluster/page_hash.py, tested on its own) names the expected pages: the hash of page j
of a prompt is page_hashes(prompt, page_size)[j].
"""

from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.shared.cluster.page_hash import page_hashes
from pdserve.shared.engine.kv_cache_manager import KVCacheManager
from pdserve.shared.engine.page_allocator import PageAllocator
from pdserve.shared.engine.radix_cache import RadixCache
from pdserve.shared.engine.radix_node import RadixNode


class Recorder:
    """A RadixListener that writes down what it heard."""

    def __init__(self) -> None:
        self.events: list[tuple[str, list[int]]] = []

    def on_stored(self, hashes: list[int]) -> None:
        self.events.append(("stored", list(hashes)))

    def on_removed(self, hashes: list[int]) -> None:
        self.events.append(("removed", list(hashes)))

    def on_cleared(self) -> None:
        self.events.append(("cleared", []))

    def take(self) -> list[tuple[str, list[int]]]:
        out, self.events = self.events, []
        return out


def make(page_size: int = 2, num_pages: int = 32, disable: bool = False):
    alloc = PageAllocator(num_pages)
    recorder = Recorder()
    return alloc, RadixCache(alloc, page_size, disable=disable, listener=recorder), recorder


def test_insert_reports_only_new_pages_and_a_split_reports_nothing():
    alloc, cache, rec = make()
    a = [1, 2, 3, 4, 5]  # two whole pages and a partial one
    ha = page_hashes(a, 2)
    assert cache.insert(a, alloc.alloc(3)) == 0
    assert rec.take() == [("stored", ha)]
    assert cache.insert(a, alloc.alloc(2)) == 4  # all there already: nothing new
    assert rec.take() == []

    b = [1, 2, 7, 8]  # shares the first page: the node [1 2 | 3 4] splits
    hb = page_hashes(b, 2)
    assert hb[0] == ha[0]
    assert cache.insert(b, alloc.alloc(2)) == 2
    assert rec.take() == [("stored", [hb[1]])]
    cache.match_prefix([1, 2, 3, 4, 9, 9])  # a match may split too: still no page changes
    assert rec.take() == []
    cache.check_invariants()


def test_evict_reports_the_freed_pages_in_order():
    alloc, cache, rec = make()
    a, b = [1, 2, 3, 4], [1, 2, 7, 8]
    ha, hb = page_hashes(a, 2), page_hashes(b, 2)
    cache.insert(a, alloc.alloc(2))
    cache.insert(b, alloc.alloc(2))
    rec.take()
    # leaves: [3 4] (used at insert 1) and [7 8] (insert 2): the older goes first
    assert cache.evict(1) == 1
    assert rec.take() == [("removed", [ha[1]])]
    # then [7 8], and its parent [1 2] once it has no child left: one call, one event
    assert cache.evict(2) == 2
    assert rec.take() == [("removed", [hb[1], ha[0]])]
    assert cache.total_pages == 0
    assert cache.evict(5) == 0
    assert rec.take() == []  # nothing freed, nothing said


def test_trimmed_leaf_keeps_the_hashes_of_its_head():
    alloc, cache, rec = make()
    p = list(range(10, 18))  # four pages in one node
    h = page_hashes(p, 2)
    cache.insert(p, alloc.alloc(4))
    assert rec.take() == [("stored", h)]
    assert cache.evict(3) == 3  # trims the tail: freed last page first
    assert rec.take() == [("removed", [h[3], h[2], h[1]])]
    cache.insert(p, alloc.alloc(4))  # the head's hash chains the new tail exactly as before
    assert rec.take() == [("stored", h[1:])]
    cache.check_invariants()


def test_locked_pages_are_not_reported_and_reset_clears():
    alloc, cache, rec = make()
    a, b = [1, 2, 3, 4], [5, 6]
    ha = page_hashes(a, 2)
    cache.insert(a, alloc.alloc(2))
    cache.insert(b, alloc.alloc(1))
    cache.lock(cache.match_prefix(b).node)
    rec.take()
    assert cache.evict(10) == 2
    assert rec.take() == [("removed", [ha[1], ha[0]])]
    cache.unlock(cache.match_prefix(b).node)
    cache.reset()
    assert rec.take() == [("cleared", [])]


def test_disabled_cache_says_nothing():
    alloc, cache, rec = make(disable=True)
    cache.insert([1, 2, 3, 4], alloc.alloc(2))
    cache.evict(2)
    cache.reset()
    assert rec.take() == []


def test_kv_cache_manager_passes_its_listener():
    rec = Recorder()
    kv = KVCacheManager(num_pages=5, page_size=2, listener=rec)  # pages 1..4
    prompt = [1, 2, 3, 4, 5]
    h = page_hashes(prompt, 2)
    hit = kv.match_prefix(prompt)
    kv.acquire(hit)
    pages = kv.allocate(3)
    assert pages is not None
    pages, node = kv.cache_request(prompt[:2], pages, hit.node)  # after a first chunk
    assert rec.take() == [("stored", h[:1])]
    kv.release(prompt, pages, node)
    assert rec.take() == [("stored", h[1:])]
    # a new prompt needs all four pages: the cached two are evicted for it
    assert kv.allocate(4) is not None
    assert rec.take() == [("removed", [h[1], h[0]])]
    assert kv.flush()
    assert rec.take() == [("cleared", [])]


def tree_hashes(cache: RadixCache) -> set[int]:
    """Every page the tree holds, named by hashing its whole path from the root; checks each node's
    stored hashes on the way."""
    out: set[int] = set()

    def walk(node: RadixNode, path: tuple[int, ...]) -> None:
        for child in node.children.values():
            full = path + child.key
            expected = page_hashes(full, cache.page_size)[len(path) // cache.page_size :]
            assert child.hashes == expected
            out.update(expected)
            walk(child, full)

    walk(cache.root, ())
    return out


ops = st.lists(
    st.one_of(
        st.tuples(st.just("insert"), st.lists(st.integers(0, 2), min_size=0, max_size=9)),
        st.tuples(st.just("match"), st.lists(st.integers(0, 2), min_size=0, max_size=9)),
        st.tuples(st.just("evict"), st.integers(1, 4)),
        st.tuples(st.just("reset"), st.none()),
    ),
    max_size=30,
)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_events_replayed_equal_the_tree(operations):
    """Folding the events into a set always gives exactly the tree's pages (what a router holds)."""
    alloc, cache, rec = make(page_size=2, num_pages=64)
    mirror: set[int] = set()
    for op, arg in operations:
        if op == "insert":
            pages = alloc.alloc(len(arg) // 2)
            if pages is None:
                continue
            present = cache.insert(arg, pages) // 2
            held = cache.match_prefix(arg).pages
            alloc.free([mine for mine, tree in zip(pages[:present], held) if mine != tree])
        elif op == "match":
            cache.match_prefix(arg)
        elif op == "evict":
            cache.evict(arg)
        else:
            cache.reset()
        for kind, hashes in rec.take():
            if kind == "stored":
                assert not mirror & set(hashes)  # a page is never stored twice
                mirror.update(hashes)
            elif kind == "removed":
                assert set(hashes) <= mirror
                mirror.difference_update(hashes)
            else:
                mirror.clear()
        assert mirror == tree_hashes(cache)
        cache.check_invariants()
