"""Constrained decoding end to end (router + one mixed worker, tiny random Llama, CPU) with the
`openai` package: response_format json_schema and json_object on chat completions, streaming and
not, n > 1; completions; native /generate with regex; an uncompilable schema is a 400."""

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
    "properties": {"city": {"type": "string", "pattern": "^[A-Z][a-z]{1,8}$"}, "rank": {"enum": [1, 2, 3]}},
    "required": ["city", "rank"],
    "additionalProperties": False,
}
JSON_SCHEMA_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "place", "strict": True, "schema": SCHEMA},
}


@pytest.mark.parametrize("seed", range(4))
def test_chat_json_schema(client, seed):  # noqa: F811
    resp = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=120, temperature=1.0, seed=seed, n=2,
        response_format=JSON_SCHEMA_FORMAT,
    )  # fmt: skip
    assert len(resp.choices) == 2
    for choice in resp.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_chat_json_schema_streaming(client):  # noqa: F811
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=120, temperature=1.0, seed=11, stream=True,
        response_format=JSON_SCHEMA_FORMAT,
    )  # fmt: skip
    text, finish = "", None
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert finish == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)


def test_chat_json_object(client):  # noqa: F811
    """Any object: a random model may still be inside a long string at max_tokens, so outputs that
    stopped must parse as objects, and the others be a prefix of one."""
    resp = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=200, temperature=1.0, seed=3, n=6,
        response_format={"type": "json_object"},
    )  # fmt: skip
    stopped = [c for c in resp.choices if c.finish_reason == "stop"]
    assert stopped
    for choice in resp.choices:
        assert choice.message.content.lstrip().startswith("{")
    for choice in stopped:
        assert isinstance(json.loads(choice.message.content), dict)


def test_completions_regex_extra(client):  # noqa: F811
    resp = client.completions.create(
        model=MODEL_NAME,
        prompt="Code:",
        max_tokens=20,
        temperature=1.0,
        seed=2,
        extra_body={"regex": "[A-F]{4}"},
    )
    assert re.fullmatch("[A-F]{4}", resp.choices[0].text)


def test_native_generate_regex(server):  # noqa: F811
    resp = requests.post(
        server["url"] + "/generate",
        json={
            "text": "Phone: ",
            "sampling_params": {"temperature": 1.0, "max_new_tokens": 30, "regex": r"\d{3}-\d{4}"},
        },
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    assert re.fullmatch(r"\d{3}-\d{4}", resp.json()["text"])


def test_uncompilable_schema_is_a_400(client, server):  # noqa: F811
    with pytest.raises(openai.BadRequestError, match="could not be compiled by xgrammar"):
        client.chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, max_tokens=8,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}},
        )  # fmt: skip
    resp = requests.post(
        server["url"] + "/generate",
        json={"text": "x", "sampling_params": {"regex": "(unclosed"}},
        timeout=60,
    )
    assert resp.status_code == 400 and "regex could not be compiled by xgrammar" in resp.json()["message"]
