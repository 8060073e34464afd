"""A stand-in for the ModelRunner under the batch pipeline, and a stand-in grammar for its requests.

The stand-in "model" picks each token from the sequence so far (`next_token`), and the stand-in
device remembers the tokens it sampled that the host has not read, so a decode step planned ahead
is checked to compute exactly the position after them. A constrained request (`req.grammar`, a
`CyclicGrammar`) samples the allowed token nearest the model's choice; its row may only be sampled
once its matcher has accepted every token before (the device asserts it), which is what overlap
must arrange for constrained steps. `events` records the order of forwards, samplings and reads.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from pdserve.shared.engine.batch_pipeline import BatchPipeline
from pdserve.shared.engine.engine_stats import EngineStats
from pdserve.shared.engine.kv_cache_manager import KVCacheManager
from pdserve.shared.engine.request import Req
from pdserve.shared.engine.sampling_params import SamplingParams
from pdserve.shared.engine.scheduled_batch import BatchKind, ScheduledBatch
from pdserve.shared.engine.scheduler import Scheduler, SchedulerConfig

PAGE_SIZE = 4
END = 98  # the token a CyclicGrammar ends on (the model itself picks 1..97)


def next_token(seq: list[int]) -> int:
    """A deterministic stand-in for the model's choice: depends on the whole sequence, never 0."""
    return 1 + (sum(seq) * 31 + len(seq)) % 97


class CyclicGrammar:
    """Allows, at its k-th token, those congruent to k mod 3 while k < length, then only END; accepting
    END terminates it. Follows the TokenGrammar protocol of request.py."""

    def __init__(self, length: int):
        self.length = length
        self.accepted: list[int] = []
        self.rejected = False

    def allowed(self) -> list[int]:
        k = len(self.accepted)
        return [t for t in range(1, END) if t % 3 == k % 3] if k < self.length else [END]

    def accept(self, token: int) -> bool:
        ok = not self.is_terminated() and token in self.allowed()
        if ok:
            self.accepted.append(token)
        self.rejected = self.rejected or not ok
        return ok

    def is_terminated(self) -> bool:
        return len(self.accepted) > self.length

    def fill(self, bitmask, row: int) -> None:
        raise AssertionError("the stand-in device masks by `allowed`")

    def forced_string(self) -> str:
        return ""

    def rollback(self, num_tokens: int) -> None:
        del self.accepted[len(self.accepted) - num_tokens :]


def pick(req: Req, seq: list[int]) -> int:
    """The model's choice, moved to the nearest token the request's grammar allows."""
    raw = next_token(seq)
    grammar = req.grammar
    if not isinstance(grammar, CyclicGrammar) or req.is_finished:
        return raw
    return min(grammar.allowed(), key=lambda t: ((t - raw) % 99, t))


@dataclass
class FakeForward:
    batch: ScheduledBatch
    step: int


@dataclass
class FakeLaunched:
    batch: ScheduledBatch
    tokens: list[int]
    step: int
    wants_logprobs: bool = False

    def future_ids(self) -> None:
        return None  # the stand-in device reads its own record of unread tokens


@dataclass
class FakeDevice:
    """`run` (extend, in order), `launch_forward` + `launch_sampling` (decode) and `collect`."""

    unread: dict[Req, list[int]] = field(default_factory=dict)
    num_decode_rows: int = 0
    events: list[tuple[str, int, bool]] = field(default_factory=list)  # (what, step, constrained)

    def run(self, batch: ScheduledBatch) -> list[int | None]:
        assert batch.kind == BatchKind.EXTEND
        assert not any(self.unread.get(r) for r in batch.reqs), "an extend row read an unknown token"
        return [pick(r, r.fill_ids) if batch.samples(i) else None for i, r in enumerate(batch.reqs)]

    def launch_forward(self, batch: ScheduledBatch, futures) -> FakeForward:
        for req, prefix in zip(batch.reqs, batch.prefix_lens):
            seq = req.fill_ids + self.unread.get(req, [])
            # the step computes the KV of position `prefix`, the last token the device knows
            assert len(seq) == prefix + 1, f"{req.rid}: planned position {prefix}, device holds {len(seq)}"
            assert len(req.pages) * PAGE_SIZE > prefix, f"{req.rid}: no page for position {prefix}"
        step = sum(1 for e in self.events if e[0] == "forward")
        self.events.append(("forward", step, _constrained(batch)))
        return FakeForward(batch, step)

    def launch_sampling(self, forward: FakeForward) -> FakeLaunched:
        tokens = []
        for req in forward.batch.reqs:
            unread = self.unread.get(req, [])
            if req.grammar is not None and not req.is_finished:
                assert not unread, f"{req.rid}: masked before its matcher saw its last token"
            tokens.append(pick(req, req.fill_ids + unread))
        for req, token in zip(forward.batch.reqs, tokens):
            self.unread.setdefault(req, []).append(token)
        self.num_decode_rows += len(tokens)
        self.events.append(("sample", forward.step, _constrained(forward.batch)))
        return FakeLaunched(forward.batch, tokens, forward.step)

    def collect(self, launched: FakeLaunched) -> list[int]:
        for req, token in zip(launched.batch.reqs, launched.tokens):
            assert self.unread[req].pop(0) == token
        self.events.append(("collect", launched.step, _constrained(launched.batch)))
        return launched.tokens


def make(num_pages: int, overlap: bool, max_running: int = 64) -> tuple[BatchPipeline, FakeDevice]:
    kv = KVCacheManager(num_pages, PAGE_SIZE)
    cfg = SchedulerConfig(
        page_size=PAGE_SIZE, max_running_requests=max_running, max_prefill_tokens=64, chunked_prefill_size=8
    )
    device = FakeDevice()
    return BatchPipeline(Scheduler(cfg, kv), device, EngineStats(), overlap), device  # type: ignore[arg-type]


def check_pages(p: BatchPipeline) -> None:
    s = p.scheduler
    held = [pg for r in s.all_requests() for pg in r.pages[s.kv.num_tree_pages(r.prefix_node) :]]
    s.kv.check_invariants(held_outside=held)


def run(p: BatchPipeline, reqs: list[Req], abort_at: dict[str, int] | None = None, limit: int = 5000) -> None:
    """Steps until done; aborts rid once it has reported abort_at[rid] tokens."""
    abort_at = dict(abort_at or {})
    for r in reqs:
        p.scheduler.add(r)
    steps = 0
    while p.scheduler.has_work() or p.in_flight is not None:
        p.step()
        check_pages(p)
        for r in reqs:
            if r.rid in abort_at and not r.is_finished and len(r.output_ids) >= abort_at[r.rid]:
                p.scheduler.abort(r.rid)
                del abort_at[r.rid]
        steps += 1
        assert steps < limit, "no progress"
    assert p.scheduler.kv.available_pages == p.scheduler.kv.num_total_pages


def req(
    rid: str, prompt: list[int], max_new: int, stop: tuple[int, ...] = (), grammar_len: int | None = None
) -> Req:
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new, stop_token_ids=list(stop))
    grammar = CyclicGrammar(grammar_len) if grammar_len is not None else None
    return Req(rid=rid, input_ids=list(prompt), params=params, grammar=grammar)


def workload(seed: int, n: int, constrained: bool = False) -> list[tuple]:
    """Arguments of `req`: random prompts, lengths and stop tokens; with `constrained`, about half
    the requests under grammars of 0 to 20 tokens before END."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(1, 200) for _ in range(rng.randrange(1, 30))]
        stop = (rng.randrange(1, 98),) if rng.random() < 0.5 else ()
        spec = (f"r{i}", prompt, rng.choice([1, 2, 5, 17, 40]), stop)
        if constrained and rng.random() < 0.5:
            spec += (rng.randrange(0, 21),)
        out.append(spec)
    return out


def outputs(overlap: bool, spec, num_pages: int = 400, abort_at=None, jumper=None):
    """Runs `req(*s)` for each s of spec; (output ids and finish reason by rid, pipeline, device)."""
    p, device = make(num_pages, overlap)
    p.scheduler.jumper = jumper
    reqs = [req(*s) for s in spec]
    run(p, reqs, abort_at)
    return {r.rid: (list(r.output_ids), r.finish_reason) for r in reqs}, p, device


def _constrained(batch: ScheduledBatch) -> bool:
    return any(r.grammar is not None for r in batch.reqs)
