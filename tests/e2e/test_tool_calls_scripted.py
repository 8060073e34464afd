"""Function calling and reasoning end to end, on a tiny Llama whose greedy output is scripted
(tests/helpers/scripted_model.py): a real `worker --role mixed` behind routers started with
`--tool-call-parser` / `--reasoning-parser` and a `--chat-template`, driven by the `openai` client
and LangChain as users drive them.

Checked: a Hermes call with text before it (non-streaming message, finish_reason "tool_calls",
streamed deltas assembling to the same message); a call cut off by max_tokens stays a call (its
arguments so far), streamed alike; the
default JSON format on a template without tools (LangChain's bind_tools gets the call); a tool-role
history renders and answers; the reasoning split (qwen3: opening tag; deepseek-r1: none), streamed
and not, and its switches (`separate_reasoning`, `enable_thinking`); /separate_reasoning and
/parse_function_call.
"""

from __future__ import annotations

import json

import openai
import pytest
import requests

from tests.helpers.scripted_model import make_scripted_model
from tests.helpers.stream_assembly import assemble_deltas, without_ids

pytestmark = [pytest.mark.slow, pytest.mark.untimed]

ARGS = '{"city": "Paris", "note": "a}b{"}'
SCRIPTS = {
    "<<CALL>>": [
        "Checking.",
        "<tool_call>",
        '\n{"name": "get_weather", "arguments": ',
        ARGS,
        "}\n</tool_call>",
    ],
    "<<JSON>>": ['{"name": "get_weather", "arguments": {"city": "Rome"}}'],
    "<<THINK>>": ["<think>", "The user greets.", "</think>", "Hello!"],
    "<<R1>>": ["Pondering.", "</think>\n\n", "Hi there."],
}
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if not loop.last %}\n{% endif %}{% endfor %}"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
MODEL = "scripted"


@pytest.fixture(scope="module")
def urls(tmp_path_factory, worker_launcher, router_launcher) -> dict[str, str]:
    base = tmp_path_factory.mktemp("scripted")
    model_dir = str(make_scripted_model(base / "model", SCRIPTS))
    template = base / "template.jinja"
    template.write_text(TEMPLATE)
    worker = worker_launcher(
        "--model-path", model_dir, "--dtype", "float32", "--device", "cpu",
        "--max-total-tokens", "4096", "--log-level", "warning",
    )  # fmt: skip
    common = (
        "--worker-addr",
        worker.zmq_address,
        "--served-model-name",
        MODEL,
        "--chat-template",
        str(template),
    )
    hermes = router_launcher(*common, "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3")
    default = router_launcher(*common)
    r1 = router_launcher(*common, "--reasoning-parser", "deepseek-r1")
    return {"hermes": hermes.url, "default": default.url, "r1": r1.url}


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def ask(url: str, trigger: str, **extra):
    messages = extra.pop("messages", [{"role": "user", "content": f"Go {trigger}"}])
    return client(url).chat.completions.create(model=MODEL, messages=messages, temperature=0, **extra)


def streamed(url: str, trigger: str, **extra) -> tuple[dict, list[str]]:
    chunks = list(ask(url, trigger, stream=True, **extra))
    deltas = [c.choices[0].delta.model_dump(exclude_none=True) for c in chunks if c.choices]
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return assemble_deltas(deltas), reasons


def test_hermes_call_non_streaming_and_streaming(urls):
    resp = ask(urls["hermes"], "<<CALL>>", tools=[WEATHER])
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking."
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert (call.function.name, call.function.arguments) == ("get_weather", ARGS)
    message, reasons = streamed(urls["hermes"], "<<CALL>>", tools=[WEATHER])
    assert without_ids(message) == without_ids(choice.message.model_dump())
    assert reasons == ["tool_calls"]


def test_call_cut_off_by_max_tokens_stays_a_call_as_streamed(urls):
    """As OpenAI answers: the named call with the arguments written so far, finish_reason "length";
    the stream's deltas assemble to the same message."""
    choice = ask(urls["hermes"], "<<CALL>>", tools=[WEATHER], max_tokens=3).choices[0]
    assert choice.finish_reason == "length" and choice.message.content == "Checking."
    (call,) = choice.message.tool_calls
    assert (call.function.name, call.function.arguments) == ("get_weather", "")
    message, reasons = streamed(urls["hermes"], "<<CALL>>", tools=[WEATHER], max_tokens=3)
    assert without_ids(message) == without_ids(choice.message.model_dump()) and reasons == ["length"]


def test_tool_choice_none_parses_nothing(urls):
    choice = ask(urls["hermes"], "<<CALL>>", tools=[WEATHER], tool_choice="none").choices[0]
    assert choice.finish_reason == "stop" and choice.message.tool_calls is None
    assert "<tool_call>" in choice.message.content


def test_default_json_format_and_langchain_bind_tools(urls):
    choice = ask(urls["default"], "<<JSON>>", tools=[WEATHER]).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert json.loads(choice.message.tool_calls[0].function.arguments) == {"city": "Rome"}
    message, _ = streamed(urls["default"], "<<JSON>>", tools=[WEATHER])
    assert without_ids(message) == without_ids(choice.message.model_dump())

    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(
        base_url=urls["default"] + "/v1", api_key="unused", model=MODEL, temperature=0, max_retries=0
    )
    answer = chat.bind_tools([WEATHER], tool_choice="auto").invoke([("user", "Go <<JSON>>")])
    assert [(c["name"], c["args"]) for c in answer.tool_calls] == [("get_weather", {"city": "Rome"})]


def test_tool_history_round_trips(urls):
    first = ask(urls["default"], "<<JSON>>", tools=[WEATHER]).choices[0].message
    history = [
        {"role": "user", "content": "Weather in Rome? <<JSON>>"},
        first.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": "22 C"},
        {"role": "user", "content": "Thanks <<R1>>"},
    ]
    choice = ask(urls["r1"], "", messages=history, tools=[WEATHER]).choices[0]
    assert (choice.message.reasoning_content, choice.message.content) == ("Pondering.", "Hi there.")


def test_reasoning_split_streamed_and_not(urls):
    for url, trigger, reasoning, content in (
        (urls["hermes"], "<<THINK>>", "The user greets.", "Hello!"),
        (urls["r1"], "<<R1>>", "Pondering.", "Hi there."),
        (urls["r1"], "<<THINK>>", "The user greets.", "Hello!"),
    ):
        message = ask(url, trigger).choices[0].message
        assert (message.reasoning_content, message.content) == (reasoning, content)
        assembled, reasons = streamed(url, trigger)
        assert assembled == {"content": content, "reasoning_content": reasoning, "tool_calls": None}
        assert reasons == ["stop"]


def test_reasoning_switches(urls):
    raw = "<think>The user greets.</think>Hello!"
    off = ask(urls["hermes"], "<<THINK>>", extra_body={"separate_reasoning": False}).choices[0].message
    assert (off.reasoning_content, off.content) == (None, raw)
    no_think = ask(
        urls["hermes"], "<<THINK>>", extra_body={"chat_template_kwargs": {"enable_thinking": False}}
    )
    assert no_think.choices[0].message.content == raw


def test_native_parser_routes(urls):
    url = urls["hermes"]
    resp = requests.post(
        url + "/separate_reasoning", json={"text": "<think>a</think>b", "reasoning_parser": "qwen3"}
    )
    assert resp.status_code == 200 and resp.json() == {"text": "b", "reasoning_text": "a"}
    text = 'Hi <tool_call>{"name": "get_weather", "arguments": {"city": "P"}}</tool_call>'
    body = {"text": text, "tool_call_parser": "qwen25", "tools": [WEATHER]}
    resp = requests.post(url + "/parse_function_call", json=body)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {
        "normal_text": "Hi",
        "calls": [{"tool_index": 0, "name": "get_weather", "parameters": '{"city": "P"}'}],
    }
    for path, bad in (("/separate_reasoning", {"text": "x", "reasoning_parser": "nope"}),
                      ("/parse_function_call", {"text": 1, "tool_call_parser": "hermes"})):  # fmt: skip
        resp = requests.post(url + path, json=bad)
        assert resp.status_code == 400 and resp.json()["object"] == "error", resp.text


def test_bad_parser_flag_is_refused_at_start(router_launcher, tmp_path):
    with pytest.raises(RuntimeError, match="tool-call parser"):
        router_launcher("--tool-call-parser", "nope", "--worker-addr", "tcp://127.0.0.1:9", healthy=False)
