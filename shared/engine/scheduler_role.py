"""What a role decides inside the shared scheduler: one object the scheduler owns and asks.

    scheduler = Scheduler(config, kv)                          # the mixed role: MixedRole()
    scheduler = Scheduler(config, kv, PrefillRole(pages_sent)) # prefill/prefill_role.py
    scheduler = Scheduler(config, kv, DecodeRole(512))         # decode/decode_role.py

The scheduler keeps the shared queues (waiting, prefilling, running), admission, chunking,
retraction and the prefix cache; it calls its role for:
- `admission_headroom()`: pages a new prompt must leave free for requests already admitted;
- `on_prefill_complete(req, result)`: where a request goes once its prompt is computed, and whether
  the token it sampled this step still counts;
- `stop_reason(req, token)`: when a request stops;
- `stuck_prefill_victim()`: which half-prefilled request gives its pages back when none can go on;
- the requests it holds in queues of its own (`held`, counted as running or waiting, live work
  without compute), taken out by `unqueue(req)`, and `release(req)` for pages it frees itself.
A role reaches the scheduler's queues and `finish` through `self.scheduler`, set by `attach`.
Pure Python, no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pdserve.shared.engine.request import Req, ReqStatus
from pdserve.shared.engine.scheduled_batch import StepResult

if TYPE_CHECKING:
    from pdserve.shared.engine.scheduler import Scheduler


class MixedRole:
    """A classic server's decisions; the roles of a P/D pair change some of them."""

    scheduler: Scheduler

    def attach(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    # ------------------------------------------------------------------ requests in the role's queues

    def held(self) -> list[Req]:
        """Live requests in queues of the role's own (besides waiting, prefilling, running); each is
        counted either in `num_holding_slots` or in `num_queued`."""
        return []

    def num_holding_slots(self) -> int:
        """Of `held`, those that hold pages and a slot in the batch (counted as running)."""
        return 0

    def num_queued(self) -> int:
        """Of `held`, those that wait for pages (counted as waiting)."""
        return 0

    def unqueue(self, req: Req) -> bool:
        """Takes req out of the role's queue holding it; False when it is in none of them."""
        return False

    def release(self, req: Req) -> bool:
        """Frees req's pages itself when the role knows better than the cache (True), or leaves
        them to the scheduler (False: computed whole pages go to the radix cache)."""
        return False

    # ------------------------------------------------------------------ decisions

    def on_schedule(self) -> None:
        """A schedule() starts."""

    def admission_headroom(self) -> int:
        """Pages a new prompt must leave free: one per running request (its next token's page)."""
        return len(self.scheduler.running)

    def stuck_prefill_victim(self) -> Req | None:
        """The half-prefilled request that gives its pages back when none can go on (the newest),
        or None to wait."""
        return max(self.scheduler.prefilling, key=lambda r: r.arrival_time)

    def on_prefill_complete(self, req: Req, result: StepResult) -> bool:
        """req's fill_ids are all computed: it joins the decode batch. Returns whether the token it
        sampled this step is still to be handled (False: req is done with this step)."""
        s = self.scheduler
        s.prefilling.remove(req)
        req.status = ReqStatus.RUNNING
        s.running.append(req)
        if req.params.max_new_tokens == 0:  # prompt scoring only
            s.finish(req, {"type": "length", "length": 0})
            result.progressed.append(req)
            result.finished.append(req)
            return False
        return True

    def stop_reason(self, req: Req, token: int) -> dict | None:
        p = req.params
        grammar = req.grammar
        if grammar is not None and grammar.rejected:
            return {"type": "abort", "message": f"token {token} does not fit the request's grammar"}
        if grammar is not None and grammar.is_terminated():  # it accepted a stop token at its end
            return {"type": "stop", "matched": token}
        is_stop = token in p.stop_token_ids or (not p.ignore_eos and token in req.eos_token_ids)
        if is_stop and len(req.output_ids) >= p.min_new_tokens:
            return {"type": "stop", "matched": token}
        if len(req.output_ids) >= p.max_new_tokens:
            return {"type": "length", "length": p.max_new_tokens}
        if req.seq_len >= self.scheduler.config.context_length:
            return {"type": "length", "length": len(req.output_ids)}
        return None
