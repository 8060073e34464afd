"""Worker choice without workers: policies, the approximate prefix tree, the circuit breaker.

Policies get plain candidate objects; the prefix tree is checked with exact match lengths and
LRU eviction order; the breaker runs on a fake clock through every transition.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest

from pdserve.router.cluster.approx_prefix_tree import ApproxPrefixTree
from pdserve.router.cluster.circuit_breaker import BreakerState, CircuitBreaker
from pdserve.router.cluster.policies import (
    POLICY_NAMES,
    CacheAwarePolicy,
    LeastLoadPolicy,
    PowerOfTwoPolicy,
    RoundRobinPolicy,
    make_policy,
)


@dataclass
class Cand:
    worker_id: str
    load: int = 0


def ids(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


# ---------------------------------------------------------------------- simple policies


def test_round_robin_cycles():
    p = RoundRobinPolicy()
    cands = [Cand("a"), Cand("b"), Cand("c")]
    assert [p.choose(cands, [1]).worker_id for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]


def test_least_load_picks_minimum_and_rotates_ties():
    p = LeastLoadPolicy()
    assert p.choose([Cand("a", 5), Cand("b", 1), Cand("c", 3)], [1]).worker_id == "b"
    idle = [Cand("a"), Cand("b")]
    assert {p.choose(idle, [1]).worker_id for _ in range(4)} == {"a", "b"}


def test_power_of_two_never_picks_the_most_loaded_of_three():
    p = PowerOfTwoPolicy(random.Random(0))
    cands = [Cand("a", 0), Cand("b", 10), Cand("c", 20)]
    picks = Counter(p.choose(cands, [1]).worker_id for _ in range(300))
    assert picks["c"] == 0
    assert picks["a"] > picks["b"] > 0
    assert p.choose([Cand("only", 99)], [1]).worker_id == "only"


def test_every_named_policy_returns_a_candidate():
    cands = [Cand("a", 2), Cand("b", 0)]
    for name in POLICY_NAMES:
        p = make_policy(name, block_size=4, rng=random.Random(1))
        for _ in range(5):
            assert p.choose(cands, ids(0, 9)) in cands
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("fastest")


# ---------------------------------------------------------------------- prefix tree


def test_prefix_tree_matches_whole_blocks_per_worker():
    t = ApproxPrefixTree(block_size=4)
    t.insert("w1", ids(0, 10))  # blocks [0..3], [4..7]; the partial [8, 9] is not recorded
    t.insert("w2", ids(0, 4) + ids(100, 4))
    assert t.match(ids(0, 12)) == {"w1": 8, "w2": 4}
    assert t.match(ids(0, 3)) == {}
    assert t.match([7, 7, 7, 7]) == {}
    assert t.blocks_of("w1") == 2
    t.remove_worker("w1")
    assert t.match(ids(0, 12)) == {"w2": 4}
    assert t.blocks_of("w1") == 0


def test_prefix_tree_evicts_least_recently_used_leaves_first():
    t = ApproxPrefixTree(block_size=2, max_blocks_per_worker=4)
    t.insert("w", [1, 1, 2, 2])  # old branch: 2 blocks
    t.insert("w", [1, 1, 3, 3])  # shares the first block: 3 blocks
    t.insert("w", [1, 1, 3, 3, 4, 4])  # 4 blocks, at the budget
    t.insert("w", [9, 9])  # 5 > 4: evict down to 3 (int(4 * 0.9)), oldest leaves first
    assert t.blocks_of("w") == 3
    assert t.match([1, 1, 2, 2]) == {"w": 2}  # [2, 2] (the oldest leaf) is gone
    assert t.match([1, 1, 3, 3, 4, 4]) == {"w": 4}  # then [4, 4]
    assert t.match([9, 9]) == {"w": 2}


def test_prefix_tree_eviction_of_one_worker_keeps_the_other():
    t = ApproxPrefixTree(block_size=1, max_blocks_per_worker=3)
    t.insert("a", [1, 2, 3])
    t.insert("b", [1, 2, 3])
    t.insert("a", [5])  # 4 > 3: a drops to 2 blocks, its oldest leaves [3] then [2]; b keeps them
    assert t.match([1, 2, 3]) == {"a": 1, "b": 3}
    assert t.match([5]) == {"a": 1}


# ---------------------------------------------------------------------- cache aware


def test_cache_aware_follows_a_long_shared_prefix():
    p = CacheAwarePolicy(block_size=4, min_match_tokens=8, match_ratio=0.5, balance_threshold=4)
    cands = [Cand("a", 1), Cand("b", 0)]
    system = ids(1000, 32)
    p.on_dispatched("a", system + ids(0, 8))
    # 32 of 40 tokens held by a: go there although b is less loaded
    assert p.choose(cands, system + ids(50, 8)).worker_id == "a"


def test_cache_aware_falls_back_to_least_load_on_short_or_overloaded_matches():
    p = CacheAwarePolicy(block_size=4, min_match_tokens=8, match_ratio=0.5, balance_threshold=4)
    p.on_dispatched("a", ids(0, 40))
    # a match of 4 tokens is below min_match_tokens
    assert p.choose([Cand("a", 1), Cand("b", 0)], ids(0, 4) + ids(500, 4)).worker_id == "b"
    # 8 of 40 tokens is below match_ratio
    assert p.choose([Cand("a", 1), Cand("b", 0)], ids(0, 8) + ids(500, 32)).worker_id == "b"
    # a holds it all but is 5 above the least loaded (> balance_threshold 4)
    assert p.choose([Cand("a", 5), Cand("b", 0)], ids(0, 40)).worker_id == "b"
    assert p.choose([Cand("a", 4), Cand("b", 0)], ids(0, 40)).worker_id == "a"


def test_cache_aware_forgets_removed_workers():
    p = CacheAwarePolicy(block_size=4, min_match_tokens=4)
    p.on_dispatched("a", ids(0, 16))
    p.on_removed("a")
    assert p.tree.match(ids(0, 16)) == {}


# ---------------------------------------------------------------------- circuit breaker


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_consecutive_failures_and_half_opens_after_cooldown():
    clock = FakeClock()
    b = CircuitBreaker(failure_threshold=3, cooldown_s=5.0, clock=clock)
    b.record_failure()
    b.record_failure()
    b.record_success()  # resets the count
    b.record_failure()
    b.record_failure()
    assert b.state == BreakerState.CLOSED and b.allow()
    b.record_failure()
    assert b.state == BreakerState.OPEN and not b.allow() and not b.would_allow()
    assert b.times_opened == 1
    b.record_failure()  # a late failure of a request sent before the trip changes nothing
    clock.now += 4.9
    assert not b.allow()
    clock.now += 0.1
    assert b.state == BreakerState.HALF_OPEN
    assert b.would_allow()
    assert b.allow()  # the one probe
    assert not b.allow() and not b.would_allow()  # no second request while probing
    b.record_success()
    assert b.state == BreakerState.CLOSED and b.allow() and b.allow()


def test_breaker_failed_probe_reopens_and_lost_probe_is_released():
    clock = FakeClock()
    b = CircuitBreaker(failure_threshold=1, cooldown_s=2.0, clock=clock)
    b.record_failure()
    clock.now += 2.0
    assert b.allow()
    b.record_failure()  # the probe failed: open again for a full cool-down
    assert b.state == BreakerState.OPEN and b.times_opened == 2
    clock.now += 2.0
    assert b.allow()
    clock.now += 2.0  # the probe never reported: after another cool-down a new one may go
    assert b.allow()


def test_breaker_rejects_a_zero_threshold():
    with pytest.raises(ValueError):
        CircuitBreaker(failure_threshold=0)
