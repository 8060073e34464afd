"""`tools`, `tool_choice` and `parallel_tool_calls` of a chat request, and the JSON schema that
constrained decoding enforces for `tool_choice` "required" or a named function.

Rules:
- `tools`: a list of `{"type": "function", "function": {"name", "description"?, "parameters"?}}`;
  names are unique. `tool_choice` defaults to "auto" with tools and "none" without; "auto",
  "none", "required", or `{"type": "function", "function": {"name": <one of the tools>}}`.
  Anything else is a 400 naming the field.
- The deprecated `functions` / `function_call` fields answer 400 (use `tools`).
- "required" and a named function are enforced, not hoped for: `call_schema` is sent as the
  request's `json_schema` sampling parameter, and the output (bare JSON, router/text/tool_formats/
  json_calls.py) is parsed in the default format. A named function fixes `name`; "required" allows
  any tool: one call, or with `parallel_tool_calls` (default true) an array of at least one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pdserve.router.openai.params import OpenAIRequestError, get_bool

CHOICES = ("auto", "none", "required")


@dataclass
class ToolSpec:
    tools: list[dict[str, Any]]
    choice: str  # auto | none | required | function
    function_name: str | None = None  # choice "function": the one to call
    parallel: bool = True

    @property
    def names(self) -> set[str]:
        return {t["function"]["name"] for t in self.tools}

    @property
    def calls_allowed(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "function")


def _check_tool(tool: Any, i: int) -> dict[str, Any]:
    fn = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
        raise OpenAIRequestError(
            f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}.",
            "tools",
        )
    if not isinstance(fn.get("name"), str) or not fn["name"]:
        raise OpenAIRequestError(f"tools[{i}].function.name must be a non-empty string.", "tools")
    if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
        raise OpenAIRequestError(f"tools[{i}].function.parameters must be a JSON schema object.", "tools")
    return {"type": "function", "function": fn}


def parse_tools(body: dict) -> ToolSpec | None:
    """None when the request has no tools (and no tool_choice other than "none"/"auto")."""
    for name in ("functions", "function_call"):
        if body.get(name):
            raise OpenAIRequestError(f"{name} is deprecated and not supported by pdserve; use tools.", name)
    raw = body.get("tools")
    if raw is not None and not isinstance(raw, list):
        raise OpenAIRequestError("tools must be a list of function tools.", "tools")
    tools = [_check_tool(t, i) for i, t in enumerate(raw or [])]
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise OpenAIRequestError("tools: function names must be unique.", "tools")
    spec = ToolSpec(tools, "auto" if tools else "none", parallel=get_bool(body, "parallel_tool_calls", True))
    choice = body.get("tool_choice")
    if isinstance(choice, str):
        if choice not in CHOICES:
            raise OpenAIRequestError(
                f"tool_choice must be one of {', '.join(CHOICES)} or a function.", "tool_choice"
            )
        spec.choice = choice
    elif isinstance(choice, dict):
        fn = choice.get("function")
        chosen = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(chosen, str):
            raise OpenAIRequestError(
                "tool_choice must be {'type': 'function', 'function': {'name': ...}}.", "tool_choice"
            )
        spec.choice, spec.function_name = "function", chosen
    elif choice is not None:
        raise OpenAIRequestError("tool_choice must be a string or an object.", "tool_choice")
    if spec.forced and not tools:
        raise OpenAIRequestError(f"tool_choice {spec.choice!r} needs tools.", "tool_choice")
    if spec.function_name is not None and spec.function_name not in spec.names:
        raise OpenAIRequestError(
            f"tool_choice names {spec.function_name!r}, which is not in tools.", "tool_choice"
        )
    return spec if tools else None


def _call_object(tool: dict[str, Any]) -> dict[str, Any]:
    fn = tool["function"]
    params = fn.get("parameters") or {"type": "object"}
    return {
        "type": "object",
        "properties": {"name": {"type": "string", "enum": [fn["name"]]}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def call_schema(spec: ToolSpec) -> dict[str, Any]:
    """The JSON schema of what the model may write under a forced tool_choice."""
    if spec.choice == "function":
        return _call_object(next(t for t in spec.tools if t["function"]["name"] == spec.function_name))
    one = {"anyOf": [_call_object(t) for t in spec.tools]}
    if spec.parallel:
        return {"type": "array", "items": one, "minItems": 1}
    return one


def forced_sampling(spec: ToolSpec | None, sampling: dict[str, Any]) -> dict[str, Any]:
    """Sampling params a forced tool_choice adds: the call schema as `json_schema` (a JSON string).
    A request constrained otherwise too (response_format, regex, ...) is a 400: one grammar each."""
    if spec is None or not spec.forced:
        return {}
    taken = [k for k in ("json_schema", "regex", "ebnf") if sampling.get(k) is not None]
    if taken:
        raise OpenAIRequestError(
            f"tool_choice {spec.choice!r} is enforced by a JSON schema and cannot be combined with "
            f"{', '.join(taken)} (or response_format).",
            "tool_choice",
        )
    return {"json_schema": json.dumps(call_schema(spec))}
