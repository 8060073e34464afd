"""Tool-call parsers (router/text/tool_call_parser.py) on outputs in each model family's format,
the shapes SGLang's and vLLM's parser tests use: one call, several, nested arguments, strings
holding braces, text around the calls, a call cut off by max_tokens (a call with the arguments
written so far once its name is known, text before), unknown names (stay text). Streaming: every way of cutting the output into deltas assembles to exactly the
non-streaming message."""

from __future__ import annotations

import json
import random

import pytest

from pdserve.router.openai.chat_output import ChoiceDeltas, OutputPlan, chat_message
from pdserve.router.text.reasoning_parser import DEEPSEEK_R1, QWEN3
from pdserve.router.text.tool_call_parser import analyze_tool_calls
from pdserve.router.text.tool_formats import (
    HERMES,
    JSON_CALLS,
    LLAMA3,
    MISTRAL,
    call_format,
    format_for_template,
)
from tests.helpers.stream_assembly import assemble_deltas, without_ids

NAMES = {"get_weather", "search", "run_code"}
WEATHER = '{"city": "Paris", "unit": "celsius"}'
NESTED = '{"query": {"text": "a } b { c", "filters": [{"k": "x\\"}"}, 3]}, "limit": 5}'


def parse(text, fmt, names=NAMES):
    a = analyze_tool_calls(text, fmt, names, final=True)
    return a.content, [(c.name, json.loads(c.arguments)) for c in a.calls]


CASES = [
    # (format, output, content, [(name, arguments)])
    (HERMES, f'<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n</tool_call>', "",
     [("get_weather", json.loads(WEATHER))]),
    (HERMES, (f'Let me look.\n<tool_call>\n{{"name": "search", "arguments": {NESTED}}}\n</tool_call>\n'
     f'<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n</tool_call>\nDone.'),
     "Let me look.Done.", [("search", json.loads(NESTED)), ("get_weather", json.loads(WEATHER))]),
    (LLAMA3, f'<|python_tag|>{{"name": "get_weather", "parameters": {WEATHER}}}', "",
     [("get_weather", json.loads(WEATHER))]),
    (LLAMA3, f'{{"name": "search", "parameters": {NESTED}}}; {{"name": "run_code", "parameters": {{}}}}', "",
     [("search", json.loads(NESTED)), ("run_code", {})]),
    (LLAMA3, f'I will check. <|python_tag|>{{"name": "get_weather", "arguments": {WEATHER}}}', "I will check.",
     [("get_weather", json.loads(WEATHER))]),
    (MISTRAL, (f'[TOOL_CALLS] [{{"name": "get_weather", "arguments": {WEATHER}}}, '
     f'{{"name": "search", "arguments": {NESTED}}}]'), "",
     [("get_weather", json.loads(WEATHER)), ("search", json.loads(NESTED))]),
    (MISTRAL, '[TOOL_CALLS] [{"name": "run_code", "arguments": {"code": "```\\nprint({1: 2})\\n```"}}]', "",
     [("run_code", {"code": "```\nprint({1: 2})\n```"})]),
    (JSON_CALLS, f'{{"name": "get_weather", "arguments": {WEATHER}}}', "", [("get_weather", json.loads(WEATHER))]),
    (JSON_CALLS, f'  [{{"name": "search", "arguments": {NESTED}}}, {{"name": "run_code"}}]', "",
     [("search", json.loads(NESTED)), ("run_code", {})]),
]  # fmt: skip


@pytest.mark.parametrize("fmt,text,content,calls", CASES)
def test_calls_and_content(fmt, text, content, calls):
    assert parse(text, fmt) == (content, calls)


def test_arguments_are_the_models_own_text():
    a = analyze_tool_calls(
        f'<tool_call>{{"name": "search", "arguments": {NESTED}}}</tool_call>', HERMES, NAMES, True
    )
    assert a.calls[0].arguments == NESTED


@pytest.mark.parametrize(
    "fmt,text",
    [
        (HERMES, '<tool_call>\n{"name": "get_wea'),  # cut off by max_tokens before its name is whole
        (HERMES, '<tool_call>{"name": "delete_all", "arguments": {}}</tool_call>'),  # not an offered tool
        (HERMES, '<tool_call>{"name": "search", "arguments": "q"}</tool_call>'),  # arguments not an object
        (LLAMA3, '{"answer": 42}'),  # JSON, but not a call
        (LLAMA3, 'Use {"name": "search"} like this.'),  # bare JSON only opens the output
        (MISTRAL, '[TOOL_CALLS] [{"arguments": {"q": 1}'),  # cut off before any name
        (JSON_CALLS, "The weather is fine."),
        (JSON_CALLS, "[1, 2]"),
    ],
)
def test_what_is_not_a_whole_call_stays_text(fmt, text):
    assert parse(text, fmt) == (text, [])


def test_whole_calls_before_a_cut_off_one_count():
    text = '[{"name": "search", "arguments": {}}, {"arguments": {"c'
    assert parse(text, JSON_CALLS) == ('{"arguments": {"c', [("search", {})])


@pytest.mark.parametrize(
    "fmt,text,content",
    [
        (HERMES, 'Checking.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par', "Checking."),
        (JSON_CALLS, '[{"name": "search", "arguments": {}}, {"name": "run_code", "arguments": {"c', ""),
        (MISTRAL, '[TOOL_CALLS] [{"name": "search", "arguments": {"q": 1}', ""),
    ],
)
def test_a_named_call_cut_off_by_max_tokens_stays_a_call_as_streamed(fmt, text, content):
    """As OpenAI answers: the call with the arguments written so far; a stream sends the same."""
    analysis = analyze_tool_calls(text, fmt, NAMES, final=True)
    assert analysis.content == content and not analysis.calls[-1].complete
    assert text.endswith(analysis.calls[-1].arguments)
    plan = OutputPlan(None, fmt, frozenset(NAMES))
    whole = without_ids(chat_message(plan, text))
    for cuts in (list(range(1, len(text) + 1)), [len(text) // 2, len(text)]):
        assert without_ids(stream(plan, text, cuts)[0]) == whole


def test_any_name_without_a_tool_list():
    assert parse('<tool_call>{"name": "x", "arguments": {}}</tool_call>', HERMES, None) == ("", [("x", {})])


def test_parser_names_and_template_guess():
    assert call_format("qwen25") is HERMES and call_format("llama3") is LLAMA3
    with pytest.raises(ValueError, match="hermes"):
        call_format("nope")
    assert format_for_template("{% if tools %}<tool_call>{% endif %}") is HERMES
    assert format_for_template("{{ '<|python_tag|>' }} tools") is LLAMA3
    assert format_for_template("[TOOL_CALLS] tools") is MISTRAL
    assert format_for_template("{{ messages }}") is JSON_CALLS


def stream(plan, text, cuts):
    deltas, parser = [], ChoiceDeltas(plan)
    for i, end in enumerate(cuts):
        deltas.append(parser.delta(text[:end], final=i == len(cuts) - 1))
    return assemble_deltas(deltas), parser


def all_cuts(n, rng):
    yield list(range(1, n + 1))  # one character per event
    yield [n]
    for _ in range(5):
        yield sorted(set(rng.sample(range(1, n), k=min(n - 1, rng.randint(1, 8))))) + [n]


@pytest.mark.parametrize("fmt,text,content,calls", CASES)
def test_streamed_deltas_assemble_to_the_message(fmt, text, content, calls):
    plan = OutputPlan(None, fmt, frozenset(NAMES))
    expected = without_ids(chat_message(plan, text))
    rng = random.Random(len(text))
    for cuts in all_cuts(len(text), rng):
        message, parser = stream(plan, text, cuts)
        assert without_ids(message) == expected, cuts
        assert parser.tools.called


def test_streaming_sends_name_first_then_argument_pieces():
    text = f'<tool_call>{{"name": "get_weather", "arguments": {WEATHER}}}</tool_call>'
    parser = ChoiceDeltas(OutputPlan(None, HERMES, frozenset(NAMES)))
    entries = [
        e for n in range(1, len(text) + 1) for e in parser.delta(text[:n], False).get("tool_calls", [])
    ]
    first = entries[0]
    assert first["id"].startswith("call_") and first["function"] == {"name": "get_weather", "arguments": ""}
    pieces = [e["function"]["arguments"] for e in entries[1:]]
    assert len(pieces) > 5 and "".join(pieces) == WEATHER and all("id" not in e for e in entries[1:])


REASONED = [
    (
        QWEN3,
        "<think>\nThe user wants weather.\n</think>\n\nIt is sunny.",
        "The user wants weather.",
        "It is sunny.",
    ),
    (QWEN3, "No thinking here.", None, "No thinking here."),
    (DEEPSEEK_R1, "Let me think {a}.\n</think>\nAnswer.", "Let me think {a}.", "Answer."),
    (DEEPSEEK_R1, "<think>Plan.</think>Answer.", "Plan.", "Answer."),
    (DEEPSEEK_R1, "Still thinking when max_tokens came", "Still thinking when max_tokens came", None),
]


@pytest.mark.parametrize("fmt,text,reasoning,content", REASONED)
def test_reasoning_split_streamed_and_not(fmt, text, reasoning, content):
    plan = OutputPlan(fmt)
    message = chat_message(plan, text)
    assert (message["reasoning_content"], message["content"]) == (reasoning, content)
    rng = random.Random(7)
    for cuts in all_cuts(len(text), rng):
        assert without_ids(stream(plan, text, cuts)[0]) == without_ids(message), cuts


def test_reasoning_then_tool_calls():
    text = f'<think>Need weather.</think>\n<tool_call>{{"name": "get_weather", "arguments": {WEATHER}}}</tool_call>'
    plan = OutputPlan(QWEN3, HERMES, frozenset(NAMES))
    message = chat_message(plan, text)
    assert message["reasoning_content"] == "Need weather." and message["content"] is None
    assert message["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": WEATHER}
    assert without_ids(stream(plan, text, list(range(1, len(text) + 1)))[0]) == without_ids(message)
