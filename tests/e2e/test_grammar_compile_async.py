"""Grammars compile off the request path (tiny random Llama with a byte-level tokenizer, CPU).

A JSON schema that takes long to compile (an enum of 12,000 strings: about 1 s on the dev box
against the tiny model's 512-token vocabulary, while a decode step takes a few ms) arrives while
free requests decode: they keep producing tokens, step after step, before its compile finishes,
and its output still validates. The samples of one request and requests with the same new grammar
share one compile; a cached grammar is attached at intake; a request aborted while its grammar
compiles ends at once. In a P/D pair, a decode worker whose compile is still running when the
prefill side is ready does not pre-allocate (nor take the first token) before its matcher exists.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jsonschema
import pytest

from pdserve.decode.decode_engine import DecodeEngine
from pdserve.kvtransfer.fake import FakeKVManager, FakeTransferHub
from pdserve.prefill.prefill_engine import PrefillEngine
from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.engine import Engine
from pdserve.shared.protocol import DecodeRequest, GenerateRequest, PrefillRequest
from tests.helpers.pd_pair import PDPair
from tests.helpers.tiny_models import make_tiny_model

pytestmark = pytest.mark.untimed

PROMPT = [ord(c) for c in "Pick one: "]
FREE = {"temperature": 0.0, "max_new_tokens": 300, "ignore_eos": True}


def big_enum(prefix: str, n: int = 12_000) -> dict:
    """A schema whose compile is slow (xgrammar's cost grows fast with the enum) and whose
    outputs are short (one string)."""
    return {"enum": [f"{prefix}{i:05d}-{'abcdefghij'[i % 10] * (3 + i % 5)}" for i in range(n)]}


def _args(model_dir: str) -> EngineArgs:
    return EngineArgs(model_path=model_dir, device="cpu", dtype="float32", max_total_tokens=4096)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(make_tiny_model("llama", Path(tmp_path_factory.mktemp("llama"))))


@pytest.fixture(scope="module")
def engine(model_dir) -> Engine:
    return Engine(_args(model_dir))


def _text(token_ids: list[int], finish: dict) -> str:
    ids = token_ids[:-1] if finish["type"] == "stop" else token_ids  # the stop token the grammar ended on
    return bytes(ids).decode("utf-8")


def _run(engine: Engine) -> dict[str, tuple[list[int], dict]]:
    tokens: dict[str, list[int]] = {}
    finish: dict[str, dict] = {}
    while engine.has_work():
        for out in engine.step():
            tokens.setdefault(f"{out.rid}/{out.index}", []).extend(out.token_ids)
            if out.finished:
                finish[f"{out.rid}/{out.index}"] = out.finish_reason
    return {key: (ids, finish[key]) for key, ids in tokens.items()}


def test_free_requests_step_while_a_big_grammar_compiles(engine):
    schema = big_enum("w")
    for i in range(2):
        engine.add_request(GenerateRequest(rid=f"free{i}", input_ids=PROMPT[i:], sampling_params=FREE))
    tokens: dict[str, list[int]] = {out.rid: list(out.token_ids) for out in engine.step()}  # both prefilled
    params = {"temperature": 1.0, "sampling_seed": 4, "max_new_tokens": 40, "json_schema": json.dumps(schema)}
    started = time.monotonic()
    engine.add_request(GenerateRequest(rid="big", input_ids=PROMPT, sampling_params=params))
    intake_s = time.monotonic() - started
    assert [r.rid for r in engine.scheduler.compiling] == ["big"]
    assert engine.load().num_waiting == 1
    free_tokens_while_compiling = 0
    finish = None
    while engine.has_work():
        outs = engine.step()
        compiling = bool(engine.scheduler.compiling)  # the step's poll found the compile running
        for out in outs:
            tokens.setdefault(out.rid, []).extend(out.token_ids)
            if out.rid.startswith("free") and compiling:
                free_tokens_while_compiling += len(out.token_ids)
            if out.rid == "big" and out.finished:
                finish = out.finish_reason
    compile_s = time.monotonic() - started
    # the intake took no compile; the free requests went on decoding while the compile ran
    assert intake_s < compile_s / 5, (intake_s, compile_s)
    assert free_tokens_while_compiling >= 2 * 5, free_tokens_while_compiling
    assert finish is not None and finish["type"] == "stop", finish
    jsonschema.validate(json.loads(_text(tokens["big"], finish)), schema)
    assert all(len(tokens[f"free{i}"]) == FREE["max_new_tokens"] for i in range(2))


def test_samples_and_simultaneous_requests_share_one_compile(engine):
    schema = big_enum("s", 3000)
    compiles = engine.grammars.num_compiles
    sampled = {"temperature": 1.0, "max_new_tokens": 40}
    engine.add_request(
        GenerateRequest(
            rid="a", input_ids=PROMPT, sampling_params={**sampled, "n": 3, "json_schema": json.dumps(schema)}
        )
    )
    spaced = json.dumps(schema, indent=1)  # the same schema spelled otherwise: the same compile
    engine.add_request(
        GenerateRequest(rid="b", input_ids=PROMPT, sampling_params={**sampled, "json_schema": spaced})
    )
    assert len(engine.scheduler.compiling) == 4 and engine.grammars.num_compiles == compiles + 1
    results = _run(engine)
    assert sorted(results) == ["a/0", "a/1", "a/2", "b/0"]
    for ids, finish in results.values():
        assert finish["type"] == "stop", finish
        jsonschema.validate(json.loads(_text(ids, finish)), schema)
    # cached now: a later request gets its matcher at intake, with no compile and no wait
    engine.add_request(
        GenerateRequest(rid="c", input_ids=PROMPT, sampling_params={**sampled, "json_schema": spaced})
    )
    assert not engine.scheduler.compiling and engine.grammars.num_compiles == compiles + 1
    ((ids, finish),) = _run(engine).values()
    jsonschema.validate(json.loads(_text(ids, finish)), schema)


def test_abort_while_compiling(engine):
    schema = big_enum("x")
    params = {"temperature": 1.0, "max_new_tokens": 40, "json_schema": json.dumps(schema)}
    engine.add_request(GenerateRequest(rid="gone", input_ids=PROMPT, sampling_params={**params, "n": 2}))
    assert len(engine.scheduler.compiling) == 2
    outs = engine.abort("gone", "client left")
    assert sorted(o.index for o in outs) == [0, 1]
    assert all(o.finished and o.finish_reason == {"type": "abort", "message": "client left"} for o in outs)
    assert not engine.has_work() and not engine.scheduler.compiling
    # the same grammar again while that compile still runs: it waits for the same compile
    compiles = engine.grammars.num_compiles
    engine.add_request(GenerateRequest(rid="again", input_ids=PROMPT, sampling_params=params))
    assert engine.grammars.num_compiles == compiles
    ((ids, finish),) = _run(engine).values()
    jsonschema.validate(json.loads(_text(ids, finish)), schema)
    assert engine.kv.num_free_pages + engine.kv.num_evictable_pages == engine.kv.num_total_pages


def test_decode_worker_waits_for_its_matcher(model_dir):
    hub = FakeTransferHub()
    prefill = PrefillEngine(_args(model_dir), lambda pool: FakeKVManager(pool, "prefill-0", hub))
    decode = DecodeEngine(_args(model_dir), lambda pool: FakeKVManager(pool, "decode-0", hub))
    pair = PDPair(prefill, decode)
    try:
        schema = big_enum("d", n=3_000)  # compiled three times here: small enough, still not instant
        params = {
            "temperature": 1.0,
            "sampling_seed": 2,
            "max_new_tokens": 40,
            "json_schema": json.dumps(schema),
        }
        gen = GenerateRequest(rid="pd", input_ids=PROMPT * 3, sampling_params=params)
        prefill.add_prefill(PrefillRequest(gen, decode.kv_manager.endpoint, "decode-0"))
        while not prefill.role.transferring:  # compiled there, prompt computed, first token sampled
            pair.step(decode=False)
        decode.add_remote(DecodeRequest(gen, prefill.kv_manager.endpoint, "prefill-0"))
        (req,) = decode.scheduler.compiling
        while req in decode.scheduler.compiling:
            assert req.grammar is None and req.pages == [] and "pd" not in pair.outputs
            assert not decode.role.prealloc and not decode.role.waiting_for_kv
            pair.step()
        assert req.grammar is not None
        pair.run()
        out = pair.finished("pd")
        assert out is not None and out.finish_reason["type"] == "stop"
        ids = [t for o in pair.outputs["pd"] for t in o.token_ids]
        jsonschema.validate(json.loads(_text(ids, out.finish_reason)), schema)
        # the mixed engine samples the same tokens with the same seed
        (want,) = Engine(_args(model_dir)).generate([PROMPT * 3], params)
        assert ids == want["output_ids"]
        pair.assert_idle()
    finally:
        prefill.kv_manager.close()
        decode.kv_manager.close()
