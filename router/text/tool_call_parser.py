"""Tool calls in a model's output: what is text, what is a call (name, arguments), as far as known.

    analysis = analyze_tool_calls(text, HERMES, {"get_weather"}, final=True)
    analysis.content, [(c.name, c.arguments) for c in analysis.calls]

Rules (one pure function serves the non-streaming answer, `final=True`, and each streaming step):
- A call is a JSON object with a `name` that is one of the offered tools and an object of
  arguments (the format's `arguments` or `parameters` key; none means `{}`). `arguments` is the
  model's own text of that object, so streamed pieces assemble to exactly the final string.
- Text outside call blocks is the content; blanks next to a block are dropped. A block that is not
  a call (unknown name, arguments not an object, not JSON) stays text. A call cut off by the end
  of the output (`final=True`: max_tokens reached inside it) stays a call, with the arguments
  written so far (not valid JSON; the finish reason says "length"), once its name is whole and
  known, as OpenAI answers and as a stream has already sent it; cut off before that, it stays text.
  The whole calls before it in the same block (an array, calls joined by `;`) count either way.
- While not final, what may still turn into a call is held back: the start of a marker, blanks
  that may precede one, and an unfinished block. An unfinished call shows its name once the name
  is whole and known, and the arguments text seen so far.
- `ToolCallStream` turns successive analyses into OpenAI `delta.tool_calls` entries: per call the
  index, id, type and name first, then arguments pieces; streamed deltas assemble to exactly the
  non-streaming message, also when max_tokens cuts a call.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from pdserve.router.text.json_scan import JsonScanError, scan_object, skip_ws
from pdserve.router.text.tool_formats import CallFormat


@dataclass
class CallView:
    name: str | None  # None until the name is whole and known
    arguments: str  # the arguments object's text so far ("{}" for a finished call without one)
    complete: bool


@dataclass
class ToolCallAnalysis:
    content: str
    calls: list[CallView] = field(default_factory=list)


class _Unfinished(Exception):
    def __init__(self, calls: list[CallView], rest: int):
        self.calls = calls
        self.rest = rest  # where the unfinished part begins


class _NotACall(Exception):
    pass


def analyze_tool_calls(
    text: str, fmt: CallFormat, names: Collection[str] | None, final: bool
) -> ToolCallAnalysis:
    """`names` None accepts any function name."""
    parts: list[str] = []
    calls: list[CallView] = []
    pos = 0
    at_start = fmt.bare_start
    while True:
        k = j = -1
        bare = False
        if at_start:
            at_start = False
            first = skip_ws(text, 0)
            if first == len(text) and not final:
                return ToolCallAnalysis("", calls)  # blanks so far: a block may still open the output
            if first < len(text) and text[first] in "{[":
                k, j, bare = 0, first, True
        if k < 0:
            k = text.find(fmt.start, pos) if fmt.start else -1
            if k < 0:
                parts.append(text[pos:] if final else _held_back(text[pos:], fmt.start))
                return ToolCallAnalysis("".join(parts), calls)
            j = skip_ws(text, k + len(fmt.start or ""))
        before = text[pos:k]
        try:
            block, end = _read_block(text, j, fmt, names, final)
        except _Unfinished as unfinished:
            # at the end, a cut-off call with a known name stays a call; one without is text
            kept = [c for c in unfinished.calls if c.complete or c.name is not None]
            if final and not kept:  # cut off before any name: the block stays text
                parts.append(text[pos:])
                return ToolCallAnalysis("".join(parts), calls)
            if final and kept[-1].complete:  # whole calls, then text that never named a call
                parts.extend((before.rstrip(), text[unfinished.rest :]))
                return ToolCallAnalysis("".join(parts), calls + kept)
            if final:
                parts.append(before.rstrip())
                return ToolCallAnalysis("".join(parts), calls + kept)
            parts.append(before.rstrip())
            return ToolCallAnalysis("".join(parts), calls + unfinished.calls)
        except _NotACall:
            resume = j + 1 if bare else k + len(fmt.start or "")  # look for the next marker after this one
            parts.append(text[pos:resume])
            pos = resume
            continue
        parts.append(before.rstrip())
        calls.extend(block)
        after = skip_ws(text, end)
        if fmt.end:
            if text.startswith(fmt.end, after):
                after += len(fmt.end)
            elif not final and fmt.end.startswith(text[after:]):
                return ToolCallAnalysis("".join(parts), calls)  # its end marker may be on the way
        pos = skip_ws(text, after)


def _held_back(tail: str, marker: str | None) -> str:
    """`tail` without what may still become a call: a marker's beginning and the blanks before."""
    if marker is None:
        return tail
    for n in range(min(len(marker) - 1, len(tail)), 0, -1):
        if tail.endswith(marker[:n]):
            tail = tail[:-n]
            break
    return tail.rstrip()


def _read_block(
    text: str, j: int, fmt: CallFormat, names: Collection[str] | None, final: bool
) -> tuple[list[CallView], int]:
    """The calls of the block at text[j] (an object, objects joined by the separator, or an array)."""
    if j >= len(text):
        raise _Unfinished([], j)
    calls: list[CallView] = []
    if text[j] == "[":
        i = j + 1
        while True:
            i = skip_ws(text, i)
            if i >= len(text):
                raise _Unfinished(calls, i)
            if text[i] == "]" and calls:
                return calls, i + 1
            if text[i] == "," and calls:
                i += 1
                continue
            if text[i] != "{":
                raise _NotACall()
            call, i = _read_call(text, i, fmt, names, calls)
            calls.append(call)
    if text[j] != "{":
        raise _NotACall()
    i = j
    while True:
        call, i = _read_call(text, i, fmt, names, calls)
        calls.append(call)
        if fmt.separator is None:
            return calls, i
        sep = skip_ws(text, i)
        if sep >= len(text) and not final:
            raise _Unfinished(calls, sep)  # a separator and another call may follow
        if sep >= len(text) or text[sep] != fmt.separator:
            return calls, i
        nxt = skip_ws(text, sep + 1)
        if nxt >= len(text) and not final:
            raise _Unfinished(calls, sep)
        if nxt >= len(text) or text[nxt] != "{":
            return calls, sep + 1
        i = nxt


def _read_call(
    text: str, i: int, fmt: CallFormat, names: Collection[str] | None, before: list[CallView]
) -> tuple[CallView, int]:
    try:
        scan = scan_object(text, i)
    except JsonScanError:
        raise _NotACall() from None
    name = None
    if "name" in scan.fields:
        start, end = scan.fields["name"]
        if end is not None:
            try:
                value = json.loads(text[start:end])
            except ValueError:
                raise _NotACall() from None
            if not isinstance(value, str) or (names is not None and value not in names):
                raise _NotACall()
            name = value
    arguments = ""
    key = next((k for k in fmt.args_keys if k in scan.fields), None)
    if key is not None:
        start, end = scan.fields[key]
        if text[start] != "{":
            raise _NotACall()
        arguments = text[start:end] if end is not None else text[start:]
    if scan.end is None:
        raise _Unfinished([*before, CallView(name, arguments, False)], i)
    if name is None:
        raise _NotACall()
    if key is None:
        arguments = "{}"
    try:
        json.loads(arguments)
    except ValueError:
        raise _NotACall() from None
    return CallView(name, arguments, True), scan.end


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_call_dicts(calls: list[CallView]) -> list[dict[str, Any]]:
    """`message.tool_calls` of a finished output."""
    return [
        {"id": new_call_id(), "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in calls
    ]


@dataclass
class _SentCall:
    id: str
    arguments_sent: int = 0


class ToolCallStream:
    """Successive analyses of one growing output -> the new content and `delta.tool_calls` entries."""

    def __init__(self) -> None:
        self.content_sent = 0
        self.sent: list[_SentCall] = []

    def deltas(self, analysis: ToolCallAnalysis) -> tuple[str, list[dict[str, Any]]]:
        content = analysis.content[self.content_sent :]
        self.content_sent = max(self.content_sent, len(analysis.content))
        entries: list[dict[str, Any]] = []
        for index, call in enumerate(analysis.calls):
            if call.name is None:
                break  # calls go out in order: a later one waits for this one's name
            if index == len(self.sent):
                self.sent.append(_SentCall(new_call_id()))
                entries.append(
                    {
                        "index": index,
                        "id": self.sent[index].id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": ""},
                    }
                )
            if index >= len(self.sent):
                break
            sent = self.sent[index]
            piece = call.arguments[sent.arguments_sent :]
            if piece:
                sent.arguments_sent = len(call.arguments)
                entries.append({"index": index, "function": {"arguments": piece}})
        return content, entries

    @property
    def called(self) -> bool:
        return bool(self.sent)
