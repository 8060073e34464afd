"""Constrained requests with overlap scheduling forced on, on the CPU: token for token the in-order run.

A tiny random Llama (float32, byte-level tokenizer) and real xgrammar matchers. Each workload runs
with `overlap_schedule=False` and `True` on one checkpoint and must agree on every output id and
finish reason: constrained and free requests in one batch, greedy and seeded sampling, n > 1,
grammars that end mid-batch while others go on, an abort while a constrained step is in flight,
jump-forward (whose constrained steps keep the read-back). The order is checked too: with overlap
on, a constrained decode step's forward is launched before the previous step's tokens are read,
and its sampling after. After each run every page is back.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.engine import Engine
from pdserve.shared.protocol import GenerateRequest, RequestOutput
from tests.helpers.tiny_models import make_tiny_model

PROMPT = [ord(c) for c in "Answer in JSON: "]
SCHEMA = json.dumps(
    {
        "type": "object",
        "properties": {"name": {"type": "string", "pattern": "^[a-z]{1,6}$"}, "n": {"type": "integer"}},
        "required": ["name", "n"],
    }
)
SHORT_REGEX = r"(yes|no)!"  # ends after a few tokens while the others go on
LONG_REGEX = r"[0-9]{3}-[a-z]{2,8}-[0-9]{4}"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(make_tiny_model("llama", Path(tmp_path_factory.mktemp("llama"))))


def _engine(model_dir: str, overlap: bool, **overrides) -> Engine:
    args = EngineArgs(model_path=model_dir, device="cpu", dtype="float32", **overrides)
    return Engine(args, overlap_schedule=overlap)


def _check_pages_back(engine: Engine) -> None:
    load = engine.load()
    assert load.num_running == 0 and load.num_waiting == 0 and engine.pipeline.in_flight is None
    assert load.num_free_pages + load.num_evictable_pages == load.num_total_pages
    engine.kv.check_invariants()


def _stream(engine: Engine, msgs: list[GenerateRequest], abort: tuple[str, int] | None = None):
    """Steps to the end (aborting abort[0] once it reported abort[1] tokens); ids and finish reason
    per (rid, index), and whether the abort found a constrained step in flight."""
    for msg in msgs:
        engine.add_request(msg)
    ids: dict[tuple[str, int], list[int]] = {}
    reasons: dict[tuple[str, int], dict | None] = {}
    hit_constrained = False

    def take(outs: list[RequestOutput]) -> None:
        for out in outs:
            ids.setdefault((out.rid, out.index), []).extend(out.token_ids)
            if out.finished:
                reasons[out.rid, out.index] = out.finish_reason

    while engine.has_work():
        take(engine.step())
        if abort is not None and len(ids.get((abort[0], 0), [])) >= abort[1]:
            in_flight = engine.pipeline.in_flight
            hit_constrained = in_flight is not None and any(r.grammar for r in in_flight.batch.reqs)
            take(engine.abort(abort[0]))
            abort = None
    _check_pages_back(engine)
    return ids, reasons, hit_constrained


def _msgs(params: list[dict]) -> list[GenerateRequest]:
    return [
        GenerateRequest(rid=f"r{i}", input_ids=PROMPT[i % 4 :], sampling_params=sp)
        for i, sp in enumerate(params)
    ]


MIXED = [
    {"temperature": 0.0, "max_new_tokens": 60, "json_schema": SCHEMA},
    {"temperature": 1.0, "max_new_tokens": 60, "sampling_seed": 4, "json_schema": SCHEMA},
    {"temperature": 0.0, "max_new_tokens": 24, "ignore_eos": True},
    {"temperature": 0.8, "top_k": 30, "max_new_tokens": 24, "sampling_seed": 9, "ignore_eos": True},
    {"temperature": 1.0, "max_new_tokens": 30, "sampling_seed": 2, "regex": SHORT_REGEX},
    {"temperature": 1.0, "max_new_tokens": 40, "sampling_seed": 3, "regex": LONG_REGEX, "n": 2},
]


def _logged(engine: Engine) -> list[tuple[str, int, bool]]:
    """Records (what, batch id, constrained) for each forward, sampling and read of a decode step."""
    runner, events = engine.runner, []
    forward, sampling, collect = runner.launch_forward, runner.launch_sampling, runner.collect

    def note(what: str, batch) -> None:
        events.append((what, id(batch), any(r.grammar is not None for r in batch.reqs)))

    def logged_forward(batch, futures=None):
        note("forward", batch)
        return forward(batch, futures)

    def logged_sampling(fwd):
        note("sample", fwd.batch)
        return sampling(fwd)

    def logged_collect(launched):
        note("collect", launched.batch)
        return collect(launched)

    runner.launch_forward = logged_forward  # type: ignore[method-assign]
    runner.launch_sampling = logged_sampling  # type: ignore[method-assign]
    runner.collect = logged_collect  # type: ignore[method-assign]
    return events


def _constrained_forwards_before_the_read(events: list[tuple[str, int, bool]]) -> int:
    """Constrained steps launched (forward) while the step before was unread, sampled after its read."""
    return sum(
        1
        for i, (what, batch, constrained) in enumerate(events[:-2])
        if what == "forward"
        and constrained
        and events[i + 1][0] == "collect"
        and events[i + 2] == ("sample", batch, True)
    )


def test_mixed_batch_equals_in_order_and_launches_before_reading(model_dir):
    runs = []
    for overlap in (False, True):
        engine = _engine(model_dir, overlap)
        events = _logged(engine)
        ids, reasons, _ = _stream(engine, _msgs(MIXED))
        runs.append((ids, reasons))
        launched_early = _constrained_forwards_before_the_read(events)
        assert (launched_early > 10) == overlap, launched_early
        assert (engine.pipeline.num_overlapped_steps > 0) == overlap
    assert runs[1] == runs[0]
    ids, reasons = runs[1]
    for key in ((f"r{i}", 0) for i in (0, 1, 4)):
        assert reasons[key]["type"] == "stop", (key, reasons[key])  # the grammar ended the request
    assert len(ids["r4", 0]) < min(len(ids["r2", 0]), len(ids["r3", 0])) == 24  # r4 ended mid-batch
    assert reasons["r5", 0] and reasons["r5", 1] and ids["r5", 0] != ids["r5", 1]


def test_abort_while_a_constrained_step_is_in_flight(model_dir):
    params = MIXED[:4]
    reference, ref_reasons, _ = _stream(_engine(model_dir, False), _msgs(params))
    ids, reasons, hit = _stream(_engine(model_dir, True), _msgs(params), abort=("r1", 4))
    assert hit
    assert reasons["r1", 0]["type"] == "abort" and 4 <= len(ids["r1", 0]) < len(reference["r1", 0])
    assert ids["r1", 0] == reference["r1", 0][: len(ids["r1", 0])]
    for key in (("r0", 0), ("r2", 0), ("r3", 0)):
        assert (ids[key], reasons[key]) == (reference[key], ref_reasons[key])


def test_jump_forward_keeps_the_read_back_and_the_tokens(model_dir):
    params = [MIXED[0], MIXED[2], MIXED[4]]
    runs = []
    for overlap in (False, True):
        engine = _engine(model_dir, overlap, enable_jump_forward=True)
        events = _logged(engine)
        runs.append(_stream(engine, _msgs(params))[:2])
        assert _constrained_forwards_before_the_read(events) == 0
        assert engine.stats.jump_forward_tokens > 0
    assert runs[1] == runs[0]
