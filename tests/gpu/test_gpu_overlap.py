"""On a CUDA GPU with decode CUDA graphs: overlap scheduling (the CUDA default) gives token for token
the output of `--disable-overlap-schedule` (constrained requests included), and launching a graph
decode step never waits for the device (which is what lets the host prepare step N+1 while step N
runs)."""

from __future__ import annotations

import gc
import random
from pathlib import Path

import pytest
import torch

from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.engine import Engine
from pdserve.shared.protocol import GenerateRequest, RequestOutput
from tests.helpers.tiny_models import make_tiny_model

pytestmark = pytest.mark.gpu

MAX_BS = 16  # graphs up to 16 requests; the 20-request workload also takes the eager decode path


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.choice((1, 9, 40, 130)))] for _ in range(n)]


def _engine(model_dir: str, overlap: bool, **overrides) -> Engine:
    args = EngineArgs(
        model_path=model_dir,
        device="cuda",
        dtype="float32",
        cuda_graph_max_bs=MAX_BS,
        disable_overlap_schedule=not overlap,
        **{"max_total_tokens": 16384, **overrides},
    )
    return Engine(args)


def _run(model_dir: str, overlap: bool, msgs: list[GenerateRequest], **overrides):
    engine = _engine(model_dir, overlap, **overrides)
    try:
        assert engine.runner.graphs is not None
        assert engine.pipeline.overlap == overlap  # on by default on CUDA
        for m in msgs:
            engine.add_request(m)
        outs: list[RequestOutput] = []
        while engine.has_work():
            outs.extend(engine.step())
        load = engine.load()
        assert load.num_free_pages + load.num_evictable_pages == load.num_total_pages
        engine.kv.check_invariants()
        merged: dict[str, list] = {}
        for o in outs:
            entry = merged.setdefault(o.rid, [[], None, []])
            entry[0].extend(o.token_ids)
            entry[2].extend(o.output_token_logprobs or [])
            if o.finished:
                entry[1] = o.finish_reason
        return merged, engine.pipeline.num_overlapped_steps, engine.stats.num_retractions
    finally:
        del engine
        gc.collect()
        torch.cuda.empty_cache()


def _msgs(prompts, params, logprob_rids=()) -> list[GenerateRequest]:
    return [
        GenerateRequest(rid=f"r{i}", input_ids=p, sampling_params=sp, return_logprob=f"r{i}" in logprob_rids)
        for i, (p, sp) in enumerate(zip(prompts, params))
    ]


def _greedy(n: int, **extra) -> dict:
    return {"temperature": 0.0, "max_new_tokens": n, **extra}


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
@pytest.mark.parametrize("num_requests", [1, 3, 11, 20])
def test_overlap_equals_in_order_with_cuda_graphs(kind: str, num_requests: int, tmp_path: Path):
    torch.backends.cuda.matmul.allow_tf32 = False
    model_dir = str(make_tiny_model(kind, tmp_path))
    prompts = _prompts(num_requests, seed=num_requests)
    # lengths 1..40 so requests leave the batch at different steps (buckets shrink, rows drop)
    params = [_greedy(random.Random(i).choice((1, 2, 7, 24, 40))) for i in range(num_requests)]
    msgs = lambda: _msgs(prompts, params)
    ref, ref_overlapped, _ = _run(model_dir, False, msgs())
    got, overlapped, _ = _run(model_dir, True, msgs())
    assert ref_overlapped == 0 and overlapped > 0
    assert got == ref


def test_stop_token_logprobs_penalties_and_retraction(tmp_path: Path):
    torch.backends.cuda.matmul.allow_tf32 = False
    model_dir = str(make_tiny_model("llama", tmp_path))
    prompts = _prompts(8, seed=5)
    plain, _, _ = _run(model_dir, False, _msgs(prompts, [_greedy(30)] * 8))
    stop = plain["r1"][0][6]  # r1 stops at (or before) its 7th token while the others go on
    params = [_greedy(30)] * 8
    params[1] = _greedy(30, stop_token_ids=[stop])
    params[2] = _greedy(12, repetition_penalty=1.2)
    params[3] = _greedy(30, min_new_tokens=4, stop_token_ids=[plain["r3"][0][1]])
    # a pool that holds the longest request and little more: the others are retracted
    tiny_pool = (max(len(p) for p in prompts) + 30 + 64) // 16 * 16 + 16
    for overrides in ({}, {"max_total_tokens": tiny_pool}):
        # a step holding a logprob request is read at once, by design (its logits would be
        # overwritten): with r4 asking for logprobs no step overlaps, without it the steps after the
        # penalty request's 12 tokens do
        for logprob_rids in ((), ("r4",)):
            msgs = lambda rids=logprob_rids: _msgs(prompts, params, logprob_rids=rids)
            ref, _, ref_retractions = _run(model_dir, False, msgs(), **overrides)
            got, overlapped, retractions = _run(model_dir, True, msgs(), **overrides)
            if not logprob_rids:
                assert overlapped > 0
            if overrides:
                assert ref_retractions > 0 and retractions > 0, "the pool was meant to force retraction"
            assert got == ref, (overrides, logprob_rids)
            assert got["r1"][1]["type"] == "stop"


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 0.0},
        # what most clients send, and what uploads per-row parameters at every step: temperature,
        # top-k/p, min-p, a logit bias, min_new_tokens (a stop mask), a seed on some rows
        {
            "temperature": 0.8,
            "top_k": 20,
            "top_p": 0.9,
            "min_p": 0.05,
            "min_new_tokens": 3,
            "logit_bias": {"7": -1.5},
        },
        # a constrained step's forward is launched before the host reads the step before: no wait
        {"temperature": 0.0, "regex": "[a-z]{30}"},
    ],
    ids=["greedy", "sampled", "constrained"],
)
def test_graph_decode_launch_never_waits_for_the_device(tmp_path: Path, params: dict):
    """Every launch of a graph decode step runs under torch's sync debug mode 'error': a blocking
    copy, .item() or stream sync inside it would raise."""
    model_dir = str(make_tiny_model("llama", tmp_path))
    engine = _engine(model_dir, True)
    runner = engine.runner
    forward, sampling = runner.launch_forward, runner.launch_sampling
    checked = []

    def without_sync(call, *args):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return call(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    def forward_without_sync(batch, futures=None):
        checked.append(futures is not None)
        return without_sync(forward, batch, futures)

    def sampling_without_sync(fwd):
        # a constrained step's sampling follows the read of the step before, by design
        constrained = any(r.grammar is not None for r in fwd.batch.reqs)
        return sampling(fwd) if constrained else without_sync(sampling, fwd)

    runner.launch_forward = forward_without_sync  # type: ignore[method-assign]
    runner.launch_sampling = sampling_without_sync  # type: ignore[method-assign]
    rows = [{**params, "max_new_tokens": 20, "ignore_eos": True}] * 6
    if params["temperature"] > 0:
        rows[1] = {**rows[1], "sampling_seed": 11}
    try:
        for i, (prompt, row) in enumerate(zip(_prompts(6, seed=9), rows)):
            engine.add_request(GenerateRequest(rid=f"r{i}", input_ids=prompt, sampling_params=row))
        counts: dict[str, int] = {}
        while engine.has_work():
            for o in engine.step():
                counts[o.rid] = counts.get(o.rid, 0) + len(o.token_ids)
    finally:
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    assert counts == {f"r{i}": 20 for i in range(6)}
    assert sum(checked) > 10  # launches whose inputs came from the step still in flight


def test_constrained_requests_overlap_and_equal_in_order(tmp_path: Path):
    """Constrained and free requests in one batch with CUDA graphs: token for token the in-order
    run, with constrained steps left in flight (their sampling waits for the previous tokens, their
    forward does not)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model_dir = str(make_tiny_model("llama", tmp_path))
    prompt = [ord(c) for c in "Answer in JSON: "]
    schema = '{"type":"object","properties":{"n":{"type":"integer"}},"required":["n"]}'
    params = [
        _greedy(60, json_schema=schema),
        {"temperature": 1.0, "max_new_tokens": 60, "sampling_seed": 4, "json_schema": schema},
        {"temperature": 1.0, "max_new_tokens": 30, "sampling_seed": 2, "regex": "(yes|no)!"},
        _greedy(24, ignore_eos=True),
        {"temperature": 0.8, "top_k": 30, "max_new_tokens": 24, "sampling_seed": 9, "ignore_eos": True},
    ]
    msgs = lambda: _msgs([prompt[i:] for i in range(len(params))], params)
    ref, ref_overlapped, _ = _run(model_dir, False, msgs())
    got, overlapped, _ = _run(model_dir, True, msgs())
    assert ref_overlapped == 0 and overlapped > 10
    assert got == ref
    assert got["r2"][1]["type"] == "stop" and len(got["r2"][0]) < 24  # ended mid-batch
