"""The radix cache's handles and what it tells: a tree node (RadixNode), the result of a prefix
match (PrefixHit) and the listener of page changes (RadixListener). No torch. The tree that owns
and changes them is radix_cache.py.

Events: with a `listener` (RadixListener), every node also keeps the chain hash of each of its pages
(shared/cluster/page_hash.py; computed at insert from the parent's last hash, split and trimmed with the
pages), and the listener hears, on the thread that changes the tree:
- on_stored(hashes): the pages an insert added, in prefix order (nothing for pages already there);
- on_removed(hashes): the pages one evict call freed, in the order it freed them;
- on_cleared(): reset emptied the tree.
A split changes no page, so it reports nothing. Without a listener no hash is computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class RadixListener(Protocol):
    """Told of the pages a RadixCache gains and loses (see the module docstring). Called inside the
    engine loop: must return at once (queue the event, never touch the network)."""

    def on_stored(self, hashes: list[int]) -> None: ...

    def on_removed(self, hashes: list[int]) -> None: ...

    def on_cleared(self) -> None: ...


class RadixNode:
    """One run of whole pages in the tree. Opaque outside the radix cache (radix_cache.py).

    A handle stays valid as long as it is locked: splits keep the handle on the deep end of the
    run, so the prefix it stands for never changes. An unlocked handle may be trimmed or dropped by
    the next `evict`; lock it (or use it at once) before anything can evict.
    """

    __slots__ = ("children", "hashes", "key", "last_access", "lock_ref", "node_id", "pages", "parent")

    def __init__(
        self, node_id: int, key: tuple[int, ...], pages: list[int], parent: RadixNode | None
    ) -> None:
        self.node_id = node_id  # creation order: breaks ties between equal stamps deterministically
        self.key = key
        self.pages = pages
        self.hashes: list[int] = []  # chain hash per page; kept only when the cache has a listener
        self.parent = parent  # None for the root and for nodes that were evicted
        self.children: dict[tuple[int, ...], RadixNode] = {}
        self.lock_ref = 0
        self.last_access = 0

    def __repr__(self) -> str:
        return (
            f"RadixNode(id={self.node_id}, tokens={len(self.key)}, pages={self.pages}, lock={self.lock_ref})"
        )


@dataclass
class PrefixHit:
    """The longest cached whole-page prefix of some tokens.

    pages: the tree's pages holding that prefix, in order; num_tokens = len(pages) * page_size.
    node: the deepest node of the match (the root when nothing matched, None when the cache is
    disabled): the handle to lock while a request uses `pages`.
    """

    pages: list[int]
    num_tokens: int
    node: RadixNode | None
