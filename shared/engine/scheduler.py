"""Continuous batching with chunked prefill, admission by free pages, and retraction.

Life of a request in one engine:

    waiting ──admit (prefix match + pages for its first chunk)──▶ prefilling (one chunk per step)
       ▲                                                              │ last chunk: samples a token
       │ retract (decode ran out of pages: pages freed,               ▼
       └──────── computed prefix kept in the radix cache) ──── running (one token per step) ──▶ finished

Each step is either an EXTEND batch (chunks of waiting/prefilling requests, prefill first, like
SGLang) or a DECODE batch (every running request). The scheduler is pure Python: it decides which
tokens to compute and where their KV goes (page ids); the model runner does the arithmetic and hands
back one sampled token per request that reached the end of its `fill_ids`.

Page accounting rules:
- a request's `pages` cover at least `num_computed` tokens; before a step, pages are allocated for
  the tokens that step computes;
- admission keeps one page of headroom per running request, so a new prompt never takes the page a
  running request needs for its next token;
- when decode still runs short, half-prefilled requests and then the most recently arrived running
  requests are retracted until the rest fit; their computed tokens stay in the radix cache, so
  recompute is mostly hits. Only a lone request that outgrows the whole pool is stopped (abort).
- finished, aborted and retracted requests return every page through `KVCacheManager.release`.

Overlap scheduling (the engine's batch_pipeline.py): a decode step is recorded in two halves,
`on_decode_launched` (KV counters move on; each request has one token in flight) and
`on_decode_done` (the tokens reach output_ids, stop checks run), and the next decode step may be
planned between the two. Such a plan reads no token: a request whose in-flight token will end it
whatever its value (max_new_tokens, context length) sits the step out, and `can_schedule_ahead`
refuses whenever planning would have to retract or stop a request: the engine then reads the
tokens first, so those decisions are taken on the same facts as without overlap. A request that
finishes on its in-flight token (a stop token) was planned into one step too many: that step's
token for it is dropped by `on_decode_done`, and its KV slot went back with its pages.

Jump-forward (jump_forward.py; `jumper`, None when off): a running constrained request that accepted
a token may gain the tokens its grammar forces; it then goes back to the prefilling queue, its
fill_ids running past num_computed like a prompt's, and the next extend batch computes them and
samples at the end of the chunk (`jump_forward`).

The queues themselves, and finishing or aborting a request, are request_queues.py's; the batch
types are scheduled_batch.py's. What differs between the mixed, prefill and decode roles (where a
request goes once its prompt is computed, when it stops, the headroom admission leaves, which
half-prefilled request gives way, queues of their own) the scheduler asks its role object
(scheduler_role.py; prefill/prefill_role.py and decode/decode_role.py for the P/D roles).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from pdserve.shared.engine.kv_cache_manager import KVCacheManager
from pdserve.shared.engine.request import Req, ReqStatus
from pdserve.shared.engine.request_queues import RequestQueues
from pdserve.shared.engine.schedule_policy import order_waiting
from pdserve.shared.engine.scheduled_batch import BatchKind, ScheduledBatch, StepResult
from pdserve.shared.engine.scheduler_role import MixedRole


@dataclass
class SchedulerConfig:
    page_size: int
    max_running_requests: int
    max_prefill_tokens: int
    chunked_prefill_size: int  # -1: no chunking
    schedule_policy: str = "fcfs"
    context_length: int = 1 << 62
    whole_prompts: bool = False  # a prompt is computed in one chunk or waits (encoders, mean pooling)


class Jumper(Protocol):
    """Appends the tokens a request's grammar forces, at most `limit` more; returns how many more
    it has (jump_forward.py)."""

    def jump(self, req: Req, limit: int) -> int: ...


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class Scheduler(RequestQueues):
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, role: MixedRole | None = None):
        super().__init__(kv, role or MixedRole())
        self.config = config
        self.num_retractions = 0
        self.jumper: Jumper | None = None
        self.num_jump_forward_tokens = 0
        self.role.attach(self)

    # ------------------------------------------------------------------ scheduling

    def schedule(self) -> ScheduledBatch | None:
        """Picks the next batch: prefill work when any can be admitted, else one decode step."""
        self.role.on_schedule()
        batch = self._schedule_extend()
        if batch is not None:
            return batch
        if self.running:
            return self._schedule_decode()
        # Chunked prefills can hold every free page between them with none able to take its next
        # chunk, and with nothing decoding no page would ever come back: give the newest one's
        # pages back (it starts over later) until the others can go on.
        while len(self.prefilling) > 1 and (victim := self.role.stuck_prefill_victim()) is not None:
            self._retract(victim)
            batch = self._schedule_extend()
            if batch is not None:
                return batch
        return None

    def _prefix_limit(self, req: Req) -> int:
        """How many leading tokens may come from the cache: the last token must always be computed
        (its logits give the next token), and prompt logprobs need the positions they score."""
        limit = req.seq_len - 1
        if req.wants_input_logprobs:
            limit = min(limit, max(req.logprob_start_len - 1, 0))
        return limit

    def _cached_len(self, req: Req) -> int:
        return self.kv.match_prefix(req.fill_ids[: self._prefix_limit(req)]).num_tokens

    def _blocked(self, req: Req) -> bool:
        """Samples 1..n-1 of an n>1 request wait until sample 0 has its prompt in the cache (a lead
        prefilling again after a jump has it)."""
        lead = req.share_prompt_with
        if lead is None or lead.status not in (ReqStatus.WAITING, ReqStatus.PREFILLING):
            return False
        return lead.status == ReqStatus.WAITING or lead.num_computed < len(lead.input_ids)

    def _schedule_extend(self) -> ScheduledBatch | None:
        cfg = self.config
        budget = cfg.max_prefill_tokens
        chunk_cap = cfg.chunked_prefill_size if cfg.chunked_prefill_size > 0 else 1 << 62
        headroom = self.role.admission_headroom()
        reqs: list[Req] = []
        prefix_lens: list[int] = []
        extend_lens: list[int] = []
        admitted = 0
        cached_tokens = 0

        def take(req: Req) -> bool:
            """Plans this step's chunk of req; False when not a single token fits."""
            nonlocal budget
            remaining = req.remaining_fill
            # tokens that fit into the pages the request holds plus those it may still allocate
            spare_pages = self.kv.available_pages - headroom
            room = len(req.pages) * cfg.page_size - req.num_computed + max(spare_pages, 0) * cfg.page_size
            n = min(remaining, budget, chunk_cap, room)
            if n <= 0 or (cfg.whole_prompts and n < remaining):
                return False
            need = ceil_div(req.num_computed + n, cfg.page_size) - len(req.pages)
            if need > 0:
                pages = self.kv.allocate(need)
                if pages is None:
                    return False
                req.pages.extend(pages)
            reqs.append(req)
            prefix_lens.append(req.num_computed)
            extend_lens.append(n)
            budget -= n
            return True

        # 1. continue requests already prefilling (chunked), oldest first
        for req in list(self.prefilling):
            if budget <= 0 or not take(req):
                break
        # 2. admit waiting requests while budget, slots and pages last
        if budget > 0 and self.waiting:
            for req in order_waiting(cfg.schedule_policy, list(self.waiting), self._cached_len):
                if budget <= 0 or self.num_running + admitted >= cfg.max_running_requests:
                    break
                if self._blocked(req):
                    continue
                if not self._admit(req, take):
                    break
                admitted += 1
                cached_tokens += req.num_computed  # what the admission matched in the cache
        if not reqs:
            return None
        for req in reqs:
            if req.status == ReqStatus.WAITING:
                self.waiting.remove(req)
                self.prefilling.append(req)
                req.status = ReqStatus.PREFILLING
        return ScheduledBatch(BatchKind.EXTEND, reqs, prefix_lens, extend_lens, cached_tokens)

    def _admit(self, req: Req, take) -> bool:
        """Matches req's prefix in the cache, locks it, and plans its first chunk."""
        hit = self.kv.match_prefix(req.fill_ids[: self._prefix_limit(req)])
        self.kv.acquire(hit)
        req.pages = list(hit.pages)
        req.prefix_node = hit.node
        req.num_computed = hit.num_tokens
        if req.num_retractions == 0:
            req.cached_tokens = hit.num_tokens
        if take(req):
            return True
        # nothing fits: give the matched prefix back to the cache as it was
        self.kv.release(req.fill_ids[: req.num_computed], req.pages, req.prefix_node, cache=True)
        req.pages, req.prefix_node, req.num_computed = [], None, 0
        return False

    def _decode_members(self) -> list[Req]:
        """The running requests that compute a token in the next decode step: all but those whose
        token in flight is their last whatever its value (computing one more would be thrown away)."""
        return [r for r in self.running if not self._last_token_in_flight(r)]

    def _last_token_in_flight(self, req: Req) -> bool:
        if req.tokens_in_flight == 0:
            return False
        num_output = len(req.output_ids) + req.tokens_in_flight
        return (
            num_output >= req.params.max_new_tokens
            or req.seq_len_with_in_flight >= self.config.context_length
        )

    def _decode_pages_short(self) -> int:
        """Pages the next decode step must allocate: one per member whose next token starts a page."""
        ps = self.config.page_size
        return sum(1 for r in self._decode_members() if r.num_computed + 1 > len(r.pages) * ps)

    def can_schedule_ahead(self) -> bool:
        """Whether the next batch may be planned while a decode step's tokens are still in flight:
        not when a decode step would have to retract or stop a request for want of pages (that choice
        must see which requests the in-flight tokens finish). An extend batch may be planned: it
        only takes pages and slots that are free already, whatever the tokens turn out to be."""
        return self._decode_pages_short() <= self.kv.available_pages

    def _schedule_decode(self) -> ScheduledBatch | None:
        """One token for every running request (but those whose last token is in flight); retracts
        while pages run short."""
        ps = self.config.page_size
        while True:
            if self._decode_pages_short() <= self.kv.available_pages:
                break
            victim = self._retraction_victim()
            if victim is None:
                break
            self._retract(victim)
        for req in self._decode_members():
            if req.num_computed + 1 > len(req.pages) * ps:
                pages = self.kv.allocate(1)
                if pages is None:
                    # a lone request that outgrew the whole pool: stop it rather than loop forever
                    self.finish(req, {"type": "abort", "message": "KV cache pool exhausted by one request"})
                    self.stopped.append(req)
                    continue
                req.pages.extend(pages)
        reqs = self._decode_members()
        if not reqs:
            return None
        return ScheduledBatch(BatchKind.DECODE, reqs, [r.num_computed for r in reqs], [1] * len(reqs))

    def _retraction_victim(self) -> Req | None:
        """Half-prefilled requests go first (they block no client yet), then running ones, newest
        first; the last running request is never retracted (it would only come back to the same spot)."""
        if self.prefilling:
            return max(self.prefilling, key=lambda r: r.arrival_time)
        if len(self.running) > 1:
            return max(self.running, key=lambda r: r.arrival_time)
        return None

    def _retract(self, req: Req) -> None:
        (self.running if req.status == ReqStatus.RUNNING else self.prefilling).remove(req)
        self.kv.release(req.fill_ids[: req.num_computed], req.pages, req.prefix_node, cache=True)
        req.pages, req.prefix_node, req.num_computed = [], None, 0
        req.num_retractions += 1
        req.status = ReqStatus.WAITING
        self.waiting.appendleft(req)
        self.num_retractions += 1

    # ------------------------------------------------------------------ results

    def on_batch_done(self, batch: ScheduledBatch, next_tokens: list[int | None]) -> StepResult:
        """Advances counters after the forward pass; next_tokens[i] is set where batch.samples(i)."""
        if batch.kind == BatchKind.DECODE:
            self.on_decode_launched(batch)
            return self.on_decode_done(batch, [t for t in next_tokens if t is not None])
        result = StepResult()
        for i, req in enumerate(batch.reqs):
            if req.is_finished:  # aborted while the batch ran
                continue
            req.num_computed = batch.prefix_lens[i] + batch.extend_lens[i]
            if batch.kind == BatchKind.EXTEND:
                self._after_chunk(req)
            token = next_tokens[i]
            prefill_complete = req.status == ReqStatus.PREFILLING and req.num_computed == req.seq_len
            if prefill_complete and not self.role.on_prefill_complete(req, result):
                continue
            if token is None:
                continue
            req.append_output(token)
            result.progressed.append(req)
            reason = self.role.stop_reason(req, token)
            if reason is not None:
                self.finish(req, reason)
                result.finished.append(req)
            else:
                self.jump_forward(req)
        return result

    def on_decode_launched(self, batch: ScheduledBatch) -> None:
        """A decode step was launched: each request's KV will hold one token more, and each has one
        sampled token in flight until `on_decode_done`."""
        for req, prefix in zip(batch.reqs, batch.prefix_lens):
            req.tokens_in_flight += 1
            if not req.is_finished:
                req.num_computed = prefix + 1

    def on_decode_done(self, batch: ScheduledBatch, next_tokens: list[int]) -> StepResult:
        """The launched decode step's tokens (one per request) reached the host: appends them and
        runs the stop checks. A request that finished meanwhile (aborted, or stopped by the token of
        the step before, read after this one was launched) drops its token."""
        if len(next_tokens) != len(batch.reqs):
            raise ValueError(f"{len(next_tokens)} tokens for a decode step of {len(batch.reqs)} requests")
        result = StepResult()
        for req, token in zip(batch.reqs, next_tokens):
            req.tokens_in_flight -= 1
            if req.is_finished:
                continue
            req.append_output(token)
            result.progressed.append(req)
            reason = self.role.stop_reason(req, token)
            if reason is not None:
                self.finish(req, reason)
                result.finished.append(req)
            else:
                self.jump_forward(req)
        return result

    def jump_forward(self, req: Req) -> None:
        """After a running request accepted a token (whose KV is not computed yet): the tokens its
        grammar forces join its output, and it returns to prefilling until their KV is computed."""
        if self.jumper is None or req.grammar is None or req.status != ReqStatus.RUNNING:
            return
        if req.tokens_in_flight or req.remaining_fill != 1:
            return
        # tokens it may gain, one kept for the token sampled after them
        limit = min(req.params.max_new_tokens - len(req.output_ids), self.config.context_length - req.seq_len)
        gained = self.jumper.jump(req, limit - 1)
        if gained:
            self.num_jump_forward_tokens += gained
            self.running.remove(req)
            req.status = ReqStatus.PREFILLING
            self.prefilling.append(req)

    def _after_chunk(self, req: Req) -> None:
        """Puts the request's computed whole pages into the radix cache so others can share them."""
        tokens = req.fill_ids[: req.num_computed]
        req.pages, req.prefix_node = self.kv.cache_request(tokens, req.pages, req.prefix_node)
