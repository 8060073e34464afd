"""Overlap scheduling forced on, on the CPU: the engine gives token for token what it gives in order.

Tiny random models (float32). Each workload runs twice on one checkpoint, `overlap_schedule=False`
and `True`, and must agree on every output id, finish reason and logprob; the greedy batch is also
checked against transformers. Workloads: prompts of 1 to 130 tokens with max_new_tokens from 1 up,
chunked prefill, a stop token that ends one request while the others go on, an abort while a step
is in flight, a pool small enough to retract, logprobs and penalties (steps read at once), seeded
sampling and min_new_tokens (they go by the count of generated tokens, in flight ones included),
the context length, n > 1. After each run every page is back and the cache is consistent.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.engine import Engine
from pdserve.shared.protocol import GenerateRequest, RequestOutput
from tests.helpers.hf_reference import hf_greedy
from tests.helpers.tiny_models import make_tiny_model

PROMPT_LENS = (1, 3, 17, 40, 64, 65, 130)
MAX_NEW = (1, 5, 24, 24, 2, 9, 24)


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def model_dir(request, tmp_path_factory) -> str:
    return str(make_tiny_model(request.param, Path(tmp_path_factory.mktemp(request.param))))


def _prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(n)] for n in PROMPT_LENS]


def _engine(model_dir: str, overlap: bool, **overrides) -> Engine:
    args = EngineArgs(model_path=model_dir, device="cpu", dtype="float32", **overrides)
    return Engine(args, overlap_schedule=overlap)


def _check_pages_back(engine: Engine) -> None:
    load = engine.load()
    assert load.num_running == 0 and load.num_waiting == 0
    assert load.num_free_pages + load.num_evictable_pages == load.num_total_pages
    engine.kv.check_invariants()
    assert engine.pipeline.in_flight is None


def _both(model_dir: str, run, expect_overlap: bool = True, **overrides) -> tuple:
    """run(engine) in order and overlapped; returns both results, checks pages and whether decode
    steps were left in flight."""
    results = []
    for overlap in (False, True):
        engine = _engine(model_dir, overlap, **overrides)
        results.append(run(engine))
        _check_pages_back(engine)
        assert (engine.pipeline.num_overlapped_steps > 0) == (overlap and expect_overlap)
    return tuple(results)


def _greedy(max_new: int, **extra) -> dict:
    return {"temperature": 0.0, "max_new_tokens": max_new, **extra}


def test_greedy_batch_equals_in_order_and_transformers(model_dir):
    prompts = _prompts()
    params = [_greedy(m) for m in MAX_NEW]
    in_order, overlapped = _both(model_dir, lambda e: e.generate(prompts, params))
    assert overlapped == in_order
    for out, prompt, m in zip(overlapped, prompts, MAX_NEW):
        assert out["output_ids"] == hf_greedy(model_dir, [prompt], m)[0][0]


def test_chunked_prefill(model_dir):
    prompts = _prompts(1)
    run = lambda e: e.generate(prompts, _greedy(12))
    in_order, overlapped = _both(model_dir, run, chunked_prefill_size=16, disable_radix_cache=True)
    assert overlapped == in_order


def test_logprobs_of_every_request_are_read_each_step(model_dir):
    prompts = _prompts(1)
    run = lambda e: e.generate(prompts, _greedy(12), return_logprob=True, top_logprobs_num=2)
    in_order, overlapped = _both(model_dir, run, expect_overlap=False)
    assert overlapped == in_order


def _stream(engine: Engine, msgs: list[GenerateRequest], abort_rid: str | None = None, abort_after: int = 0):
    """Steps to the end; aborts abort_rid once it has reported abort_after tokens. Returns ids and
    finish reason per rid, and whether the abort found a decode step in flight."""
    for msg in msgs:
        engine.add_request(msg)
    ids: dict[str, list[int]] = {m.rid: [] for m in msgs}
    reasons: dict[str, dict | None] = {}
    hit_in_flight = False

    def take(outs: list[RequestOutput]) -> None:
        for out in outs:
            ids[out.rid].extend(out.token_ids)
            if out.finished:
                reasons[out.rid] = out.finish_reason

    while engine.has_work():
        take(engine.step())
        if abort_rid is not None and abort_rid not in reasons and len(ids[abort_rid]) >= abort_after:
            hit_in_flight = engine.pipeline.in_flight is not None
            take(engine.abort(abort_rid))
            abort_rid = None
    return ids, reasons, hit_in_flight


def _msgs(prompts: list[list[int]], params: list[dict], **extra) -> list[GenerateRequest]:
    return [
        GenerateRequest(rid=f"r{i}", input_ids=p, sampling_params=sp, **extra)
        for i, (p, sp) in enumerate(zip(prompts, params))
    ]


def test_stop_token_ends_one_request_while_the_others_go_on(model_dir):
    prompts = _prompts(2)[:4]
    reference, _, _ = _stream(_engine(model_dir, False), _msgs(prompts, [_greedy(20)] * 4))
    # r1 stops on its 6th token: pick one that does not appear among its first five
    generated = reference["r1"]
    k = next(i for i in range(5, 20) if generated[i] not in generated[:i])
    stop = generated[k]
    params = [_greedy(20), _greedy(20, stop_token_ids=[stop]), _greedy(20), _greedy(20)]

    def run(engine: Engine):
        return _stream(engine, _msgs(prompts, params))[:2]

    in_order, overlapped = _both(model_dir, run)
    assert overlapped == in_order
    ids, reasons = overlapped
    assert ids["r1"] == generated[: k + 1] and reasons["r1"] == {"type": "stop", "matched": stop}
    others = [rid for rid in ids if rid != "r1" and stop not in reference[rid]]
    assert any(len(ids[rid]) == 20 for rid in others)  # they went on past r1's stop


def test_abort_while_a_step_is_in_flight(model_dir):
    prompts = _prompts(3)[:4]
    msgs = lambda: _msgs(prompts, [_greedy(20, ignore_eos=True)] * 4)
    reference, _, _ = _stream(_engine(model_dir, False), msgs())
    engine = _engine(model_dir, True)
    ids, reasons, hit_in_flight = _stream(engine, msgs(), abort_rid="r2", abort_after=4)
    _check_pages_back(engine)
    assert hit_in_flight
    assert reasons["r2"]["type"] == "abort" and 4 <= len(ids["r2"]) < 20
    assert ids["r2"] == reference["r2"][: len(ids["r2"])]
    assert all(ids[rid] == reference[rid] for rid in ("r0", "r1", "r3"))


def test_max_new_tokens_one_among_longer_requests(model_dir):
    prompts = _prompts(4)[:5]
    params = [_greedy(1), _greedy(16), _greedy(1), _greedy(3), _greedy(16)]
    in_order, overlapped = _both(model_dir, lambda e: e.generate(prompts, params))
    assert overlapped == in_order
    assert [len(o["output_ids"]) for o in overlapped][:1] == [1]


def test_retraction_in_a_tiny_pool(model_dir):
    prompts = _prompts(5)
    longest = max(len(p) for p in prompts)
    pool = (longest + 24 + 64) // 16 * 16 + 16

    def run(engine: Engine):
        outs = engine.generate(prompts, _greedy(24, ignore_eos=True))
        assert engine.stats.num_retractions > 0, "the pool was meant to force retraction"
        return outs

    in_order, overlapped = _both(model_dir, run, max_total_tokens=pool)
    assert overlapped == in_order


def test_logprobs_and_penalties_next_to_plain_greedy(model_dir):
    prompts = _prompts(6)[:4]
    # r0 outlives the others: its last steps, alone, are left in flight
    params = [_greedy(16), _greedy(6, repetition_penalty=1.3), _greedy(4), _greedy(8, frequency_penalty=0.5)]

    def run(engine: Engine):
        msgs = _msgs(prompts, params)
        msgs[2].return_logprob, msgs[2].top_logprobs_num = True, 3
        for m in msgs:
            engine.add_request(m)
        outs: list[RequestOutput] = []
        while engine.has_work():
            outs.extend(engine.step())
        return [
            (o.rid, o.token_ids, o.output_token_logprobs, o.output_top_logprobs, o.finished) for o in outs
        ]

    in_order, overlapped = _both(model_dir, run)
    assert sorted(overlapped, key=str) == sorted(in_order, key=str)


def test_seeded_sampling_and_min_new_tokens(model_dir):
    prompts = _prompts(7)[:4]
    reference, _, _ = _stream(_engine(model_dir, False), _msgs(prompts, [_greedy(8)] * 4))
    early = reference["r0"][2]  # a stop token r0 would hit at its third token without min_new_tokens
    params = [
        _greedy(8, stop_token_ids=[early], min_new_tokens=5),
        {"temperature": 0.9, "top_p": 0.9, "max_new_tokens": 8, "sampling_seed": 11},
        {"temperature": 1.0, "top_k": 20, "max_new_tokens": 8, "sampling_seed": 12},
        _greedy(8),
    ]
    in_order, overlapped = _both(model_dir, lambda e: e.generate(prompts, params))
    assert overlapped == in_order
    assert len(overlapped[0]["output_ids"]) >= 5


def test_context_length_and_n_samples(model_dir):
    prompts = [_prompts(8)[3], _prompts(8)[2]]
    params = [_greedy(40, ignore_eos=True), _greedy(6, n=2)]
    in_order, overlapped = _both(model_dir, lambda e: e.generate(prompts, params), context_length=48)
    assert overlapped == in_order
    assert overlapped[0]["meta_info"]["finish_reason"]["type"] == "length"
    assert len(overlapped[0]["output_ids"]) == 48 - len(prompts[0])
