"""The scheduler's queues of live requests and the calls that take a request out of them (finish,
abort). Which request moves from one queue to the next is the scheduler's policy (scheduler.py); a
role's own queues (scheduler_role.py) count in the views and are asked first. No torch.

    (compiling) ──▶ waiting ──▶ prefilling ──▶ running ──▶ finished
                                                              (pages back through KVCacheManager.release)

`compiling` holds requests whose grammar compiles off the request path (grammar_compiles.py): live
and counted as waiting, but no compute for a step until they are released into a queue.
"""

from __future__ import annotations

from collections import deque

from pdserve.shared.engine.kv_cache_manager import KVCacheManager
from pdserve.shared.engine.request import Req, ReqStatus
from pdserve.shared.engine.scheduler_role import MixedRole


class RequestQueues:
    """Live requests by state; `kv` takes back the pages of those that end; `role` holds queues of
    its own."""

    def __init__(self, kv: KVCacheManager, role: MixedRole):
        self.kv = kv
        self.role = role
        self.waiting: deque[Req] = deque()
        self.prefilling: list[Req] = []  # admitted, prompt not fully computed yet
        self.running: list[Req] = []  # decoding
        self.compiling: list[Req] = []  # waiting for their grammar, before any other queue
        # requests finished while scheduling (none of a batch's results): the engine reports them
        self.stopped: list[Req] = []

    # ------------------------------------------------------------------ queue views

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.compiling) + self.role.num_queued()

    @property
    def num_running(self) -> int:
        return len(self.running) + len(self.prefilling) + self.role.num_holding_slots()

    def has_work(self) -> bool:
        """Whether any request is live (also those the role holds, waiting on a transfer)."""
        held = self.role.num_queued() + self.role.num_holding_slots() + len(self.compiling)
        return self.has_compute() or held > 0

    def has_compute(self) -> bool:
        """Whether a request may need a forward pass (a batch), as opposed to waiting on a transfer."""
        return bool(self.waiting or self.prefilling or self.running)

    def all_requests(self) -> list[Req]:
        return list(self.waiting) + self.prefilling + self.running + self.role.held() + self.compiling

    def add(self, req: Req) -> None:
        req.status = ReqStatus.WAITING
        self.waiting.append(req)

    def park(self, req: Req) -> None:
        """req waits for its grammar (status WAITING, in no other queue); `unpark` takes it out."""
        req.status = ReqStatus.WAITING
        self.compiling.append(req)

    def unpark(self, req: Req) -> None:
        self.compiling.remove(req)

    def take_stopped(self) -> list[Req]:
        stopped, self.stopped = self.stopped, []
        return stopped

    # ------------------------------------------------------------------ leaving the queues

    def unqueue(self, req: Req) -> None:
        """Takes req out of the queue it is in (the role's first)."""
        if self.role.unqueue(req):
            return
        if req in self.compiling:  # identity: Req compares by identity
            self.compiling.remove(req)
        elif req.status == ReqStatus.WAITING:
            self.waiting.remove(req)
        elif req.status == ReqStatus.PREFILLING:
            self.prefilling.remove(req)
        elif req.status == ReqStatus.RUNNING:
            self.running.remove(req)

    def finish(self, req: Req, reason: dict) -> None:
        """Ends a request and returns its pages (computed whole pages to the cache, unless the role
        frees them itself); safe in any state but FINISHED."""
        if not self.role.release(req):
            self.unqueue(req)
            if req.pages or req.prefix_node is not None:
                self.kv.release(req.fill_ids[: req.num_computed], req.pages, req.prefix_node, cache=True)
            req.pages, req.prefix_node = [], None
        req.finish(reason)

    def abort(self, rid: str, message: str = "Aborted by the client.") -> list[Req]:
        """Finishes every live request with this rid (all samples of an n>1 request)."""
        hit = [r for r in self.all_requests() if r.rid == rid]
        for req in hit:
            self.finish(req, {"type": "abort", "message": message})
        return hit

    def abort_all(self, message: str) -> list[Req]:
        reqs = self.all_requests()
        for req in reqs:
            self.finish(req, {"type": "abort", "message": message})
        return reqs
