"""The router's approximate picture of which worker holds which prompt prefix in its KV cache.

It records the prompts the router itself sent to each worker, in blocks of `block_size` token ids
(the workers' page size: their radix caches keep whole pages, so a partial last block is never
reused and is not recorded). It is approximate: it does not see evictions inside a worker, nor
requests other routers sent; the precise index, built from the workers' KV events in Redis, is
router/cluster/precise_prefix_index.py.

Rules:
- one trie shared by all workers; a node lists the workers whose recorded prompts passed through
  it, with the tick of their last use; a worker on a node is on every ancestor too (prefix-closed);
- `match(ids)` gives, per worker, the number of leading tokens of `ids` it is believed to hold
  (a multiple of block_size);
- each worker keeps at most `max_blocks_per_worker` blocks; beyond it, its least recently used
  leaf blocks are forgotten first, down to 90 % of the budget (so eviction runs rarely);
- nodes no worker holds are deleted. Pure Python, no locks: one event loop owns it.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence

Block = tuple[int, ...]


class _Node:
    __slots__ = ("children", "key", "parent", "workers")

    def __init__(self, parent: _Node | None, key: Block):
        self.children: dict[Block, _Node] = {}
        self.workers: dict[str, int] = {}  # worker id -> tick of last use
        self.parent = parent
        self.key = key


class ApproxPrefixTree:
    def __init__(self, block_size: int = 16, max_blocks_per_worker: int = 1 << 16):
        if block_size < 1 or max_blocks_per_worker < 1:
            raise ValueError("block_size and max_blocks_per_worker must be >= 1")
        self.block_size = block_size
        self.max_blocks_per_worker = max_blocks_per_worker
        self._root = _Node(None, ())
        self._nodes: dict[str, set[_Node]] = {}
        self._tick = itertools.count(1)

    def _blocks(self, ids: Sequence[int]) -> list[Block]:
        b = self.block_size
        return [tuple(ids[i : i + b]) for i in range(0, len(ids) - b + 1, b)]

    def blocks_of(self, worker_id: str) -> int:
        return len(self._nodes.get(worker_id, ()))

    def match(self, ids: Sequence[int]) -> dict[str, int]:
        """Tokens of `ids`' prefix that each worker holds (workers with no match are left out)."""
        matched: dict[str, int] = {}
        node = self._root
        for depth, block in enumerate(self._blocks(ids), start=1):
            node = node.children.get(block)  # type: ignore[assignment]
            if node is None:
                break
            for worker_id in node.workers:
                matched[worker_id] = depth * self.block_size
        return matched

    def insert(self, worker_id: str, ids: Sequence[int]) -> None:
        """Records that `worker_id` now holds `ids`' whole blocks (and marks them recently used)."""
        tick = next(self._tick)
        owned = self._nodes.setdefault(worker_id, set())
        node = self._root
        for block in self._blocks(ids):
            child = node.children.get(block)
            if child is None:
                child = node.children[block] = _Node(node, block)
            child.workers[worker_id] = tick
            owned.add(child)
            node = child
        if len(owned) > self.max_blocks_per_worker:
            self._evict(worker_id, len(owned) - int(self.max_blocks_per_worker * 0.9))

    def remove_worker(self, worker_id: str) -> None:
        for node in self._nodes.pop(worker_id, set()):
            node.workers.pop(worker_id, None)
            self._prune(node)

    def _is_leaf_for(self, node: _Node, worker_id: str) -> bool:
        return not any(worker_id in c.workers for c in node.children.values())

    def _evict(self, worker_id: str, count: int) -> None:
        owned = self._nodes[worker_id]
        heap = [(n.workers[worker_id], id(n), n) for n in owned if self._is_leaf_for(n, worker_id)]
        heapq.heapify(heap)
        while count > 0 and heap:
            _, _, node = heapq.heappop(heap)
            del node.workers[worker_id]
            owned.discard(node)
            count -= 1
            parent = node.parent
            self._prune(node)
            if parent is not None and parent in owned and self._is_leaf_for(parent, worker_id):
                heapq.heappush(heap, (parent.workers[worker_id], id(parent), parent))

    def _prune(self, node: _Node) -> None:
        """Deletes node and its ancestors while they hold no worker and have no children."""
        while node.parent is not None and not node.workers and not node.children:
            parent = node.parent
            del parent.children[node.key]
            node = parent
