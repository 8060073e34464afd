"""The prefill role's scheduler over a real KVCacheManager, no torch: which pages may be sent after
each chunk, that a sent page is never swapped or freed before the transfer ends, and that every page
comes back exactly once (prompt pages into the radix cache) on success, failure and abort."""

from __future__ import annotations

import pytest

from pdserve.prefill.prefill_role import PrefillRole
from pdserve.shared.engine.kv_cache_manager import KVCacheManager
from pdserve.shared.engine.request import Req, ReqStatus
from pdserve.shared.engine.sampling_params import SamplingParams
from pdserve.shared.engine.scheduled_batch import BatchKind
from pdserve.shared.engine.scheduler import Scheduler, SchedulerConfig

EOS = 0


def make(num_pages=64, page_size=4, chunk=-1, radix=True, sent=None) -> Scheduler:
    """`sent`: rid -> pages handed to its sender (what the engine's send queue would say)."""
    kv = KVCacheManager(num_pages, page_size, enable_radix=radix)
    cfg = SchedulerConfig(
        page_size=page_size, max_running_requests=256, max_prefill_tokens=1 << 20, chunked_prefill_size=chunk
    )
    sent = {} if sent is None else sent
    return Scheduler(cfg, kv, PrefillRole(lambda r: sent.get(r.rid, 0)))


def req(rid, prompt, max_new=4) -> Req:
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new)
    return Req(rid=rid, input_ids=list(prompt), params=params, eos_token_ids=frozenset({EOS}))


def step(s: Scheduler, token: int = 7):
    batch = s.schedule()
    if batch is None:
        return None
    s.on_batch_done(batch, [token if batch.samples(i) else None for i in range(len(batch.reqs))])
    held = [p for r in s.all_requests() for p in r.pages[s.kv.num_tree_pages(r.prefix_node) :]]
    s.kv.check_invariants(held_outside=held)
    return batch


def all_pages_back(s: Scheduler) -> bool:
    return s.kv.num_free_pages + s.kv.num_evictable_pages == s.kv.num_total_pages


def test_chunks_make_pages_ready_then_the_request_waits_for_its_transfer():
    s = make(page_size=4, chunk=8)
    r = req("a", range(10, 29))  # 19 tokens: 5 pages, the last one holds 3 tokens
    s.add(r)
    ready = []
    while r.status != ReqStatus.TRANSFERRING:
        batch = step(s)
        assert batch.kind == BatchKind.EXTEND
        ready.append(s.role.pages_ready(r))
    assert ready == [2, 4, 5]  # whole pages after chunks 1 and 2; every page after the last chunk
    assert r.pages == [1, 2, 3, 4, 5] and r.output_ids == [7]
    assert s.schedule() is None  # no decode batch on a prefill worker
    assert s.has_work() and s.num_running == 1 and s.role.transferring == [r]
    s.role.finish_transfer(r, ok=True)
    assert r.finish_reason == {"type": "transferred"} and r.pages == []
    assert not s.has_work()
    assert s.kv.num_cached_pages == 4  # the prompt's whole pages stay in the radix cache
    assert s.kv.num_free_pages == s.kv.num_total_pages - 4 and all_pages_back(s)


def test_the_first_token_never_stops_the_request_on_the_prefill_side():
    s = make()
    for max_new, token in ((1, 3), (5, EOS)):
        r = req(f"r{max_new}", range(40, 50), max_new=max_new)
        s.add(r)
        step(s, token=token)
        assert r.status == ReqStatus.TRANSFERRING and r.output_ids == [token]
        assert r.finish_reason is None and r.pages  # pages held until the sender is final
        s.role.finish_transfer(r, ok=True)
    assert all_pages_back(s)


def test_prompt_scoring_only_transfers_without_a_first_token():
    s = make()
    r = req("score", range(60, 70), max_new=0)
    s.add(r)
    step(s)
    assert r.status == ReqStatus.TRANSFERRING and r.output_ids == []
    s.role.finish_transfer(r, ok=False, reason="KV transfer failed: peer gone")
    assert r.finish_reason == {"type": "abort", "message": "KV transfer failed: peer gone"}
    assert all_pages_back(s)


def test_a_repeated_prefix_is_served_from_the_cache_and_its_pages_are_sent_too():
    s = make(page_size=4, chunk=8)
    first = req("first", range(100, 117))  # 17 tokens
    s.add(first)
    while first.status != ReqStatus.TRANSFERRING:
        step(s)
    s.role.finish_transfer(first, ok=True)
    second = req("second", list(range(100, 116)) + [5, 6, 7])  # shares 4 whole pages
    s.add(second)
    step(s)
    assert second.cached_tokens == 16 and second.status == ReqStatus.TRANSFERRING
    assert second.pages[:4] == [1, 2, 3, 4] and s.role.pages_ready(second) == 5
    s.role.finish_transfer(second, ok=True)
    assert all_pages_back(s)


def test_pages_made_ready_are_never_swapped_while_identical_prompts_prefill_together():
    # both prompts are admitted in one batch; the second's duplicate pages are swapped for the first's
    # copies in the tree after a chunk, but only pages that were not ready (not yet sendable) before
    s = make(page_size=4, chunk=8)
    prompt = list(range(200, 230))
    a, b = req("a", prompt), req("b", prompt)
    s.add(a)
    s.add(b)
    sent: dict[str, list[int]] = {"a": [], "b": []}
    while s.has_compute():
        step(s)
        for r in (a, b):
            n = len(sent[r.rid])
            assert r.pages[:n] == sent[r.rid], f"{r.rid}: a page already sent was replaced"
            sent[r.rid] = r.pages[: s.role.pages_ready(r)]
    assert sent["a"] == a.pages and sent["b"] == b.pages
    for r in (a, b):
        s.role.finish_transfer(r, ok=True)
    assert all_pages_back(s)


def test_abort_at_every_stage_returns_every_page_once():
    s = make(num_pages=40, page_size=4, chunk=4)
    done = req("transferring", range(300, 306))
    s.add(done)
    step(s)
    step(s)
    mid = req("prefilling", range(400, 430))
    s.add(mid)
    step(s)
    queued = req("queued", range(500, 510))
    s.add(queued)
    assert [done.status, mid.status, queued.status] == [
        ReqStatus.TRANSFERRING,
        ReqStatus.PREFILLING,
        ReqStatus.WAITING,
    ]
    for rid in ("transferring", "prefilling", "queued"):
        (aborted,) = s.abort(rid, "stop it")
        assert aborted.finish_reason == {"type": "abort", "message": "stop it"} and aborted.pages == []
        assert s.abort(rid) == []  # a second abort finds nothing: nothing is freed twice
    assert not s.has_work() and all_pages_back(s)
    s.kv.check_invariants()
    assert s.kv.flush() and s.kv.num_free_pages == s.kv.num_total_pages


def test_a_transfer_that_fails_mid_prefill_stops_the_request_where_it_is():
    s = make(page_size=4, chunk=8)
    r = req("a", range(10, 40))
    queued = req("queued", range(50, 60))
    s.add(r)
    step(s)
    s.add(queued)
    assert r.status == ReqStatus.PREFILLING and queued.status == ReqStatus.WAITING
    s.role.finish_transfer(r, ok=False, reason="KV transfer failed: receiver aborted")
    s.role.finish_transfer(queued, ok=False, reason="KV transfer failed: receiver aborted")
    assert r.finish_reason == {"type": "abort", "message": "KV transfer failed: receiver aborted"}
    assert not s.has_work() and all_pages_back(s)
    assert s.kv.num_cached_pages == 2  # the first chunk's whole pages stay cached
    with pytest.raises(ValueError, match="already finished"):
        s.role.finish_transfer(r, ok=False)


def _fill_the_pool(sent: dict[str, int]) -> tuple[Scheduler, Req, Req]:
    """Two chunked prefills that hold every page between them, neither able to take its next chunk."""
    s = make(num_pages=9, page_size=4, chunk=4, sent=sent)
    a, b = req("a", range(1, 21)), req("b", range(30, 50))
    s.add(a)
    s.add(b)
    for _ in range(4):
        assert step(s) is not None
    assert s.kv.num_free_pages == 0 and a.status == b.status == ReqStatus.PREFILLING
    return s, a, b


def test_prefilling_requests_whose_senders_read_their_pages_keep_them_and_the_newest_is_named_stuck():
    # senders read whole pages chunk by chunk: nothing they were handed may be freed here; the
    # engine cancels the stuck request's sender first (tests/e2e/test_disagg_engines.py)
    s, a, b = _fill_the_pool(sent={"a": 2, "b": 2})
    pages = (list(a.pages), list(b.pages))
    assert s.schedule() is None
    assert (a.pages, b.pages) == pages and s.num_retractions == 0
    assert s.role.stuck is b


def test_a_stuck_prefill_whose_sender_has_nothing_yet_gives_its_pages_back_and_starts_over():
    s, a, b = _fill_the_pool(sent={"a": 2})  # b's decode side has not named its pages yet
    batch = step(s)
    assert batch is not None and batch.reqs == [a]  # a goes on with b's pages
    assert b.status == ReqStatus.WAITING and b.pages == [] and b.num_computed == 0
    assert s.num_retractions == 1 and s.role.stuck is None
    for r in (a, b):  # b starts over once a is done (its cached pages, if kept, help)
        while r.status != ReqStatus.TRANSFERRING:
            assert step(s) is not None
        s.role.finish_transfer(r, ok=True)
    assert all_pages_back(s)


def test_stuck_prefills_wait_while_a_transfer_will_give_pages_back():
    s = make(num_pages=9, page_size=4, chunk=4)
    t, a, b = req("t", range(60, 64)), req("a", range(1, 21)), req("b", range(30, 50))
    for r in (t, a, b):
        s.add(r)
        step(s)
    assert t.status == ReqStatus.TRANSFERRING  # holds its page until its sender is final
    while step(s) is not None:
        pass
    assert a.status == b.status == ReqStatus.PREFILLING and s.kv.num_free_pages == 0
    assert s.num_retractions == 0 and s.role.stuck is None
    s.role.finish_transfer(t, ok=True)
    assert step(s) is not None  # the page came back: a prefill goes on
