"""The prefill role's scheduling policy: chunked prefill with the radix cache, no decode batches.

    waiting ──admit──▶ prefilling ──last chunk: first token sampled──▶ transferring ──▶ finished
                       (a chunk per step; whole pages     (every page sent; waits until the
                        go to the cache after each)        sender is Success or Failed)

The shared Scheduler does admission, chunking and the prefix cache unchanged; this role object
(scheduler_role.py) decides what differs:
- a request whose prompt is computed does not join a decode batch: it keeps its pages and moves to
  `transferring` with the first token in `output_ids` (no stop check here: the decode side owns
  the stop conditions, even when the very first token is EOS);
- `finish_transfer` ends it once the engine saw its sender reach a final state (a failure may come
  earlier, while it is still queued or prefilling): the computed whole pages go to the radix cache
  (their KV is right whether or not the transfer worked) and the rest is freed, through the same
  `finish` as an abort, so each page is given back exactly once;
- nothing ever runs, so nothing decoding is retracted: a page a sender reads stays put until then.

Chunked prefills can hold every free page between them with none able to take its next chunk
(long prompts arriving together, decode workers slow to name their pages). With requests
transferring, pages come back when their senders are final: wait. Otherwise the newest prefilling
request whose sender has been handed no page yet gives its pages back and starts over later (its
sender keeps waiting; nothing it could read is freed). When every prefilling request has sent
pages, none can be retracted quietly: `stuck` names the newest, whose sender the engine cancels
before its pages are freed (the request fails at this worker; the router retries it elsewhere).

`pages_ready(req)` says which pages may be sent now: after `_after_chunk` (the chunk's whole pages
are in the tree, duplicates already swapped for the tree's copies), the whole pages computed so far;
after the last chunk, every page including a partly filled last one. Pure Python, no torch.
"""

from __future__ import annotations

from collections.abc import Callable

from pdserve.shared.engine.request import Req, ReqStatus
from pdserve.shared.engine.scheduled_batch import StepResult
from pdserve.shared.engine.scheduler_role import MixedRole


class PrefillRole(MixedRole):
    def __init__(self, pages_sent: Callable[[Req], int]):
        """`pages_sent(req)`: how many of req's pages were handed to its sender so far."""
        self.transferring: list[Req] = []  # prompt computed; pages held until the sender is final
        self._pages_sent = pages_sent
        self.stuck: Req | None = None  # set while scheduling: see the module docstring

    # ------------------------------------------------------------------ the role's queue

    def held(self) -> list[Req]:
        return list(self.transferring)

    def num_holding_slots(self) -> int:
        # transferring requests hold pages and a slot: max_running_requests bounds them too
        return len(self.transferring)

    def unqueue(self, req: Req) -> bool:
        if req.status != ReqStatus.TRANSFERRING:
            return False
        self.transferring.remove(req)
        return True

    # ------------------------------------------------------------------ decisions

    def on_schedule(self) -> None:
        self.stuck = None

    def stuck_prefill_victim(self) -> Req | None:
        if self.transferring:
            return None  # their senders end, and their pages come back
        prefilling = self.scheduler.prefilling
        unsent = [r for r in prefilling if self._pages_sent(r) == 0]
        if unsent:
            return max(unsent, key=lambda r: r.arrival_time)
        self.stuck = max(prefilling, key=lambda r: r.arrival_time)
        return None

    def on_prefill_complete(self, req: Req, result: StepResult) -> bool:
        if req.wants_embedding:  # nothing to transfer: it ends here, as on a mixed worker
            return super().on_prefill_complete(req, result)
        self.scheduler.prefilling.remove(req)
        req.status = ReqStatus.TRANSFERRING
        self.transferring.append(req)
        return True  # the sampled first token (if any) still goes into output_ids

    def stop_reason(self, req: Req, token: int) -> dict | None:
        return None  # the decode side decides when the request stops

    # ------------------------------------------------------------------ for the prefill engine

    def pages_ready(self, req: Req) -> int:
        """How many leading pages of req.pages hold final KV and may be sent now."""
        if req.status == ReqStatus.TRANSFERRING:
            return len(req.pages)
        return req.num_computed // self.scheduler.config.page_size

    def finish_transfer(self, req: Req, ok: bool, reason: str = "") -> None:
        """Ends a request once its sender is final and gives its pages back. Success (ok) comes only
        after the last send, so req is transferring; a failure may come at any stage (the decode side
        gave up while req was still queued or prefilling): req stops wherever it is."""
        if ok and req.status != ReqStatus.TRANSFERRING:
            raise ValueError(f"request {req.rid} is {req.status.name}: only a transferring request succeeds")
        if req.is_finished:
            raise ValueError(f"request {req.rid} already finished")
        self.scheduler.finish(req, {"type": "transferred"} if ok else {"type": "abort", "message": reason})
