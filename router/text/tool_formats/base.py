"""What a tool-call format is: markers around JSON call objects (router/text/tool_call_parser.py
reads every format through this one description)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CallFormat:
    """Calls are JSON objects `{"name": ..., "arguments" | "parameters": {...}}`, alone or in a
    JSON array, after `start` (and before `end` when the format closes them).

    `bare_start`: a call block may also open the output with no marker (its first non-blank
    character is `{` or `[`). `separator`: what may join several objects of one block outside an
    array (Llama 3's `;`).
    """

    name: str
    start: str | None
    end: str | None = None
    bare_start: bool = False
    separator: str | None = None
    args_keys: tuple[str, ...] = ("arguments", "parameters")
