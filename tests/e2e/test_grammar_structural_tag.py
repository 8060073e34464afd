"""structural_tag end to end (router + one mixed worker, tiny random Llama with a byte tokenizer,
CPU) with the `openai` package, and grammars that fail to compile on the worker's compile thread.

- SGLang's legacy `response_format` (`structures` + `triggers`): the text is free until a trigger;
  a logit bias on the trigger's bytes makes a random model write tags. Sampled over several
  seeds, every complete tagged segment's content validates against its schema (jsonschema), and
  some seed wrote one (the check is not vacuous).
- xgrammar's `format` shape (a sequence of free text bounded in tokens and tags): every output
  has its tags, each validating; the same through /generate's `structural_tag` sampling param.
- A grammar xgrammar cannot compile, found off the request path, still answers HTTP 400 in the
  OpenAI error shape on /v1/chat/completions and /v1/completions and on /generate, streaming or
  not (nothing was streamed yet), naming xgrammar's reason.
"""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest
import requests

from tests.helpers.openai_server import MESSAGES, MODEL_NAME, client, server  # noqa: F401

pytestmark = pytest.mark.untimed

SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}, "c": {"enum": ["red", "blue"]}},
    "required": ["n", "c"],
}
OTHER = {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 2}
LEGACY_TAG = {
    "type": "structural_tag",
    "structures": [
        {"begin": "<f=a>", "schema": SCHEMA, "end": "</f>"},
        {"begin": "<f=b>", "schema": OTHER, "end": "</f>"},
    ],
    "triggers": ["<f="],
}
TAG_SCHEMAS = {"a": SCHEMA, "b": OTHER}
# the byte tokenizer: ids 0-255 are the bytes; "<", "f" and "=" made likely enough to trigger
TRIGGER_BIAS = {str(ord("<")): 6.0, str(ord("f")): 5.0, str(ord("=")): 5.0}
TAGGED = re.compile(r"<f=([ab])>(.*?)</f>", re.DOTALL)


def _free(max_tokens: int) -> dict:
    return {"type": "any_text", "max_tokens": max_tokens}


def _tag(name: str) -> dict:
    content = {"type": "json_schema", "json_schema": TAG_SCHEMAS[name], "max_whitespace_cnt": 1}
    return {"type": "tag", "begin": f"<f={name}>", "content": content, "end": "</f>"}


FORMAT_TAG = {
    "type": "structural_tag",
    "format": {"type": "sequence", "elements": [_free(6), _tag("a"), _free(6), _tag("b"), _free(4)]},
}


def _check_segments(text: str) -> int:
    """Validates every complete tagged segment; returns how many there were."""
    found = TAGGED.findall(text)
    for name, content in found:
        jsonschema.validate(json.loads(content), TAG_SCHEMAS[name])
    return len(found)


def test_chat_legacy_structural_tag(client):  # noqa: F811
    tagged = 0
    for seed in range(6):
        resp = client.chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, max_tokens=160, temperature=1.0, seed=seed,
            logit_bias=TRIGGER_BIAS, response_format=LEGACY_TAG,
        )  # fmt: skip
        tagged += _check_segments(resp.choices[0].message.content)
    assert tagged > 0


@pytest.mark.parametrize("seed", range(3))
def test_chat_format_structural_tag(client, seed):  # noqa: F811
    resp = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=200, temperature=1.0, seed=seed, n=2,
        response_format=FORMAT_TAG,
    )  # fmt: skip
    for choice in resp.choices:
        assert choice.finish_reason == "stop", choice
        assert [name for name, _ in TAGGED.findall(choice.message.content)] == ["a", "b"]
        assert _check_segments(choice.message.content) == 2


def test_native_generate_structural_tag(server):  # noqa: F811
    params = {"temperature": 1.0, "max_new_tokens": 200, "structural_tag": json.dumps(FORMAT_TAG)}
    for seed in range(2):
        body = {"text": "Tags: ", "sampling_params": {**params, "sampling_seed": seed}}
        resp = requests.post(server["url"] + "/generate", json=body, timeout=60)
        assert resp.status_code == 200, resp.text
        assert _check_segments(resp.json()["text"]) == 2


BOGUS_FORMAT = {"type": "structural_tag", "format": {"type": "nope"}}


@pytest.mark.parametrize("stream", [False, True])
def test_uncompilable_grammar_is_a_400_before_any_token(client, server, stream):  # noqa: F811
    with pytest.raises(openai.BadRequestError, match="could not be compiled by xgrammar: Unsupported type"):
        client.chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, max_tokens=8, stream=stream,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wrong"}}},
        )  # fmt: skip
    with pytest.raises(openai.BadRequestError, match="Format type not recognized: nope"):
        client.completions.create(
            model=MODEL_NAME,
            prompt="x",
            max_tokens=8,
            stream=stream,
            extra_body={"response_format": BOGUS_FORMAT},
        )
    body = {"text": "x", "sampling_params": {"ebnf": "root ::= missing"}, "stream": stream}
    resp = requests.post(server["url"] + "/generate", json=body, timeout=60)
    assert resp.status_code == 400, resp.text
    error = resp.json()
    assert error["object"] == "error" and "ebnf could not be compiled by xgrammar" in error["message"]
