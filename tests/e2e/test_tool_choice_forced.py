"""`tool_choice` "required" and a named function, which need constrained decoding: the router sends
the call schema as the request's `json_schema` sampling param (router/openai/tools.py) and the
engine must enforce it (the grammar branch). Until the engine serves `json_schema`, the module
skips itself: its fixture asks once and skips when the answer is a refusal.

Checked on SmolLM2-135M-Instruct (a model that would rarely call a tool unforced): every answer
is a parseable call to an allowed tool, streamed and not, with the `openai` client and LangChain
(`bind_tools(..., tool_choice=...)`, `with_structured_output` with a pydantic model).
"""

from __future__ import annotations

import json

import openai
import pytest
import requests

from tests.e2e.test_tool_calls_smollm2 import ASK, SMOL, client, url  # noqa: F401 (fixtures)
from tests.helpers.stream_assembly import assemble_deltas, without_ids

# the fixtures come from the other module: test arguments that name them are not redefinitions
# ruff: noqa: F811

pytestmark = [pytest.mark.slow, pytest.mark.untimed]


def _tool(name: str, arg: str, values: list[str]) -> dict:
    # enums keep a 135M model's arguments short: the grammar ends them, not max_tokens
    params = {"type": "object", "properties": {arg: {"enum": values}}, "required": [arg]}
    return {"type": "function", "function": {"name": name, "parameters": params}}


WEATHER = _tool("get_weather", "city", ["Paris", "Rome"])
TIME = _tool("get_time", "zone", ["UTC", "CET"])


@pytest.fixture(scope="module")
def forced(url) -> str:
    body = {"text": "{", "sampling_params": {"max_new_tokens": 1, "json_schema": '{"type": "object"}'}}
    resp = requests.post(url + "/generate", json=body, timeout=120)
    if resp.status_code != 200:
        pytest.skip(f"the engine does not serve json_schema yet: {resp.text[:200]}")
    return url


def _calls(choice, allowed: set[str]) -> list:
    """The choice's calls, each to an allowed tool with JSON object arguments. An array of parallel
    calls may run to max_tokens (a small model repeats calls): its whole calls still count."""
    calls = choice.message.tool_calls
    assert calls and choice.finish_reason in ("tool_calls", "length"), choice.message.content
    for call in calls:
        assert call.function.name in allowed and isinstance(json.loads(call.function.arguments), dict)
    return calls


@pytest.mark.parametrize("parallel", [True, False])
def test_required_always_calls(forced, client, parallel):
    kwargs = {"model": SMOL, "messages": ASK, "tools": [WEATHER, TIME], "tool_choice": "required"}
    kwargs.update(parallel_tool_calls=parallel, max_tokens=200, temperature=0)
    choice = client.chat.completions.create(**kwargs).choices[0]
    calls = _calls(choice, {"get_weather", "get_time"})
    assert parallel or len(calls) == 1
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    deltas = [c.choices[0].delta.model_dump(exclude_none=True) for c in chunks if c.choices]
    assert without_ids(assemble_deltas(deltas)) == without_ids(choice.message.model_dump())


def test_named_function_is_called(forced, client):
    choice = client.chat.completions.create(
        model=SMOL, messages=ASK, tools=[WEATHER, TIME], max_tokens=200, temperature=1.0, seed=3,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    ).choices[0]  # fmt: skip
    assert [c.function.name for c in _calls(choice, {"get_time"})] == ["get_time"]


def test_langchain_forced_choices(forced):
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    chat = ChatOpenAI(
        base_url=forced + "/v1", api_key="unused", model=SMOL, temperature=0, max_tokens=200, max_retries=0
    )
    answer = chat.bind_tools([WEATHER, TIME], tool_choice="get_weather").invoke(ASK[0]["content"])
    assert [c["name"] for c in answer.tool_calls] == ["get_weather"]

    class Weather(BaseModel):
        city: str
        celsius: int

    result = chat.with_structured_output(Weather, method="function_calling").invoke(ASK[0]["content"])
    assert isinstance(result, Weather)


def test_openai_client_refusal_is_not_a_crash(client):
    """Whatever the engine serves, a forced choice never answers 5xx."""
    try:
        client.chat.completions.create(
            model=SMOL, messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=8
        )
    except openai.BadRequestError as exc:
        assert exc.status_code == 400
