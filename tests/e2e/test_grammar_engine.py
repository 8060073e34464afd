"""Constrained decoding in the engine (tiny random Llama with a byte-level tokenizer, CPU): sampled
outputs under JSON schemas and regexes always parse and validate; free requests in the same batch
are token-identical to a run without constrained ones; n > 1; a moved request's matcher resumes;
an uncompilable grammar ends the request with xgrammar's reason."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.engine import Engine
from pdserve.shared.engine.request_validation import RequestError
from pdserve.shared.protocol import GenerateRequest
from tests.helpers.tiny_models import make_tiny_model

pytestmark = pytest.mark.untimed

SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "pattern": "^[a-z]{1,6}$"},
            "age": {"type": "integer", "minimum": 0, "maximum": 99},
            "address": {
                "type": "object",
                "properties": {"zip": {"type": "string", "pattern": "^[0-9]{3}$"}},
                "required": ["zip"],
            },
        },
        "required": ["name", "age", "address"],
    },
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 3},
    {
        "anyOf": [
            {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
            {"enum": ["none"]},
        ]
    },
]
REGEXES = [r"[0-9]{3}-[a-z]{2,4}", r"(yes|no|maybe)!", r"\(\d\d\) [A-Z][a-z]+"]
PROMPT = [ord(c) for c in "Answer in JSON: "]


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    model_dir = make_tiny_model("llama", Path(tmp_path_factory.mktemp("llama")))
    return Engine(EngineArgs(model_path=str(model_dir), device="cpu", dtype="float32"))


def _text(out: dict) -> str:
    ids = out["output_ids"]
    if out["meta_info"]["finish_reason"]["type"] == "stop":
        ids = ids[:-1]  # the stop token the grammar ended on
    return bytes(ids).decode("utf-8")


@pytest.mark.parametrize("schema", SCHEMAS, ids=["nested", "enum", "array", "anyof"])
def test_sampled_json_always_validates(engine, schema):
    params = [
        {"temperature": 1.0, "max_new_tokens": 200, "sampling_seed": seed, "json_schema": json.dumps(schema)}
        for seed in range(12)
    ]
    for out in engine.generate([PROMPT] * len(params), params):
        assert out["meta_info"]["finish_reason"]["type"] == "stop", out
        jsonschema.validate(json.loads(_text(out)), schema)


@pytest.mark.parametrize("pattern", REGEXES)
def test_sampled_regex_always_matches(engine, pattern):
    params = [
        {"temperature": 1.0, "max_new_tokens": 64, "sampling_seed": s, "regex": pattern} for s in range(12)
    ]
    for out in engine.generate([PROMPT] * len(params), params):
        assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": out["output_ids"][-1]}
        assert re.fullmatch(pattern, _text(out)), _text(out)


def test_free_requests_untouched_by_constrained_neighbours(engine):
    free = [
        {"temperature": 0.0, "max_new_tokens": 24, "ignore_eos": True},
        {"temperature": 1.0, "max_new_tokens": 24, "sampling_seed": 7, "ignore_eos": True},
        {"temperature": 0.7, "top_k": 20, "max_new_tokens": 24, "sampling_seed": 3, "ignore_eos": True},
    ]
    prompts = [PROMPT, PROMPT[:5], PROMPT[3:]]
    alone = engine.generate(prompts, free)
    constrained = [{"temperature": 1.0, "max_new_tokens": 40, "sampling_seed": 1, "regex": REGEXES[0]}] * 2
    mixed = engine.generate(prompts + [PROMPT, PROMPT[2:]], free + constrained)
    assert [o["output_ids"] for o in mixed[:3]] == [o["output_ids"] for o in alone]
    assert all(re.fullmatch(REGEXES[0], _text(o)) for o in mixed[3:])


def test_n_samples_each_follow_the_grammar(engine):
    schema = SCHEMAS[1]
    out = engine.generate(
        [PROMPT], {"temperature": 1.0, "n": 4, "max_new_tokens": 64, "json_schema": json.dumps(schema)}
    )
    assert len(out) == 4
    for sample in out:
        jsonschema.validate(json.loads(_text(sample)), schema)


def test_moved_request_resumes_its_matcher(engine):
    """A request moved with generated_ids continues under the grammar from where those left off."""
    pattern = r"abc[0-9]{4}"
    engine.add_request(
        GenerateRequest(
            rid="moved",
            input_ids=PROMPT,
            sampling_params={"temperature": 1.0, "sampling_seed": 5, "max_new_tokens": 20, "regex": pattern},
            generated_ids=[ord("a"), ord("b")],
        )
    )
    tokens: list[int] = []
    finish = None
    while engine.has_work():
        for out in engine.step():
            tokens += out.token_ids
            finish = out.finish_reason or finish
    assert finish is not None and finish["type"] == "stop"
    assert re.fullmatch(pattern, "ab" + bytes(tokens[:-1]).decode())


@pytest.mark.parametrize(
    "params,reason",
    [
        (
            {"json_schema": json.dumps({"type": "bogus"})},
            'json_schema could not be compiled by xgrammar: Unsupported type "bogus"',
        ),
        ({"regex": "(ab"}, "regex could not be compiled by xgrammar"),
        ({"ebnf": "root ::= undefined_rule"}, "ebnf could not be compiled by xgrammar"),
    ],
)
def test_uncompilable_grammar_ends_with_the_reason(engine, params, reason):
    """The grammar compiles off the request path, so its failure ends the request at a later step:
    every sample, nothing generated, the reason as the error a refusal carries."""
    engine.add_request(GenerateRequest(rid="bad", input_ids=PROMPT, sampling_params={**params, "n": 2}))
    outs = []
    while engine.has_work():
        outs += engine.step()
    assert sorted(o.index for o in outs) == [0, 1]
    for out in outs:
        assert out.finished and out.token_ids == [] and reason in out.error
        assert out.finish_reason == {"type": "abort", "message": out.error}


@pytest.mark.parametrize(
    "params,reason",
    [
        ({"json_schema": "{not json"}, "json_schema is not valid JSON"),
        ({"regex": "a", "ebnf": 'root ::= "a"'}, "Only one of json_schema, regex, ebnf and structural_tag"),
    ],
)
def test_bad_grammar_is_refused_with_the_reason(engine, params, reason):
    with pytest.raises(RequestError, match=re.escape(reason)):
        engine.add_request(GenerateRequest(rid="bad", input_ids=PROMPT, sampling_params=params))
    assert not engine.has_work()


def test_properties_come_in_the_schema_order(engine):
    """The model writes an object's properties in the order the schema lists them (as OpenAI's
    strict mode does): a tool call's name before its arguments, whatever their alphabetical order."""
    schema = {
        "type": "object",
        "properties": {"zeta": {"enum": ["z"]}, "alpha": {"enum": ["a"]}},
        "required": ["zeta", "alpha"],
    }
    spaced = json.dumps(schema, indent=2)  # the same schema spelled otherwise: one compile, same order
    for source in (json.dumps(schema), spaced):
        params = {"temperature": 1.0, "max_new_tokens": 60, "sampling_seed": 3, "json_schema": source}
        (out,) = engine.generate([PROMPT], [params])
        text = _text(out)
        assert list(json.loads(text)) == ["zeta", "alpha"], text
