"""The decode role's scheduler over a real KVCacheManager, no torch: exact pre-allocated pages, the
output reserve that keeps pre-allocation from starving running requests, the arrival of KV (with a
first token that may already stop the request), and pages freed exactly once, uncached, when a
transfer fails or a request waiting for KV is aborted."""

from __future__ import annotations

from pdserve.decode.decode_role import DecodeRole
from pdserve.shared.engine.kv_cache_manager import KVCacheManager
from pdserve.shared.engine.request import Req, ReqStatus
from pdserve.shared.engine.sampling_params import SamplingParams
from pdserve.shared.engine.scheduled_batch import BatchKind
from pdserve.shared.engine.scheduler import Scheduler, SchedulerConfig

EOS = 0


def make(num_pages=64, page_size=4, reserve=8, max_running=256) -> Scheduler:
    kv = KVCacheManager(num_pages, page_size)
    cfg = SchedulerConfig(
        page_size=page_size,
        max_running_requests=max_running,
        max_prefill_tokens=1 << 20,
        chunked_prefill_size=-1,
    )
    return Scheduler(cfg, kv, DecodeRole(num_reserved_decode_tokens=reserve))


def req(rid, prompt, max_new=4, **kw) -> Req:
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new, **kw)
    return Req(rid=rid, input_ids=list(prompt), params=params, eos_token_ids=frozenset({EOS}))


def arrive(s: Scheduler, r: Req, first_token: int) -> bool:
    """What the engine does on Success (handoff.apply_first_output, then kv_received)."""
    r.output_ids = [first_token]
    r.input_logprobs_done = True
    return s.role.kv_received(r)


def step(s: Scheduler, token: int = 9):
    batch = s.schedule()
    if batch is None:
        return None
    s.on_batch_done(batch, [token if batch.samples(i) else None for i in range(len(batch.reqs))])
    held = [p for r in s.all_requests() for p in r.pages[s.kv.num_tree_pages(r.prefix_node) :]]
    s.kv.check_invariants(held_outside=held)
    return batch


def all_pages_back(s: Scheduler) -> bool:
    return s.kv.num_free_pages + s.kv.num_evictable_pages == s.kv.num_total_pages


def test_preallocates_the_prompt_pages_then_decodes_after_the_kv_arrives():
    s = make(page_size=4)
    r = req("a", range(10, 20), max_new=3)  # 10 tokens: 3 pages
    s.role.add_remote(r)
    assert s.num_waiting == 1 and s.schedule() is None
    assert s.role.preallocate() == [r]
    assert r.status == ReqStatus.WAITING_FOR_KV and r.pages == [1, 2, 3]
    assert s.num_running == 1 and s.num_waiting == 0 and s.has_work() and not s.has_compute()
    assert s.schedule() is None  # nothing to compute while the KV is on its way
    assert arrive(s, r, 5) is False
    assert r.status == ReqStatus.RUNNING and r.num_computed == 10
    batch = step(s)
    assert batch.kind == BatchKind.DECODE and batch.prefix_lens == [
        10
    ]  # the first token's KV is computed here
    step(s)
    assert r.finish_reason == {"type": "length", "length": 3} and r.output_ids == [5, 9, 9]
    assert s.kv.num_cached_pages == 3  # prompt + outputs (12 tokens): its whole pages are cached
    assert all_pages_back(s)


def test_a_first_token_that_stops_finishes_at_arrival():
    s = make()
    for rid, max_new, token, reason in (
        ("eos", 8, EOS, {"type": "stop", "matched": EOS}),
        ("one", 1, 4, {"type": "length", "length": 1}),
        ("stop-id", 8, 6, {"type": "stop", "matched": 6}),
    ):
        r = req(rid, range(30, 37), max_new=max_new, stop_token_ids=[6])
        s.role.add_remote(r)
        s.role.preallocate()
        assert arrive(s, r, token) is True
        assert r.finish_reason == reason and r.pages == []
    assert not s.has_work() and all_pages_back(s)


def test_the_reserve_keeps_preallocation_from_starving_running_requests():
    # 15 usable pages of 4 tokens; reserve 8 tokens = 2 pages per request
    s = make(num_pages=16, page_size=4, reserve=8)
    a = req("a", range(100, 112), max_new=20)  # 3 prompt pages + 2 reserved
    s.role.add_remote(a)
    assert s.role.preallocate() == [a]
    arrive(s, a, 5)
    b, c = req("b", range(200, 216), max_new=20), req("c", range(300, 316), max_new=20)  # 4 + 2 each
    s.role.add_remote(b)
    s.role.add_remote(c)
    # 12 available, a keeps 2 for its reserve: b's 6 fit; then 8 available, a and b keep 2 each: c's 6 do not
    assert s.role.preallocate() == [b]
    assert [x.rid for x in s.role.prealloc] == ["c"]
    assert s.kv.available_pages == 8 and s.role.admission_headroom() == 4
    # a local prompt leaves the same reserves: 4 spare pages hold 16 of its 24 tokens this step
    local = req("local", range(400, 424), max_new=2)
    s.add(local)
    batch = s.schedule()
    assert batch.kind == BatchKind.EXTEND and batch.reqs == [local] and batch.extend_lens == [16]


def test_a_lone_request_gets_its_prompt_pages_even_without_room_for_the_reserve():
    s = make(num_pages=8, page_size=4, reserve=512)
    r = req("big", range(1, 27), max_new=100)  # 7 pages: the whole pool
    s.role.add_remote(r)
    assert s.role.preallocate() == [r] and len(r.pages) == 7
    second = req("next", range(50, 53))
    s.role.add_remote(second)
    assert s.role.preallocate() == []  # no longer alone
    s.role.kv_failed(r, "KV transfer failed: peer gone")
    assert s.role.preallocate() == [second]


def test_max_running_requests_bounds_preallocation():
    s = make(max_running=2)
    reqs = [req(f"r{i}", range(10 * i, 10 * i + 5)) for i in range(3)]
    for r in reqs:
        s.role.add_remote(r)
    assert s.role.preallocate() == reqs[:2]
    assert s.num_running == 2 and s.num_waiting == 1


def test_a_failed_transfer_frees_the_pages_uncached():
    s = make()
    r = req("a", range(10, 30))
    s.role.add_remote(r)
    s.role.preallocate()
    s.role.kv_failed(r, "KV transfer failed: prefill worker died")
    assert r.finish_reason == {"type": "abort", "message": "KV transfer failed: prefill worker died"}
    assert r.pages == [] and s.kv.num_cached_pages == 0
    assert s.kv.num_free_pages == s.kv.num_total_pages and not s.has_work()


def test_abort_at_every_stage_returns_every_page_once():
    s = make(num_pages=64, page_size=4)
    decoding, waiting_kv, queued = req("decoding", range(5, 15), 50), req("kv", range(20, 30)), None
    s.role.add_remote(decoding)
    s.role.add_remote(waiting_kv)
    s.role.preallocate()
    arrive(s, decoding, 3)
    step(s)
    queued = req("queued", range(40, 50))
    s.role.add_remote(queued)
    local = req("local", range(60, 70), 50)
    s.add(local)
    assert [r.status for r in (decoding, waiting_kv, queued, local)] == [
        ReqStatus.RUNNING,
        ReqStatus.WAITING_FOR_KV,
        ReqStatus.WAITING,
        ReqStatus.WAITING,
    ]
    for rid in ("queued", "kv", "decoding", "local"):
        (aborted,) = s.abort(rid, "stop it")
        assert aborted.finish_reason == {"type": "abort", "message": "stop it"} and aborted.pages == []
        assert s.abort(rid) == []
    assert not s.has_work() and all_pages_back(s)
    s.kv.check_invariants()
    assert s.kv.num_cached_pages == 2  # only the decoded request's computed whole pages were cached
