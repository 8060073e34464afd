"""KVCacheManager: request lifecycles with exact page ids, sharing, retraction, and a random storm."""

import random
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdserve.shared.engine.kv_cache_manager import KVCacheManager
from pdserve.shared.engine.radix_node import RadixNode


def test_request_lifecycle_with_exact_pages():
    mgr = KVCacheManager(num_pages=16, page_size=4)
    prompt = list(range(10))
    hit = mgr.match_prefix(prompt)
    assert (hit.pages, hit.num_tokens) == ([], 0)
    mgr.acquire(hit)
    pages = hit.pages + mgr.allocate(3)
    assert pages == [1, 2, 3]
    # First chunk of prefill computed 8 tokens: its two whole pages go into the tree, locked.
    pages, node = mgr.cache_request(prompt[:8], pages, hit.node)
    assert pages == [1, 2, 3]
    assert (mgr.num_cached_pages, mgr.num_evictable_pages, mgr.num_free_pages) == (2, 0, 12)
    mgr.check_invariants(held_outside=[3])
    # Rest of the prompt: no new whole page, same node.
    pages, node2 = mgr.cache_request(prompt, pages, node)
    assert (pages, node2) == ([1, 2, 3], node)
    # Decode two tokens (the third sampled one is never computed): 13 tokens need a fourth page.
    pages += mgr.allocate(1)
    assert pages == [1, 2, 3, 4]
    mgr.check_invariants(held_outside=[3, 4])
    mgr.release(prompt + [100, 101], pages, node)
    # Pages 1-3 hold the 12 computed tokens and stay cached; page 4 (nothing computed) is freed.
    assert (mgr.num_cached_pages, mgr.num_evictable_pages, mgr.num_free_pages) == (3, 3, 12)
    assert mgr.available_pages == 15
    mgr.check_invariants()
    assert mgr.match_prefix(prompt + [100, 101, 7]).pages == [1, 2, 3]


def test_second_request_shares_the_first_ones_prefix():
    mgr = KVCacheManager(num_pages=16, page_size=4)
    first = list(range(12))
    mgr.acquire(hit := mgr.match_prefix(first))
    mgr.release(first, mgr.allocate(3), hit.node)
    second = list(range(8)) + [50, 51, 52, 53, 54]
    hit = mgr.match_prefix(second)
    assert (hit.pages, hit.num_tokens) == ([1, 2], 8)
    mgr.acquire(hit)
    pages = hit.pages + mgr.allocate(2)
    assert pages == [1, 2, 4, 5]
    assert mgr.num_evictable_pages == 1  # page 3, the first request's tail past the split
    pages, node = mgr.cache_request(second, pages, hit.node)
    assert pages == [1, 2, 4, 5]
    mgr.check_invariants(held_outside=[5])
    mgr.release(second, pages, node)
    assert mgr.match_prefix(second).pages == [1, 2, 4]
    assert mgr.match_prefix(first).pages == [1, 2, 3]
    assert mgr.num_free_pages == 15 - 4
    mgr.check_invariants()


def test_concurrent_duplicates_are_replaced_by_the_trees_pages():
    mgr = KVCacheManager(num_pages=16, page_size=4)
    prompt = list(range(9))
    x, y = mgr.match_prefix(prompt), mgr.match_prefix(prompt)
    mgr.acquire(x)
    mgr.acquire(y)
    x_pages, y_pages = mgr.allocate(3), mgr.allocate(3)
    assert (x_pages, y_pages) == ([1, 2, 3], [4, 5, 6])
    x_pages, x_node = mgr.cache_request(prompt[:8], x_pages, x.node)
    y_pages, y_node = mgr.cache_request(prompt, y_pages, y.node)  # y computed the same two pages
    assert (x_pages, y_pages) == ([1, 2, 3], [1, 2, 6])
    assert x_node is y_node
    assert mgr.num_free_pages == 11  # y's duplicates 4 and 5 are free again
    mgr.check_invariants(held_outside=[3, 6])
    assert not mgr.flush()
    mgr.release(prompt[:8], x_pages, x_node, cache=False)
    mgr.release(prompt, y_pages, y_node, cache=True)
    assert (mgr.num_cached_pages, mgr.num_evictable_pages, mgr.num_free_pages) == (2, 2, 13)
    mgr.check_invariants()
    assert mgr.flush()
    assert (mgr.num_cached_pages, mgr.num_free_pages) == (0, 15)


def test_retraction_caches_the_computed_pages_and_a_rematch_hits_them():
    mgr = KVCacheManager(num_pages=16, page_size=4)
    seq = list(range(20))
    mgr.acquire(hit := mgr.match_prefix(seq))
    pages = mgr.allocate(5)
    pages, node = mgr.cache_request(seq[:6], pages, hit.node)
    # Retracted after computing 14 tokens: 3 whole pages are kept, pages 4 and 5 freed.
    mgr.release(seq[:14], pages, node, cache=True)
    assert mgr.num_free_pages == 12
    mgr.check_invariants()
    hit = mgr.match_prefix(seq)
    assert (hit.pages, hit.num_tokens) == ([1, 2, 3], 12)
    assert mgr.num_tree_pages(mgr.match_prefix([]).node) == 0  # the root: matched nothing
    # Abort without caching: the request's own pages go, the tree keeps only what it had.
    mgr.acquire(hit)
    pages = hit.pages + mgr.allocate(2)
    assert pages == [1, 2, 3, 4, 5]
    mgr.release(seq, pages, hit.node, cache=False)
    assert (mgr.num_cached_pages, mgr.num_free_pages) == (3, 12)
    mgr.check_invariants()


def test_allocate_evicts_lru_and_fails_without_evicting():
    mgr = KVCacheManager(num_pages=6, page_size=2)
    a, b = [1, 1, 2, 2], [3, 3, 4, 4, 5, 5]
    for seq in (a, b):
        hit = mgr.match_prefix(seq)
        mgr.acquire(hit)
        mgr.release(seq, mgr.allocate(len(seq) // 2), hit.node)
    assert (mgr.num_free_pages, mgr.num_evictable_pages) == (0, 5)
    mgr.match_prefix(a)  # a is now more recent than b
    assert mgr.allocate(2) == [4, 5]  # b's tail
    assert mgr.allocate(4) is None
    assert (mgr.num_evictable_pages, mgr.available_pages) == (3, 3)  # the failure evicted nothing
    assert mgr.allocate(3) == [1, 2, 3]
    assert mgr.match_prefix(a).pages == []
    mgr.check_invariants(held_outside=[1, 2, 3, 4, 5])


def test_radix_disabled_shares_nothing():
    mgr = KVCacheManager(num_pages=8, page_size=2, enable_radix=False)
    seq = [1, 1, 2, 2, 3]
    hit = mgr.match_prefix(seq)
    assert (hit.pages, hit.num_tokens, hit.node) == ([], 0, None)
    mgr.acquire(hit)
    pages = mgr.allocate(3)
    assert mgr.cache_request(seq, pages, hit.node) == ([1, 2, 3], None)
    mgr.check_invariants(held_outside=pages)
    mgr.release(seq, pages, None)
    assert (mgr.num_free_pages, mgr.num_cached_pages) == (7, 0)
    assert mgr.match_prefix(seq).pages == []
    assert mgr.flush()


def test_bad_release_arguments_raise():
    mgr = KVCacheManager(num_pages=8, page_size=2)
    seq = [1, 1, 2, 2]
    mgr.acquire(hit := mgr.match_prefix(seq))
    pages, node = mgr.cache_request(seq, mgr.allocate(2), hit.node)
    with pytest.raises(ValueError):
        mgr.release(seq[:2], pages, node)  # fewer tokens than the node already covers
    with pytest.raises(ValueError):
        mgr.cache_request(seq + [3, 3], pages, node)  # three whole pages, two listed
    assert mgr.num_tree_pages(node) == 2
    mgr.release(seq, pages, node)
    for cache in (False, True):
        with pytest.raises(ValueError, match="not held"):
            mgr.release(seq, pages, node, cache=cache)  # released twice: caught before any change
    mgr.check_invariants()
    assert mgr.num_tree_pages(None) == 0


# ---- the storm ----


@dataclass(eq=False)  # identity: two requests may have equal fields
class SimReq:
    tokens: list[int]  # everything the request will ever compute so far (prompt + outputs)
    computed: int
    pages: list[int]
    node: RadixNode | None
    tree_len: int  # leading pages that belong to the tree (covered by node)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), page_size=st.sampled_from([1, 4, 16]))
def test_random_request_storm_keeps_every_page_accounted_for(data, page_size):
    ps = page_size
    mgr = KVCacheManager(data.draw(st.integers(4, 24), label="num_pages"), ps)
    # Simulated KV content: page -> the token prefix whose last page it holds. A cached page must
    # always hold exactly the prefix the tree maps to it.
    kv: dict[int, tuple[int, ...]] = {}
    reqs: list[SimReq] = []
    history: list[list[int]] = []

    def check_pages(tokens: list[int], pages: list[int]) -> None:
        for j, page in enumerate(pages):
            assert kv.get(page) == tuple(tokens[: (j + 1) * ps]), f"page {page} holds the wrong KV"

    def release(r: SimReq, cache: bool) -> None:
        reqs.remove(r)
        mgr.release(r.tokens[: r.computed], r.pages, r.node, cache=cache)

    def allocate(n: int) -> list[int] | None:
        available, evictable = mgr.available_pages, mgr.num_evictable_pages
        new = mgr.allocate(n)
        assert (new is None) == (n > available)
        assert new is not None or mgr.num_evictable_pages == evictable  # a failure evicts nothing
        for p in new or ():
            kv.pop(p, None)  # fresh pages hold nothing computed yet
        return new

    def held() -> list[int]:
        assert all(mgr.num_tree_pages(q.node) == q.tree_len for q in reqs)
        return [p for q in reqs for p in q.pages[q.tree_len :]]

    def fresh_tokens() -> list[int]:
        tokens: list[int] = []
        if history and data.draw(st.booleans()):
            base = data.draw(st.sampled_from(history))
            tokens = base[: data.draw(st.integers(0, len(base)))]
        # A few seeds and a 3-letter alphabet: different requests often share long prefixes.
        rng = random.Random(data.draw(st.integers(0, 3)))
        tokens += rng.choices([0, 1, 2], k=data.draw(st.integers(0, 3 * ps + 3)))
        return tokens

    ops = ["add", "add", "progress", "progress", "grow", "finish", "abort", "flush"]
    for _ in range(data.draw(st.integers(1, 40), label="steps")):
        op = data.draw(st.sampled_from(ops if reqs else ["add"]))
        r = data.draw(st.sampled_from(reqs)) if reqs else None
        if op == "add":
            tokens = fresh_tokens()
            history.append(tokens)
            hit = mgr.match_prefix(tokens)
            assert hit.num_tokens == len(hit.pages) * ps <= len(tokens)
            check_pages(tokens, hit.pages)
            mgr.acquire(hit)
            new = allocate(ceil_div(len(tokens), ps) - len(hit.pages))
            if new is None:
                mgr.release(tokens[: hit.num_tokens], hit.pages, hit.node, cache=data.draw(st.booleans()))
            else:
                reqs.append(SimReq(tokens, hit.num_tokens, hit.pages + new, hit.node, len(hit.pages)))
        elif op == "progress":
            step = data.draw(st.integers(0, len(r.tokens) - r.computed))
            for j in range(r.computed // ps, (r.computed + step) // ps):
                kv[r.pages[j]] = tuple(r.tokens[: (j + 1) * ps])  # "forward" writes whole pages
            r.computed += step
            if data.draw(st.booleans()):
                r.pages, r.node = mgr.cache_request(r.tokens[: r.computed], r.pages, r.node)
                r.tree_len = r.computed // ps
                check_pages(r.tokens, r.pages[: r.tree_len])
        elif op == "grow":  # decode appends tokens; out of pages means retraction
            r.tokens += [data.draw(st.integers(0, 2)) for _ in range(data.draw(st.integers(1, ps + 1)))]
            new = allocate(max(0, ceil_div(len(r.tokens), ps) - len(r.pages)))
            if new is None:
                release(r, cache=True)
            else:
                r.pages += new
        elif op == "finish":
            release(r, cache=True)
        elif op == "abort":
            release(r, cache=data.draw(st.booleans()))
        else:
            cached_before = mgr.num_cached_pages
            assert mgr.flush() == all(q.tree_len == 0 for q in reqs)
            assert mgr.num_cached_pages == (0 if all(q.tree_len == 0 for q in reqs) else cached_before)
        mgr.check_invariants(held_outside=held())

    while reqs:
        release(reqs[0], cache=data.draw(st.booleans()))
        mgr.check_invariants(held_outside=held())
    assert mgr.num_evictable_pages == mgr.num_cached_pages  # no lock left anywhere
    assert mgr.flush()
    assert mgr.num_free_pages == mgr.num_total_pages
    mgr.check_invariants()
