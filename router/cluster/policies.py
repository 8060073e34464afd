"""Worker choice: `--policy round_robin|random|power_of_two|least_load|cache_aware`.

A policy picks one of the candidates the pool offers (live, circuit closed or probing, not yet
tried for this request); it never sees the others. Candidates expose `worker_id` and `load` (the
pool's estimate of the worker's queued + running requests). Rules:
- `choose` never returns something outside `candidates` and never fails on a non-empty list;
- `on_dispatched(worker_id, ids)` is called once the request was sent, `on_removed(worker_id)` when
  a worker leaves; only cache_aware keeps state from them;
- random choices come from an injectable `random.Random`, so tests are deterministic.

cache_aware: the worker whose (approximate, router-side) prefix tree holds the longest prefix of
the prompt, when that prefix is at least `min_match_tokens` long and covers at least
`match_ratio` of the prompt, and that worker is not overloaded (its load is at most
`balance_threshold` above the least loaded candidate). Otherwise: least load. Short prompts thus
spread by load, and long shared prefixes go where their KV pages already are. With a `matcher`
(the prefill pool's Redis prefix index: cached tokens per worker, exact), the match comes from it
instead of the router-side tree.

Pairs (router/cluster/pairing.py) choose the prefill worker with `--prefill-policy` (make_policy) and the
decode worker with `--decode-policy` (make_decode_policy), whose least_load means memory first:
the candidate with the most free KV pages (in eighths of its pool, so small differences do not
matter), then the fewest queued + running requests.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from pdserve.router.cluster.approx_prefix_tree import ApproxPrefixTree

logger = logging.getLogger(__name__)

POLICY_NAMES = ("round_robin", "random", "power_of_two", "least_load", "cache_aware")
DECODE_POLICY_NAMES = ("least_load", "round_robin", "random", "power_of_two")


class Candidate(Protocol):
    @property
    def worker_id(self) -> str: ...

    @property
    def load(self) -> int: ...


W = TypeVar("W", bound=Candidate)


class Policy:
    name = ""

    def choose(self, candidates: Sequence[W], input_ids: Sequence[int]) -> W:
        raise NotImplementedError

    def on_dispatched(self, worker_id: str, input_ids: Sequence[int]) -> None:
        pass

    def on_removed(self, worker_id: str) -> None:
        pass


class RoundRobinPolicy(Policy):
    name = "round_robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, candidates: Sequence[W], input_ids: Sequence[int]) -> W:
        return candidates[next(self._counter) % len(candidates)]


class RandomPolicy(Policy):
    name = "random"

    def __init__(self, rng: random.Random | None = None):
        self._rng = rng or random.Random()

    def choose(self, candidates: Sequence[W], input_ids: Sequence[int]) -> W:
        return self._rng.choice(candidates)


class LeastLoadPolicy(Policy):
    """The least loaded candidate; ties rotate, so an idle cluster is filled evenly."""

    name = "least_load"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, candidates: Sequence[W], input_ids: Sequence[int]) -> W:
        start = next(self._counter) % len(candidates)
        rotated = [*candidates[start:], *candidates[:start]]
        return min(rotated, key=lambda c: c.load)


class PowerOfTwoPolicy(Policy):
    """Two random candidates, the less loaded of them (the first drawn on a tie)."""

    name = "power_of_two"

    def __init__(self, rng: random.Random | None = None):
        self._rng = rng or random.Random()

    def choose(self, candidates: Sequence[W], input_ids: Sequence[int]) -> W:
        if len(candidates) == 1:
            return candidates[0]
        a, b = self._rng.sample(list(candidates), 2)
        return b if b.load < a.load else a


class CacheAwarePolicy(Policy):
    name = "cache_aware"

    def __init__(
        self,
        block_size: int = 16,
        min_match_tokens: int = 16,
        match_ratio: float = 0.5,
        balance_threshold: int = 32,
        max_blocks_per_worker: int = 1 << 16,
        matcher: Callable[[Sequence[int]], dict[str, int]] | None = None,
    ):
        self.tree = ApproxPrefixTree(block_size, max_blocks_per_worker)
        self.matcher = matcher
        self.min_match_tokens = min_match_tokens
        self.match_ratio = match_ratio
        self.balance_threshold = balance_threshold
        self._least_load = LeastLoadPolicy()

    def choose(self, candidates: Sequence[W], input_ids: Sequence[int]) -> W:
        if len(candidates) == 1:  # no choice to make: skip the prefix match on the request's path
            return candidates[0]
        least = self._least_load.choose(candidates, input_ids)
        matched = self._match(input_ids)
        best: W | None = None
        best_len = 0
        for c in candidates:
            n = matched.get(c.worker_id, 0)
            if n > best_len or (n == best_len and best is not None and n > 0 and c.load < best.load):
                best, best_len = c, n
        if (
            best is None
            or best_len < self.min_match_tokens
            or best_len < self.match_ratio * len(input_ids)
            or best.load > least.load + self.balance_threshold
        ):
            return least
        return best

    def _match(self, input_ids: Sequence[int]) -> dict[str, int]:
        if self.matcher is not None:
            try:
                return self.matcher(input_ids)
            except Exception as exc:  # noqa: BLE001 (an index that fails falls back to the tree)
                logger.debug("prefix index match failed: %s", exc)
        return self.tree.match(input_ids)

    def on_dispatched(self, worker_id: str, input_ids: Sequence[int]) -> None:
        self.tree.insert(worker_id, input_ids)

    def on_removed(self, worker_id: str) -> None:
        self.tree.remove_worker(worker_id)


def make_policy(name: str, block_size: int = 16, rng: random.Random | None = None) -> Policy:
    """The policy called `name` (one of POLICY_NAMES); ValueError otherwise."""
    if name == "round_robin":
        return RoundRobinPolicy()
    if name == "random":
        return RandomPolicy(rng)
    if name == "power_of_two":
        return PowerOfTwoPolicy(rng)
    if name == "least_load":
        return LeastLoadPolicy()
    if name == "cache_aware":
        return CacheAwarePolicy(block_size=block_size, min_match_tokens=block_size)
    raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")


class MemoryFirstPolicy(Policy):
    """Decode choice: most free KV pages (in eighths of the pool), then least load; ties rotate."""

    name = "least_load"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, candidates: Sequence[W], input_ids: Sequence[int]) -> W:
        start = next(self._counter) % len(candidates)
        rotated = [*candidates[start:], *candidates[:start]]
        return min(rotated, key=lambda c: (-int(getattr(c, "free_page_fraction", 1.0) * 8), c.load))


def make_decode_policy(name: str, rng: random.Random | None = None) -> Policy:
    """The decode-side policy called `name` (one of DECODE_POLICY_NAMES); ValueError otherwise."""
    if name == "least_load":
        return MemoryFirstPolicy()
    if name not in DECODE_POLICY_NAMES:
        raise ValueError(f"unknown decode policy {name!r}; choose one of {', '.join(DECODE_POLICY_NAMES)}")
    return make_policy(name, rng=rng)
