"""Function calling on SmolLM2-135M-Instruct (serve's default model; its ChatML template has no
tool section, so the router renders its default one), real weights on a `worker --role mixed`,
through the `openai` client and LangChain's ChatOpenAI, unchanged.

A 135M model may or may not call a tool under `tool_choice: "auto"`: the shape is checked (a call,
when there is one, names an offered tool with JSON arguments and finishes with "tool_calls"), and
greedy streaming assembles to the non-streaming message whichever it is. A history holding an
assistant call and its tool result renders (longer prompt than without it) and answers.
"""

from __future__ import annotations

import json

import openai
import pytest

from tests.helpers.stream_assembly import assemble_deltas, without_ids

pytestmark = [pytest.mark.slow, pytest.mark.untimed]

SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
HISTORY = [
    *ASK,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_0",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_0", "content": '{"temperature_c": 21, "sky": "clear"}'},
]


@pytest.fixture(scope="module")
def url(worker_launcher, router_launcher) -> str:
    worker = worker_launcher(
        "--model-path", SMOL, "--dtype", "float32", "--device", "cpu", "--max-total-tokens", "8192",
        "--log-level", "warning",
    )  # fmt: skip
    return router_launcher("--worker-addr", worker.zmq_address).url


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _check_shape(choice) -> None:
    calls = choice.message.tool_calls or []
    for call in calls:
        assert call.id.startswith("call_") and call.function.name == "get_weather"
        assert isinstance(json.loads(call.function.arguments), dict)
    if calls:
        assert choice.finish_reason == "tool_calls"
    else:
        assert choice.finish_reason in ("stop", "length") and isinstance(choice.message.content, str)


def test_auto_shape_and_streaming_matches(client):
    kwargs = {"model": SMOL, "messages": ASK, "tools": [WEATHER], "temperature": 0, "max_tokens": 40}
    choice = client.chat.completions.create(**kwargs).choices[0]
    _check_shape(choice)
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    deltas = [c.choices[0].delta.model_dump(exclude_none=True) for c in chunks if c.choices]
    assert without_ids(assemble_deltas(deltas)) == without_ids(choice.message.model_dump())


def test_tool_history_round_trips(client):
    plain = client.chat.completions.create(model=SMOL, messages=ASK, max_tokens=1, temperature=0)
    resp = client.chat.completions.create(
        model=SMOL, messages=HISTORY, tools=[WEATHER], max_tokens=24, temperature=0
    )
    _check_shape(resp.choices[0])
    assert resp.usage.prompt_tokens > plain.usage.prompt_tokens + 40  # the tool section and the turns
    none = client.chat.completions.create(
        model=SMOL, messages=HISTORY, tools=[WEATHER], tool_choice="none", max_tokens=24, temperature=0
    )
    assert none.choices[0].message.tool_calls is None
    assert none.usage.prompt_tokens < resp.usage.prompt_tokens  # no tool section


def test_langchain_bind_tools_auto(url):
    from langchain_core.messages import AIMessage
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(
        base_url=url + "/v1", api_key="unused", model=SMOL, temperature=0, max_tokens=40, max_retries=0
    )
    answer = chat.bind_tools([WEATHER], tool_choice="auto").invoke(ASK[0]["content"])
    assert isinstance(answer, AIMessage)
    assert all(c["name"] == "get_weather" and isinstance(c["args"], dict) for c in answer.tool_calls)
