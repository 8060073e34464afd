"""Chat requests with tools (router/openai/tools.py, tool_template.py): validation answers 400 by
field, a forced tool_choice becomes a json_schema that accepts the allowed calls and rejects a wrong
name or a missing required argument, and the default tool section renders on a template without
tools (SmolLM2's kind) while a tool-aware template gets `tools=`."""

from __future__ import annotations

import json

import jsonschema
import pytest

from pdserve.router.openai.params import OpenAIRequestError
from pdserve.router.openai.protocol import parse_chat_request
from pdserve.router.openai.tool_template import prompt_inputs

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
SEARCH = {"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}
USER = [{"role": "user", "content": "Weather in Paris?"}]


def chat(**fields):
    return parse_chat_request({"messages": USER, "tools": [WEATHER, SEARCH], **fields})


def valid(schema, value) -> bool:
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError:
        return False
    return True


def test_named_function_schema():
    req = chat(tool_choice={"type": "function", "function": {"name": "get_weather"}})
    schema = json.loads(req.sampling["json_schema"])
    assert valid(schema, {"name": "get_weather", "arguments": {"city": "Paris"}})
    assert not valid(schema, {"name": "search", "arguments": {"city": "Paris"}})
    assert not valid(schema, {"name": "get_weather", "arguments": {"unit": "c"}})


def test_required_schema_parallel_and_not():
    parallel = json.loads(chat(tool_choice="required").sampling["json_schema"])
    calls = [{"name": "search", "arguments": {"q": "x"}}, {"name": "get_weather", "arguments": {"city": "P"}}]
    assert (
        valid(parallel, calls)
        and not valid(parallel, [])
        and not valid(parallel, [{"name": "x", "arguments": {}}])
    )
    single = json.loads(chat(tool_choice="required", parallel_tool_calls=False).sampling["json_schema"])
    assert valid(single, calls[0]) and not valid(single, calls)
    assert not valid(single, {"name": "get_weather", "arguments": {}})


def test_auto_and_none_add_no_schema():
    assert "json_schema" not in chat().sampling and chat().tools.choice == "auto"
    assert "json_schema" not in chat(tool_choice="none").sampling


@pytest.mark.parametrize(
    "fields,param",
    [
        ({"tools": "x"}, "tools"),
        ({"tools": [{"type": "function", "function": {}}]}, "tools"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": None, "tool_choice": "required"}, "tool_choice"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ],
)
def test_bad_tool_fields_are_400_by_field(fields, param):
    with pytest.raises(OpenAIRequestError) as err:
        chat(**fields)
    assert err.value.param == param and err.value.status == 400


HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "22 C"},
]


def test_history_with_calls_is_accepted_and_arguments_become_objects():
    req = chat(messages=HISTORY)
    assert req.messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert req.messages[2] == {"role": "tool", "content": "22 C", "tool_call_id": "call_1"}
    with pytest.raises(OpenAIRequestError):
        chat(
            messages=[
                *HISTORY[:1],
                {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]},
            ]
        )


def test_default_tool_section_for_a_template_without_tools():
    req = chat(messages=[{"role": "system", "content": "Be brief."}, *HISTORY])
    messages, tools = prompt_inputs(
        req.messages, req.tools, "{% for m in messages %}{{ m.content }}{% endfor %}"
    )
    assert tools is None and messages[0]["role"] == "system"
    assert (
        messages[0]["content"].startswith("Be brief.\n\n# Tools")
        and '"get_weather"' in messages[0]["content"]
    )
    assert messages[2] == {
        "role": "assistant",
        "content": '{"name": "get_weather", "arguments": {"city": "Paris"}}',
    }
    assert messages[3] == {"role": "user", "content": "Result of the function get_weather:\n22 C"}
    plain, _ = prompt_inputs(req.messages, chat(tool_choice="none").tools, "{{ messages }}")
    assert "# Tools" not in json.dumps(plain)


def test_tool_aware_template_gets_tools():
    req = chat(messages=HISTORY)
    messages, tools = prompt_inputs(req.messages, req.tools, "{% if tools %}{{ tools }}{% endif %}")
    assert messages == req.messages and tools == [WEATHER, SEARCH]
    assert prompt_inputs(req.messages, chat(tool_choice="none").tools, "{{ tools }}")[1] is None
