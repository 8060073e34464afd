"""The scheduler over a real KVCacheManager, with the model's sampled tokens supplied by the test.

No torch: the scheduler decides which tokens are computed and where they live; these tests check
chunk sizes, admission limits, retraction, n>1 prompt sharing and that every page comes back.
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.shared.engine.kv_cache_manager import KVCacheManager
from pdserve.shared.engine.request import Req, ReqStatus
from pdserve.shared.engine.sampling_params import SamplingParams
from pdserve.shared.engine.scheduled_batch import BatchKind
from pdserve.shared.engine.scheduler import Scheduler, SchedulerConfig

EOS = 0


def make(
    num_pages=64, page_size=4, chunk=-1, max_prefill=1 << 20, max_running=256, radix=True, policy="fcfs"
):
    kv = KVCacheManager(num_pages, page_size, enable_radix=radix)
    cfg = SchedulerConfig(
        page_size=page_size,
        max_running_requests=max_running,
        max_prefill_tokens=max_prefill,
        chunked_prefill_size=chunk,
        schedule_policy=policy,
    )
    return Scheduler(cfg, kv)


def req(rid, prompt, max_new=4, **kw) -> Req:
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new, **kw)
    return Req(rid=rid, input_ids=list(prompt), params=params, eos_token_ids=frozenset({EOS}))


def next_token(r: Req) -> int:
    """A deterministic stand-in for the model's choice: never EOS, depends on the sequence so far."""
    return 1 + (sum(r.fill_ids) * 31 + len(r.fill_ids)) % 97


def step(s: Scheduler):
    batch = s.schedule()
    if batch is None:
        return None
    tokens = [next_token(r) if batch.samples(i) else None for i, r in enumerate(batch.reqs)]
    s.on_batch_done(batch, tokens)
    held = [p for r in s.all_requests() for p in r.pages[s.kv.num_tree_pages(r.prefix_node) :]]
    s.kv.check_invariants(held_outside=held)
    return batch


def drain(s: Scheduler, limit=10_000):
    batches = []
    while s.has_work():
        batches.append(step(s))
        assert len(batches) < limit, "scheduler made no progress"
    return batches


def all_pages_back(s: Scheduler) -> bool:
    return s.kv.num_free_pages + s.kv.num_evictable_pages == s.kv.num_total_pages


def test_chunked_prefill_splits_the_prompt_then_decodes():
    s = make(chunk=8)
    r = req("a", range(10, 30), max_new=3)
    s.add(r)
    batches = drain(s)
    kinds = [(b.kind, b.extend_lens) for b in batches]
    assert kinds == [
        (BatchKind.EXTEND, [8]),
        (BatchKind.EXTEND, [8]),
        (BatchKind.EXTEND, [4]),  # samples token 1
        (BatchKind.DECODE, [1]),
        (BatchKind.DECODE, [1]),
    ]
    assert r.finish_reason == {"type": "length", "length": 3}
    assert len(r.output_ids) == 3
    assert all_pages_back(s)


def test_exact_pages_of_a_request_and_its_cached_prefix():
    s = make(num_pages=32, page_size=4)
    a = req("a", range(100, 110), max_new=2)  # 10 tokens: pages 1,2,3 (last one partial)
    s.add(a)
    b1 = step(s)
    assert b1.kind == BatchKind.EXTEND and a.pages == [1, 2, 3]
    drain(s)
    # the prompt's two whole pages (8 tokens) are cached; a request sharing them hits
    b = req("b", list(range(100, 108)) + [7, 7, 7], max_new=2)
    s.add(b)
    step(s)
    assert b.cached_tokens == 8
    assert b.pages[:2] == [1, 2]
    drain(s)
    assert all_pages_back(s)


def test_max_running_requests_limits_admission():
    s = make(max_running=2)
    reqs = [req(f"r{i}", [5 + i] * 6, max_new=5) for i in range(4)]
    for r in reqs:
        s.add(r)
    first = step(s)
    assert [r.rid for r in first.reqs] == ["r0", "r1"]
    assert s.num_waiting == 2
    drain(s)
    assert all(r.finish_reason["type"] == "length" for r in reqs)


def test_max_prefill_tokens_budget_splits_admission_across_steps():
    s = make(max_prefill=10)
    for i in range(3):
        s.add(req(f"r{i}", [9] * 6, max_new=1))
    b = step(s)
    assert b.extend_lens == [6, 4]  # the second request gets the rest of the budget as a chunk


def test_retraction_when_decode_runs_out_of_pages_and_everyone_finishes():
    # 12 usable pages of 4 tokens; four requests of 8 prompt tokens growing to 20 tokens each cannot all fit
    s = make(num_pages=13, page_size=4)
    reqs = [req(f"r{i}", [20 + i] * 8, max_new=12) for i in range(4)]
    for r in reqs:
        s.add(r)
    drain(s)
    assert s.num_retractions > 0
    for r in reqs:
        assert r.finish_reason == {"type": "length", "length": 12}
        assert len(r.output_ids) == 12
    assert all_pages_back(s)


def test_retraction_does_not_change_the_tokens():
    def outputs(num_pages):
        s = make(num_pages=num_pages, page_size=4)
        rs = [req(f"r{i}", [30 + i] * (5 + i), max_new=10) for i in range(4)]
        for r in rs:
            s.add(r)
        drain(s)
        return s.num_retractions, [r.output_ids for r in rs]

    roomy_retractions, roomy = outputs(200)
    tight_retractions, tight = outputs(14)
    assert roomy_retractions == 0 and tight_retractions > 0
    assert roomy == tight


def test_stop_on_eos_and_stop_token_ids_respects_min_new_tokens():
    s = make()
    r = req("a", [3, 4, 5], max_new=10, stop_token_ids=[42], min_new_tokens=2)
    s.add(r)
    step(s)  # prefill samples a token (the test overrides what the "model" picked below)
    assert r.output_ids
    batch = s.schedule()
    s.on_batch_done(batch, [42])  # second token: stop id, min_new_tokens reached
    assert r.finish_reason == {"type": "stop", "matched": 42}


def test_abort_in_every_state_returns_every_page():
    s = make(num_pages=40, page_size=4, chunk=4)
    long_prompt = req("prefilling", range(200, 230), max_new=5)
    running = req("running", range(300, 306), max_new=50)
    s.add(running)
    step(s)
    step(s)
    s.add(long_prompt)
    step(s)
    waiting = req("waiting", range(400, 410), max_new=5)
    s.add(waiting)
    assert running.status == ReqStatus.RUNNING
    assert long_prompt.status == ReqStatus.PREFILLING
    assert waiting.status == ReqStatus.WAITING
    for rid in ("prefilling", "running", "waiting"):
        (aborted,) = s.abort(rid, "stop it")
        assert aborted.finish_reason == {"type": "abort", "message": "stop it"}
        assert aborted.pages == []
    assert not s.has_work()
    assert all_pages_back(s)
    assert s.kv.flush()
    assert s.kv.num_free_pages == s.kv.num_total_pages


def test_n_samples_share_the_prompt_pages():
    s = make(num_pages=64, page_size=4)
    lead = req("n", range(500, 514), max_new=3)  # 14 tokens: 3 whole pages
    follower = req("n", range(500, 514), max_new=3)
    follower.index, follower.share_prompt_with = 1, lead
    s.add(lead)
    s.add(follower)
    first = step(s)
    assert first.reqs == [lead]  # the follower waits for the lead's prompt
    second = step(s)
    assert follower in second.reqs
    assert follower.cached_tokens == 12
    assert follower.pages[:3] == lead.pages[:3]
    drain(s)
    assert all_pages_back(s)


def test_lpm_prefers_the_longest_cached_prefix():
    s = make(policy="lpm", max_running=1)
    warm = req("warm", range(600, 620), max_new=1)
    s.add(warm)
    drain(s)
    cold = req("cold", range(700, 720), max_new=1)
    hot = req("hot", list(range(600, 616)) + [1, 2, 3], max_new=1)
    s.add(cold)
    s.add(hot)
    assert step(s).reqs == [hot]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), page_size=st.sampled_from([1, 4, 16]), radix=st.booleans())
def test_random_storm_of_add_abort_and_steps_returns_every_page(seed, page_size, radix):
    rng = random.Random(seed)
    num_pages = rng.randrange(8, 40)
    s = make(num_pages=num_pages, page_size=page_size, chunk=rng.choice([-1, 16, 32]), radix=radix)
    capacity = (num_pages - 1) * page_size
    live: list[Req] = []
    for i in range(rng.randrange(5, 30)):
        action = rng.random()
        if action < 0.4:
            prompt = [rng.randrange(1, 5) for _ in range(rng.randrange(1, max(2, capacity // 3)))]
            r = req(f"r{i}", prompt, max_new=rng.randrange(1, 8))
            s.add(r)
            live.append(r)
        elif action < 0.55 and live:
            victim = rng.choice(live)
            s.abort(victim.rid)
        else:
            for _ in range(rng.randrange(1, 6)):
                step(s)
    drain(s)
    assert all(r.is_finished for r in live)
    assert all_pages_back(s)
    assert s.kv.flush()
    assert s.kv.num_free_pages == s.kv.num_total_pages


def test_a_lone_request_that_outgrows_the_pool_is_stopped_and_reported():
    s = make(num_pages=4, page_size=4)  # 12 usable tokens
    r = req("big", range(1, 9), max_new=50)
    s.add(r)
    drain(s)
    assert r.finish_reason == {"type": "abort", "message": "KV cache pool exhausted by one request"}
    assert len(r.output_ids) == 12 - 8 + 1  # every slot used, plus the token sampled last
    assert s.take_stopped() == [r]
    assert all_pages_back(s)


def test_a_half_prefilled_request_is_retracted_before_a_running_one_starves():
    s = make(num_pages=7, page_size=4)  # 24 usable tokens
    runner = req("runner", range(1, 5), max_new=12)  # grows to 16 tokens
    s.add(runner)
    step(s)
    step(s)
    hog = req("hog", range(50, 70), max_new=2)  # 20 tokens: only part of it fits beside the runner
    s.add(hog)
    b = step(s)
    assert b.kind == BatchKind.EXTEND and hog.status == ReqStatus.PREFILLING
    drain(s)
    assert runner.finish_reason == {"type": "length", "length": 12}
    assert hog.finish_reason == {"type": "length", "length": 2}
    assert hog.num_retractions > 0 and runner.num_retractions == 0
    assert all_pages_back(s)


def test_chunked_prefills_that_fill_the_pool_between_them_do_not_stall():
    # 8 usable pages: two 20-token prompts in 4-token chunks hold 4 pages each after 4 steps, and
    # neither can take its next chunk; nothing decodes, so no page would come back by itself
    s = make(num_pages=9, page_size=4, chunk=4)
    a, b = req("a", range(1, 21), max_new=3), req("b", range(30, 50), max_new=3)
    s.add(a)
    s.add(b)
    drain(s, limit=100)
    assert a.finish_reason == b.finish_reason == {"type": "length", "length": 3}
    assert b.num_retractions > 0 and a.num_retractions == 0  # the newer one gave its pages back
    assert all_pages_back(s)
