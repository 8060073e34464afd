"""Tools and tool messages into the prompt: the model's own chat template when it knows tools, a
documented default when it does not.

Rules:
- Messages may hold assistant `tool_calls` (`arguments` a JSON string, given to templates as the
  object it encodes, as transformers' templates expect) and `role: "tool"` results with their
  `tool_call_id`.
- A template "knows tools" when its source mentions `tools`: it gets `tools=` (the OpenAI tool
  objects) through apply_chat_template, and the messages as they are. `tool_choice` "none" passes
  no tools.
- Otherwise (SmolLM2's template, for one) the default: a system-prompt section lists each tool's
  JSON and asks for a reply that is only a JSON call (router/text/tool_formats/json_calls.py);
  past assistant calls become that JSON in the assistant's text, and tool results become user
  messages naming the function. `--chat-template` can supply a tool-aware template instead.
"""

from __future__ import annotations

import json
from typing import Any

from pdserve.router.openai.params import OpenAIRequestError
from pdserve.router.openai.tools import ToolSpec

TOOLS_SECTION = (
    "# Tools\n\nYou can call these functions (JSON schemas):\n{tools}\n\n"
    'To call a function, reply with only a JSON object {{"name": <function name>, "arguments": '
    "<arguments object>}}, or a JSON array of such objects to call several; otherwise reply normally."
)


def tool_message_fields(msg: dict[str, Any], i: int) -> dict[str, Any]:
    """The tool fields of message i (assistant `tool_calls`, tool `tool_call_id`), validated."""
    out: dict[str, Any] = {}
    if msg.get("role") == "tool":
        call_id = msg.get("tool_call_id")
        if call_id is not None and not isinstance(call_id, str):
            raise OpenAIRequestError(f"messages[{i}].tool_call_id must be a string.", "messages")
        out["tool_call_id"] = call_id or ""
        if isinstance(msg.get("name"), str):
            out["name"] = msg["name"]
    calls = msg.get("tool_calls")
    if calls:
        if msg.get("role") != "assistant" or not isinstance(calls, list):
            raise OpenAIRequestError(
                f"messages[{i}].tool_calls: only assistant messages hold a list of calls.", "messages"
            )
        out["tool_calls"] = [_history_call(c, i) for c in calls]
    if msg.get("function_call"):
        raise OpenAIRequestError(f"messages[{i}].function_call is deprecated; use tool_calls.", "messages")
    return out


def _history_call(call: Any, i: int) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise OpenAIRequestError(f"messages[{i}].tool_calls: each call needs function.name.", "messages")
    arguments = fn.get("arguments") or "{}"
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            raise OpenAIRequestError(
                f"messages[{i}].tool_calls: function.arguments must be a JSON object string.", "messages"
            ) from None
    return {
        "id": call.get("id") or "",
        "type": "function",
        "function": {"name": fn["name"], "arguments": arguments},
    }


def template_knows_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template  # type: ignore[operator]


def prompt_inputs(
    messages: list[dict[str, Any]], spec: ToolSpec | None, template: str | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) to render: unchanged for a tool-aware template, else the default."""
    offered = spec.tools if spec is not None and spec.calls_allowed else None
    if template_knows_tools(template):
        return messages, offered
    has_tool_turns = any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
    if offered is None and not has_tool_turns:
        return messages, None
    out = [_plain_message(m, messages) for m in messages]
    if offered is not None:
        section = TOOLS_SECTION.format(tools="\n".join(json.dumps(t) for t in offered))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{section}"}
        else:
            out.insert(0, {"role": "system", "content": section})
    return out, None


def _plain_message(msg: dict[str, Any], history: list[dict[str, Any]]) -> dict[str, Any]:
    if msg["role"] == "tool":
        name = msg.get("name") or _called_name(history, msg.get("tool_call_id", ""))
        label = f"the function {name}" if name else "a function"
        return {"role": "user", "content": f"Result of {label}:\n{msg['content']}"}
    if msg.get("tool_calls"):
        calls = [
            {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
            for c in msg["tool_calls"]
        ]
        text = json.dumps(calls[0] if len(calls) == 1 else calls)
        return {"role": "assistant", "content": f"{msg['content']}\n{text}" if msg["content"] else text}
    return {"role": msg["role"], "content": msg["content"]}


def _called_name(history: list[dict[str, Any]], call_id: str) -> str | None:
    for m in history:
        for c in m.get("tool_calls") or []:
            if call_id and c["id"] == call_id:
                return c["function"]["name"]
    return None
