"""One rank's KV manager and the handles of its legs of each request (kvtransfer/tp_legs.py).

A rank of a worker holds one manager over its pool; where the backend moves head slices
(kvtransfer/head_slice.py), a leg of one KV head is a handle of that manager over the head's slice,
named `leg_rid(rid, head)` on both sides. The worker's rank 0 and each follower rank
(shared/engine/tp_kv_transfer.py, tp_kv_follower.py) keep one `RankKV`; a request's transfer is
numbered `tid` by rank 0 and is, on each rank, the handles of that rank's legs.

Rules:
- A leg the backend refuses at once (KVTransferError) is a handle that is Failed with the reason,
  so every rank reports through `poll` alike; rank 0 raises instead (`start(..., strict=True)`).
- `changes()` (followers) polls every handle and returns the states that changed since the last
  call; a transfer whose legs are all final is forgotten after it was reported.
- `close()` closes the manager: its transfers fail, as a peer's death would fail them.
"""

from __future__ import annotations

from typing import Any

from pdserve.kvtransfer import make_kv_manager
from pdserve.kvtransfer.base import KVManager, KVPoll, KVReceiver, KVSender, KVTransferConfig, KVTransferError
from pdserve.kvtransfer.head_slice import leg_rid
from pdserve.kvtransfer.tp_legs import Leg, RankEndpoint
from pdserve.shared.engine.kv_pool import PagedKVPool

Handle = KVSender | KVReceiver
Change = tuple[int, int, int, str]  # (tid, leg index, KVPoll, failure reason or "")


class RefusedLeg(KVSender):
    """A leg whose backend refused to start it: Failed from the start."""

    def __init__(self, rid: str, reason: str):
        self.rid = rid
        self.failure_reason = reason

    def send(self, pages: list[int], is_last: bool, first_output: dict[str, Any] | None = None) -> None:
        pass

    def init(self, pages: list[int]) -> None:
        pass

    def poll(self) -> KVPoll:
        return KVPoll.Failed

    @property
    def first_output(self) -> dict[str, Any] | None:
        return None

    def abort(self, reason: str = "") -> None:
        pass


class RankKV:
    def __init__(self, full: KVManager, heads: list[int]):
        self.full = full
        self.heads = heads
        self._legs: dict[int, dict[int, Handle]] = {}  # tid -> leg index -> handle
        self._reported: dict[tuple[int, int], int] = {}

    @classmethod
    def open(
        cls,
        backend: str,
        pool: PagedKVPool,
        worker_id: str,
        heads: list[int],
        host: str = "127.0.0.1",
        config: KVTransferConfig | None = None,
        **options: Any,
    ) -> RankKV:
        """The rank's manager over `pool`, whose KV heads are the global `heads`, in order."""
        return cls(make_kv_manager(backend, pool, worker_id, host, config, **options), heads)

    def endpoint(self) -> RankEndpoint:
        return RankEndpoint(self.full.endpoint, list(self.heads), self.full.moves_head_slices)

    def start(
        self, tid: int, rid: str, sends: bool, legs: list[tuple[int, Leg]], strict: bool = False
    ) -> None:
        """Handles for `legs` (index, leg) of this rank; see the module rules for refusals."""
        handles: dict[int, Handle] = {}
        self._legs[tid] = handles
        make = self.full.make_sender if sends else self.full.make_receiver
        for index, leg in legs:
            try:
                if leg.head is None:
                    handles[index] = make(rid, leg.peer)
                elif leg.head not in self.heads:
                    raise KVTransferError(f"this rank holds no KV head {leg.head}")
                else:
                    k = self.heads.index(leg.head)
                    handles[index] = make(leg_rid(rid, leg.head), leg.peer, (k, k + 1))
            except KVTransferError as exc:
                if strict:
                    self.abort(tid, f"another leg was refused: {exc}")
                    raise
                handles[index] = RefusedLeg(rid, str(exc))

    def legs(self, tid: int) -> dict[int, Handle]:
        return self._legs.get(tid, {})

    def send(self, tid: int, pages: list[int], is_last: bool, first_output: dict[str, Any] | None) -> None:
        for handle in self.legs(tid).values():
            assert isinstance(handle, KVSender)
            handle.send(pages, is_last, first_output)

    def init(self, tid: int, pages: list[int]) -> None:
        for handle in self.legs(tid).values():
            try:
                handle.init(pages)  # type: ignore[union-attr]
            except KVTransferError as exc:
                handle.abort(str(exc))

    def abort(self, tid: int, reason: str) -> None:
        """Aborts and forgets the transfer's legs on this rank."""
        for handle in self._legs.pop(tid, {}).values():
            handle.abort(reason)

    def forget(self, tid: int) -> None:
        self._legs.pop(tid, None)

    def changes(self) -> list[Change]:
        out: list[Change] = []
        for tid, handles in list(self._legs.items()):
            final = True
            for index, handle in handles.items():
                state = handle.poll()
                final = final and state in (KVPoll.Failed, KVPoll.Success)
                if self._reported.get((tid, index)) != state:
                    self._reported[(tid, index)] = state
                    out.append((tid, index, int(state), handle.failure_reason or ""))
            if final:
                del self._legs[tid]
                for index in handles:
                    self._reported.pop((tid, index), None)
        return out

    def busy(self) -> bool:
        return bool(self._legs)

    def close(self) -> None:
        self.full.close()
