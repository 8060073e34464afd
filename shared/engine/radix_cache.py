"""A page-granular radix tree mapping token prefixes to the KV pages that hold them. No torch.

The tree stores whole pages only: every node's key is a run of token ids whose length is a multiple
of page_size, and its value is the page ids holding those tokens, one page per page_size tokens.
A node's KV depends on everything before it, so a node stands for the whole path from the root.
Children are keyed by the token tuple of their first page, so two children never share a first page.

Each node carries a lock count (how many running requests hold it or a descendant: a lock on a node
counts on all its ancestors too, root excluded) and a last-access stamp from a counter bumped once
per match or insert, so LRU eviction order is deterministic. Locked nodes are never evicted.

Events: with a `listener` (RadixListener, radix_node.py, which states what it hears), every node
also keeps the chain hash of each of its pages. Without a listener no hash is computed.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from pdserve.shared.cluster.page_hash import ROOT_HASH, page_hashes
from pdserve.shared.engine.page_allocator import PageAllocator
from pdserve.shared.engine.radix_node import PrefixHit, RadixListener, RadixNode


class RadixCache:
    """Prefix cache over an allocator's pages.

    Ownership: pages given to `insert` that end up in the tree belong to the tree, which returns
    them to the allocator on `evict` or `reset`. Everything else stays with the caller (see insert).
    With disable=True the cache stores nothing: matches are empty, inserts keep nothing (the caller
    keeps all its pages), evict frees nothing, and the listener hears nothing.
    """

    def __init__(
        self,
        allocator: PageAllocator,
        page_size: int,
        disable: bool = False,
        listener: RadixListener | None = None,
    ) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.allocator = allocator
        self.page_size = page_size
        self.disable = disable
        self.listener = listener
        self._next_id = 0
        self._clock = 0
        # The root lives as long as the cache (reset keeps it), so "matched nothing" handles stay valid.
        self._root = self._new_node((), [], None)
        self._init_tree()

    def _init_tree(self) -> None:
        self._root.children = {}
        self._evictable_pages = 0
        self._protected_pages = 0
        # Unlocked, childless, non-root nodes: the eviction candidates, kept up to date so that
        # evict does not walk the whole tree.
        self._evictable_leaves: set[RadixNode] = set()

    def _new_node(self, key: tuple[int, ...], pages: list[int], parent: RadixNode | None) -> RadixNode:
        node = RadixNode(self._next_id, key, pages, parent)
        self._next_id += 1
        return node

    @property
    def root(self) -> RadixNode:
        return self._root

    @property
    def evictable_pages(self) -> int:
        """Pages in unlocked nodes: all of them can be evicted (an unlocked node has no locked descendant)."""
        return self._evictable_pages

    @property
    def protected_pages(self) -> int:
        """Pages in locked nodes."""
        return self._protected_pages

    @property
    def total_pages(self) -> int:
        return self._evictable_pages + self._protected_pages

    # ---- lookup and insertion ----

    def match_prefix(self, tokens: Sequence[int]) -> PrefixHit:
        """Longest cached prefix of the whole pages of `tokens`; does not lock.

        A 37-token prompt with page_size 16 matches at most 32 tokens. When the match ends inside a
        node, the node is split there so the returned handle covers exactly the match. Stamps every
        node on the matched path as just used.
        """
        if self.disable:
            return PrefixHit([], 0, None)
        limit = len(tokens) // self.page_size * self.page_size
        self._clock += 1
        node, matched, pages = self._descend(tuple(tokens[:limit]))
        return PrefixHit(pages, matched, node)

    def insert(self, tokens: Sequence[int], pages: Sequence[int]) -> int:
        """Puts the whole pages of `tokens` into the tree; returns how many leading tokens were already there.

        Only the first n = len(tokens) // page_size entries of `pages` are used (len(pages) >= n is
        required); the rest are not looked at. Ownership rule: pages[j] for j < returned // page_size
        covers a prefix the tree already holds, so the tree keeps its own page there; where pages[j]
        differs from the tree's page, it is a duplicate that still belongs to the caller, who must
        free it. The pages past that prefix (up to n) now belong to the tree. Disabled: stores
        nothing, returns 0, the caller keeps every page.
        """
        if self.disable:
            return 0
        ps = self.page_size
        n = len(tokens) // ps
        if len(pages) < n:
            raise ValueError(f"{len(tokens)} tokens need {n} pages, got {len(pages)}")
        key = tuple(tokens[: n * ps])
        self._clock += 1
        node, matched, _ = self._descend(key)
        if matched < len(key):
            leaf = self._new_node(key[matched:], list(pages[matched // ps : n]), node)
            leaf.last_access = self._clock
            if self.listener is not None:
                leaf.hashes = page_hashes(leaf.key, ps, node.hashes[-1] if node.hashes else ROOT_HASH)
                self.listener.on_stored(list(leaf.hashes))
            node.children[leaf.key[:ps]] = leaf
            self._evictable_pages += len(leaf.pages)
            self._evictable_leaves.discard(node)
            self._evictable_leaves.add(leaf)
        return matched

    def _descend(self, key: tuple[int, ...]) -> tuple[RadixNode, int, list[int]]:
        """Follows the longest whole-page match of `key` (a whole number of pages) from the root.

        Splits the last node when the match ends inside it and stamps the path with the current
        clock. Returns (deepest node, matched tokens, the path's pages).
        """
        ps = self.page_size
        node = self._root
        node.last_access = self._clock
        matched = 0
        pages: list[int] = []
        while matched < len(key):
            child = node.children.get(key[matched : matched + ps])
            if child is None:
                break
            # The first page matched through the dict key; compare the rest page by page.
            run = ps
            limit = min(len(child.key), len(key) - matched)
            while run < limit and child.key[run : run + ps] == key[matched + run : matched + run + ps]:
                run += ps
            if run < len(child.key):
                child = self._split(child, run)
            child.last_access = self._clock
            pages.extend(child.pages)
            node = child
            matched += run
        return node, matched, pages

    def _split(self, node: RadixNode, num_tokens: int) -> RadixNode:
        """Cuts `node` after num_tokens (a whole number of pages); returns the new upper part.

        The existing object keeps the lower part, so handles held on it keep standing for the same
        prefix. The upper part inherits the lock count: every lock that reaches node passes it.
        """
        ps = self.page_size
        parent = node.parent
        assert parent is not None and 0 < num_tokens < len(node.key) and num_tokens % ps == 0
        upper = self._new_node(node.key[:num_tokens], node.pages[: num_tokens // ps], parent)
        upper.hashes = node.hashes[: num_tokens // ps]
        upper.lock_ref = node.lock_ref
        upper.last_access = node.last_access
        parent.children[upper.key[:ps]] = upper  # same first page: replaces node in parent
        node.key = node.key[num_tokens:]
        node.pages = node.pages[num_tokens // ps :]
        node.hashes = node.hashes[num_tokens // ps :]
        node.parent = upper
        upper.children[node.key[:ps]] = node
        return upper

    def prefix_len(self, node: RadixNode | None) -> int:
        """Tokens from the root to the end of `node` (0 for None or the root). Raises ValueError for an evicted node."""
        if node is not None and node is not self._root:
            self._check_attached(node)
        total = 0
        while node is not None and node is not self._root:
            total += len(node.key)
            node = node.parent
        return total

    # ---- locking ----

    def lock(self, node: RadixNode | None) -> None:
        """Adds one lock to `node` and each ancestor (root excluded). None or the root: nothing to lock."""
        if node is None or node is self._root:
            return
        self._check_attached(node)
        while node is not self._root:
            if node.lock_ref == 0:
                self._evictable_pages -= len(node.pages)
                self._protected_pages += len(node.pages)
                self._evictable_leaves.discard(node)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: RadixNode | None) -> None:
        """Removes one lock from `node` and each ancestor. Unlocking an unlocked node raises ValueError."""
        if node is None or node is self._root:
            return
        self._check_attached(node)
        # An ancestor's count is at least its descendant's, so checking the first node suffices.
        if node.lock_ref <= 0:
            raise ValueError(f"unlock of unlocked node {node}")
        while node is not self._root:
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._evictable_pages += len(node.pages)
                self._protected_pages -= len(node.pages)
                if not node.children:
                    self._evictable_leaves.add(node)
            node = node.parent

    def is_locked(self, node: RadixNode | None) -> bool:
        """Whether `node` is in the tree with at least one lock. None and the root count as locked (nothing to hold)."""
        if node is None or node is self._root:
            return True
        return node.parent is not None and node.lock_ref > 0

    def _check_attached(self, node: RadixNode) -> None:
        # Only leaves are ever removed, so an attached node has attached ancestors.
        if node.parent is None:
            raise ValueError(f"{node} is not in the tree (evicted, or from another cache)")

    # ---- eviction ----

    def evict(self, num_pages: int) -> int:
        """Frees up to num_pages tree pages to the allocator; returns how many were freed.

        Takes unlocked leaves least recently used first (ties: older node first); a parent becomes a
        candidate once its last child is gone. A leaf larger than what is still needed is trimmed
        from its tail, which keeps its head (the part more prompts share) and frees exactly what was
        asked for whenever evictable_pages allows.
        """
        if self.disable or num_pages <= 0:
            return 0
        heap = [(n.last_access, n.node_id, n) for n in self._evictable_leaves]
        heapq.heapify(heap)
        freed: list[int] = []
        removed: list[int] = []  # the freed pages' hashes, same order
        while heap and len(freed) < num_pages:
            _, _, leaf = heapq.heappop(heap)
            take = min(len(leaf.pages), num_pages - len(freed))
            keep = len(leaf.pages) - take
            freed.extend(reversed(leaf.pages[keep:]))
            removed.extend(reversed(leaf.hashes[keep:]))
            self._evictable_pages -= take
            if keep:
                leaf.pages = leaf.pages[:keep]
                leaf.hashes = leaf.hashes[:keep]
                leaf.key = leaf.key[: keep * self.page_size]
                continue
            parent = leaf.parent
            assert parent is not None
            del parent.children[leaf.key[: self.page_size]]
            self._evictable_leaves.discard(leaf)
            leaf.parent = None
            if parent is not self._root and not parent.children and parent.lock_ref == 0:
                self._evictable_leaves.add(parent)
                heapq.heappush(heap, (parent.last_access, parent.node_id, parent))
        self.allocator.free(freed)
        if self.listener is not None and removed:
            self.listener.on_removed(removed)
        return len(freed)

    def reset(self) -> None:
        """Returns every tree page to the allocator and empties the tree. Raises if anything is locked."""
        if self._protected_pages:
            raise RuntimeError(f"reset with {self._protected_pages} pages locked by running requests")
        pages: list[int] = []
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            pages.extend(node.pages)
            stack.extend(node.children.values())
            node.parent = None  # a stale handle must not reach the root again through a lock
        self.allocator.free(pages)
        self._init_tree()
        if self.listener is not None and not self.disable:
            self.listener.on_cleared()

    # ---- inspection (tests, debugging) ----

    def all_pages(self) -> list[int]:
        """Every page in the tree, depth first."""
        out: list[int] = []
        stack = [self._root]
        while stack:
            node = stack.pop()
            out.extend(node.pages)
            stack.extend(node.children.values())
        return out

    def check_invariants(self) -> None:
        """Raises AssertionError when the tree's structure or counters are inconsistent."""
        ps = self.page_size
        evictable = protected = 0
        leaves: set[RadixNode] = set()
        stack = [self._root]
        while stack:
            node = stack.pop()
            if node.lock_ref < 0:
                raise AssertionError(f"negative lock count: {node}")
            if node is not self._root:
                if not node.pages or len(node.key) != len(node.pages) * ps:
                    raise AssertionError(f"node is not a non-empty run of whole pages: {node}")
                if self.listener is not None and len(node.hashes) != len(node.pages):
                    raise AssertionError(f"{len(node.hashes)} hashes for {len(node.pages)} pages: {node}")
                if node.lock_ref:
                    protected += len(node.pages)
                else:
                    evictable += len(node.pages)
                    if not node.children:
                        leaves.add(node)
            child_locks = 0
            for first, child in node.children.items():
                if child.parent is not node or child.key[:ps] != first:
                    raise AssertionError(f"child {child} misfiled under {node}")
                child_locks += child.lock_ref
            if node is not self._root and node.lock_ref < child_locks:
                raise AssertionError(f"{node} has fewer locks than its children together")
            stack.extend(node.children.values())
        if (evictable, protected) != (self._evictable_pages, self._protected_pages):
            raise AssertionError(
                f"page counters ({self._evictable_pages}, {self._protected_pages}) != tree ({evictable}, {protected})"
            )
        if leaves != self._evictable_leaves:
            raise AssertionError("evictable leaf set out of date")

    def pretty(self) -> str:
        """The tree as indented text: first tokens of each key, pages, lock count, access stamp."""
        lines: list[str] = []

        def walk(node: RadixNode, depth: int) -> None:
            for child in sorted(node.children.values(), key=lambda c: c.key):
                head = list(child.key[:8])
                more = "..." if len(child.key) > 8 else ""
                lines.append(
                    f"{'  ' * depth}{head}{more} pages={child.pages} lock={child.lock_ref} t={child.last_access}"
                )
                walk(child, depth + 1)

        walk(self._root, 0)
        return "\n".join(lines)
