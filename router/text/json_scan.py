"""Finding where JSON values end in text that may still be growing (a model's output so far).

The tool-call parsers need positions, not values: where a call object ends, where its `arguments`
value starts and ends, so that the arguments string sent to the client is the model's own text
(streamed piece by piece, it assembles to exactly what the non-streaming answer holds).

Rules:
- Every function returns None for "the text ends before the value does" (more may come) and raises
  `JsonScanError` for text that can never become the value (a stray character).
- Literals (numbers, true, false, null) end at a delimiter; one at the very end of the text is
  unfinished, since more digits may follow.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

WHITESPACE = " \t\r\n"
_LITERAL_END = ",}] \t\r\n"


class JsonScanError(ValueError):
    """The text cannot be the JSON value asked for."""


def skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in WHITESPACE:
        i += 1
    return i


def string_end(text: str, i: int) -> int | None:
    """End (exclusive) of the JSON string whose opening quote is text[i]."""
    j = i + 1
    while j < len(text):
        c = text[j]
        if c == "\\":
            j += 2
            continue
        if c == '"':
            return j + 1
        j += 1
    return None


def value_end(text: str, i: int) -> int | None:
    """End (exclusive) of the JSON value starting at text[i]."""
    c = text[i]
    if c == '"':
        return string_end(text, i)
    if c in "{[":
        return _container_end(text, i)
    j = i
    while j < len(text) and text[j] not in _LITERAL_END:
        j += 1
    if j == i:
        raise JsonScanError(f"no JSON value at {text[i]!r}")
    return j if j < len(text) else None


def _container_end(text: str, i: int) -> int | None:
    closers = []
    j = i
    while j < len(text):
        c = text[j]
        if c == '"':
            end = string_end(text, j)
            if end is None:
                return None
            j = end
            continue
        if c in "{[":
            closers.append("}" if c == "{" else "]")
        elif c in "}]":
            if not closers or closers.pop() != c:
                raise JsonScanError(f"unbalanced {c!r}")
            if not closers:
                return j + 1
        j += 1
    return None


@dataclass
class ObjectScan:
    """A JSON object's top-level fields as (value start, value end or None while unfinished)."""

    end: int | None = None  # exclusive; None: the object is not finished
    fields: dict[str, tuple[int, int | None]] = field(default_factory=dict)


def scan_object(text: str, i: int) -> ObjectScan:
    """The object whose `{` is text[i], as far as the text goes."""

    scan = ObjectScan()
    j = i + 1
    while True:
        j = skip_ws(text, j)
        if j >= len(text):
            return scan
        c = text[j]
        if c == "}":
            scan.end = j + 1
            return scan
        if c == ",":
            j += 1
            continue
        if c != '"':
            raise JsonScanError(f"expected a key at {c!r}")
        key_end = string_end(text, j)
        if key_end is None:
            return scan
        try:
            key = json.loads(text[j:key_end])
        except ValueError:  # a bad escape or a raw control character
            raise JsonScanError("a key that is not a JSON string") from None
        j = skip_ws(text, key_end)
        if j >= len(text):
            return scan
        if text[j] != ":":
            raise JsonScanError("expected ':' after a key")
        j = skip_ws(text, j + 1)
        if j >= len(text):
            return scan
        end = value_end(text, j)
        scan.fields[key] = (j, end)
        if end is None:
            return scan
        j = end
