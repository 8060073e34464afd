"""The decode role's scheduling policy: pre-allocation for remote prefills, then continuous batching.

    remote (DecodeRequest):  prealloc ──pages for the prompt──▶ waiting_for_kv ──KV + first token──▶ running
                             (no pages yet;  `preallocate`)     (backend writes;  `kv_received`)       │
                                                                                 ──transfer failed──▶ finished (abort)
    local (GenerateRequest): waiting ──▶ prefilling ──▶ running ──▶ finished   (the shared Scheduler)

Pre-allocation reserves, it does not starve: a remote request gets pages only when its prompt's
pages and its reserve (`pages_wanted`) fit beside the headroom of every request already admitted. Its reserve is room for `min(num_reserved_decode_tokens, max_new_tokens)` output
tokens (SGLang's `--num-reserved-decode-tokens`, default 512): enough that a burst of arrivals does
not fill the pool with prompts and force retraction at the next decode step. The reserve is counted,
not allocated: decode takes its pages one at a time as usual. Headroom of admitted requests
(`admission_headroom`, used by local prefill too): a running request keeps what is left of its
reserve, at least one page (its next token); a request waiting for KV keeps its whole reserve.
A lone request (nothing else admitted) is pre-allocated as soon as its prompt fits.

Pages of a request waiting for KV are being written by the backend: it is never retracted, and
when it ends (transfer failed, abort) its pages are freed without entering the radix cache (they
hold no trusted KV), after the caller aborted the receiver. Once received, the request is an
ordinary running request: its KV counts as computed, so a finish caches the prompt's pages and a
retraction recomputes it locally. This is a role object of the shared Scheduler (scheduler_role.py).
Pure Python, no torch.
"""

from __future__ import annotations

from collections import deque

from pdserve.shared.engine.request import Req, ReqStatus
from pdserve.shared.engine.scheduler import ceil_div
from pdserve.shared.engine.scheduler_role import MixedRole

DEFAULT_NUM_RESERVED_DECODE_TOKENS = 512


class DecodeRole(MixedRole):
    def __init__(self, num_reserved_decode_tokens: int = DEFAULT_NUM_RESERVED_DECODE_TOKENS):
        if num_reserved_decode_tokens < 0:
            raise ValueError("--num-reserved-decode-tokens must be >= 0")
        self.num_reserved_decode_tokens = num_reserved_decode_tokens
        self.prealloc: deque[Req] = deque()  # remote requests waiting for pages
        self.waiting_for_kv: list[Req] = []  # pages allocated, KV arriving

    # ------------------------------------------------------------------ the role's queues

    def held(self) -> list[Req]:
        return list(self.prealloc) + self.waiting_for_kv

    def num_queued(self) -> int:
        return len(self.prealloc)

    def num_holding_slots(self) -> int:
        # requests waiting for KV hold pages and a slot in the batch to come
        return len(self.waiting_for_kv)

    def unqueue(self, req: Req) -> bool:
        if req.status == ReqStatus.WAITING_FOR_KV:
            self.waiting_for_kv.remove(req)
        elif req.status == ReqStatus.WAITING and any(r is req for r in self.prealloc):
            self.prealloc.remove(req)
        else:
            return False
        return True

    def release(self, req: Req) -> bool:
        if req.status != ReqStatus.WAITING_FOR_KV:
            return False
        self.waiting_for_kv.remove(req)  # untrusted KV: freed, never cached
        self.scheduler.kv.release([], req.pages, req.prefix_node, cache=False)
        req.pages, req.prefix_node = [], None
        return True

    # ------------------------------------------------------------------ decisions

    def stuck_prefill_victim(self) -> Req | None:
        # requests waiting for their KV become running and free their pages by themselves
        return None if self.waiting_for_kv else super().stuck_prefill_victim()

    def admission_headroom(self) -> int:
        running = sum(max(1, self.pages_wanted(r)) for r in self.scheduler.running)
        return running + sum(self.pages_wanted(r) for r in self.waiting_for_kv)

    # ------------------------------------------------------------------ remote requests

    def add_remote(self, req: Req) -> None:
        """Queues a request whose prompt KV comes from a prefill worker."""
        req.status = ReqStatus.WAITING
        self.prealloc.append(req)

    def pages_wanted(self, req: Req) -> int:
        """Pages req may still want for its prompt and reserved output tokens, beyond those it holds."""
        reserved = min(self.num_reserved_decode_tokens, req.params.max_new_tokens)
        page_size = self.scheduler.config.page_size
        return max(0, ceil_div(len(req.input_ids) + reserved, page_size) - len(req.pages))

    def preallocate(self) -> list[Req]:
        """Gives prompt pages to queued remote requests, oldest first, while the pool allows; returns
        those that got them, now WAITING_FOR_KV (the caller names their pages to the receiver)."""
        s = self.scheduler
        admitted: list[Req] = []
        while self.prealloc and s.num_running < s.config.max_running_requests:
            req = self.prealloc[0]
            prompt_pages = ceil_div(len(req.input_ids), s.config.page_size)
            spare = s.kv.available_pages - self.admission_headroom()
            alone = not (s.running or s.prefilling or self.waiting_for_kv)
            fits = spare >= self.pages_wanted(req)
            if not (fits or (alone and s.kv.available_pages >= prompt_pages)):
                break
            pages = s.kv.allocate(prompt_pages)
            if pages is None:
                break
            self.prealloc.popleft()
            req.pages, req.prefix_node, req.num_computed = pages, None, 0
            req.status = ReqStatus.WAITING_FOR_KV
            self.waiting_for_kv.append(req)
            admitted.append(req)
        return admitted

    def kv_received(self, req: Req) -> bool:
        """The prompt's KV is in req's pages and the first token in output_ids (handoff.py): req joins
        the running batch (or, when its grammar forces tokens after that one, prefills them first:
        scheduler.py `jump_forward`). Returns whether it finished right away (first token is a stop,
        or max_new_tokens is 1 or 0)."""
        if req.status != ReqStatus.WAITING_FOR_KV:
            raise ValueError(f"request {req.rid} is {req.status.name}, not WAITING_FOR_KV")
        self.waiting_for_kv.remove(req)
        req.num_computed = len(req.input_ids)
        req.status = ReqStatus.RUNNING
        self.scheduler.running.append(req)
        if req.params.max_new_tokens == 0:
            reason: dict | None = {"type": "length", "length": 0}
        else:
            reason = self.stop_reason(req, req.output_ids[-1])
        if reason is not None:
            self.scheduler.finish(req, reason)
            return True
        self.scheduler.jump_forward(req)  # this worker jumps past what the grammar forces after it
        return False

    def kv_failed(self, req: Req, message: str) -> None:
        """Ends a remote request whose transfer failed (its receiver is final or aborted)."""
        self.scheduler.finish(req, {"type": "abort", "message": message})
