"""A chat choice's output text -> the assistant message: reasoning, content and tool calls.

Rules:
- `OutputPlan` says what to look for in a request's output: reasoning (the router's
  `--reasoning-parser`, unless the request sets `separate_reasoning: false` or
  `chat_template_kwargs.enable_thinking: false`) and tool calls (when tools are offered and
  tool_choice is not "none": a forced choice's bare JSON, else `--tool-call-parser`, else the format
  the tool-aware template names, else the default JSON format).
- Reasoning is split first; tool calls are parsed in what follows it.
- Non-streaming: `message.content` is the text outside reasoning and calls, null when empty and
  something else was found; `tool_calls` carry `call_...` ids and `arguments` JSON strings; a
  choice that called a tool and stopped finishes with "tool_calls".
- Streaming: `ChoiceDeltas` re-reads the whole text so far at each event (router/text's analyses
  hold back what is undecided) and sends only what is new, so that the deltas assemble to the
  non-streaming message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pdserve.router.openai.protocol import ChatRequest
from pdserve.router.openai.tool_template import template_knows_tools
from pdserve.router.text.reasoning_parser import ReasoningFormat, analyze_reasoning
from pdserve.router.text.tool_call_parser import (
    ToolCallAnalysis,
    ToolCallStream,
    analyze_tool_calls,
    tool_call_dicts,
)
from pdserve.router.text.tool_formats import JSON_CALLS, CallFormat, format_for_template


@dataclass(frozen=True)
class OutputPlan:
    reasoning: ReasoningFormat | None = None
    tool_format: CallFormat | None = None
    tool_names: frozenset[str] | None = None

    @property
    def active(self) -> bool:
        return self.reasoning is not None or self.tool_format is not None


def output_plan(
    req: ChatRequest, reasoning: ReasoningFormat | None, tool_format: CallFormat | None, template: str | None
) -> OutputPlan:
    if not req.separate_reasoning or req.chat_template_kwargs.get("enable_thinking") is False:
        reasoning = None
    spec = req.tools
    if spec is None or not spec.calls_allowed:
        return OutputPlan(reasoning)
    if spec.forced:
        fmt = JSON_CALLS
    elif tool_format is not None:
        fmt = tool_format
    else:
        fmt = format_for_template(template) if template_knows_tools(template) else JSON_CALLS
    return OutputPlan(reasoning, fmt, frozenset(spec.names))


def _analyses(plan: OutputPlan, text: str, final: bool) -> tuple[str | None, bool, ToolCallAnalysis]:
    reasoning, in_reasoning = None, False
    if plan.reasoning is not None:
        split = analyze_reasoning(text, plan.reasoning, final)
        reasoning, in_reasoning, text = split.reasoning, split.in_reasoning, split.content
    if plan.tool_format is None:
        return reasoning, in_reasoning, ToolCallAnalysis(text)
    return reasoning, in_reasoning, analyze_tool_calls(text, plan.tool_format, plan.tool_names, final)


def chat_message(plan: OutputPlan, text: str) -> dict[str, Any]:
    """The assistant message of a finished choice."""
    reasoning, in_reasoning, analysis = _analyses(plan, text, final=True)
    content: str | None = analysis.content
    if not content and (analysis.calls or in_reasoning):
        content = None
    return {
        "role": "assistant",
        "content": content,
        "reasoning_content": reasoning if in_reasoning else None,
        "tool_calls": tool_call_dicts(analysis.calls) if analysis.calls else None,
    }


def finish_with_calls(reason: dict[str, Any] | None, called: bool) -> dict[str, Any] | None:
    """A choice that called a tool and stopped finishes with "tool_calls"."""
    if called and reason is not None and reason.get("type") == "stop":
        return {**reason, "type": "tool_calls"}
    return reason


class ChoiceDeltas:
    """One streamed choice: its whole text so far -> the new part of its message."""

    def __init__(self, plan: OutputPlan):
        self.plan = plan
        self.reasoning_sent = 0
        self.tools = ToolCallStream()

    def delta(self, text: str, final: bool) -> dict[str, Any]:
        reasoning, _, analysis = _analyses(self.plan, text, final)
        delta: dict[str, Any] = {}
        if reasoning is not None and len(reasoning) > self.reasoning_sent:
            delta["reasoning_content"] = reasoning[self.reasoning_sent :]
            self.reasoning_sent = len(reasoning)
        content, calls = self.tools.deltas(analysis)
        if content:
            delta["content"] = content
        if calls:
            delta["tool_calls"] = calls
        return delta
