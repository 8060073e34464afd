"""`/separate_reasoning` and `/parse_function_call`: the chat route's parsers on any text, as SGLang
serves them (no model involved; they work whatever the router's `--*-parser` flags are).

    POST /separate_reasoning  {"text": str, "reasoning_parser": "qwen3" | "deepseek-r1"}
      -> {"text": <content>, "reasoning_text": <reasoning>}
    POST /parse_function_call {"text": str, "tool_call_parser": "hermes" | ..., "tools": [tool]}
      -> {"normal_text": <text outside calls>, "calls": [{"tool_index", "name", "parameters"}]}

`parameters` is the call's arguments as a JSON string; `tool_index` is the call's position in the
output (the OpenAI `index` of its streamed deltas). Only calls to a function in `tools` count.
A missing or unknown field value is a 400 naming it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from pdserve.router.http.limits import http_error, read_json_object
from pdserve.router.openai.params import OpenAIRequestError
from pdserve.router.openai.tools import parse_tools
from pdserve.router.text.reasoning_parser import analyze_reasoning, reasoning_format
from pdserve.router.text.tool_call_parser import analyze_tool_calls
from pdserve.router.text.tool_formats import call_format


def _text(body: dict[str, Any]) -> str:
    text = body.get("text")
    if not isinstance(text, str):
        raise http_error(400, "text must be a string.")
    return text


def _named(body: dict[str, Any], field: str, lookup: Callable[[str], Any]) -> Any:
    name = body.get(field)
    if not isinstance(name, str):
        raise http_error(400, f"{field} must be a string.")
    try:
        return lookup(name)
    except ValueError as exc:
        raise http_error(400, f"{field}: {exc}") from None


async def handle_separate_reasoning(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    text = _text(body)
    split = analyze_reasoning(text, _named(body, "reasoning_parser", reasoning_format), final=True)
    return web.json_response({"text": split.content, "reasoning_text": split.reasoning})


async def handle_parse_function_call(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    text = _text(body)
    fmt = _named(body, "tool_call_parser", call_format)
    try:
        spec = parse_tools({"tools": body.get("tools")})
    except OpenAIRequestError as exc:
        raise http_error(400, exc.message) from None
    names = spec.names if spec is not None else set()
    analysis = analyze_tool_calls(text, fmt, names, final=True)
    calls = [
        {"tool_index": i, "name": c.name, "parameters": c.arguments} for i, c in enumerate(analysis.calls)
    ]
    return web.json_response({"normal_text": analysis.content, "calls": calls})
