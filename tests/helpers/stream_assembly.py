"""Assembling streamed chat deltas (OpenAI `delta.content`, `delta.reasoning_content`,
`delta.tool_calls`) into the message a non-streaming answer would hold."""

from __future__ import annotations

from typing import Any


def assemble_deltas(deltas: list[dict[str, Any]]) -> dict[str, Any]:
    """`{"content", "reasoning_content", "tool_calls"}` as the non-streaming message has them
    (None where nothing came); tool-call ids are kept as streamed."""
    content, reasoning = [], []
    calls: list[dict[str, Any]] = []
    for delta in deltas:
        content.append(delta.get("content") or "")
        reasoning.append(delta.get("reasoning_content") or "")
        for entry in delta.get("tool_calls") or []:
            index = entry["index"]
            if index == len(calls):
                assert entry["id"].startswith("call_") and entry["function"]["name"], entry
                calls.append(
                    {"id": entry["id"], "type": "function", "function": {"name": "", "arguments": ""}}
                )
            assert index < len(calls), entry
            fn = entry.get("function") or {}
            calls[index]["function"]["name"] += fn.get("name") or ""
            calls[index]["function"]["arguments"] += fn.get("arguments") or ""
    return {
        "content": "".join(content) or None,
        "reasoning_content": "".join(reasoning) or None,
        "tool_calls": calls or None,
    }


def without_ids(message: dict[str, Any]) -> dict[str, Any]:
    calls = message.get("tool_calls")
    return {
        "content": message.get("content") or None,
        "reasoning_content": message.get("reasoning_content"),
        "tool_calls": [c["function"] for c in calls] if calls else None,
    }
