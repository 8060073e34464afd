"""Tool-call formats by `--tool-call-parser` name: one module per model family (see each docstring).

`call_format(name)` raises ValueError naming the choices; `format_for_template(template)` guesses
the format a tool-aware chat template asks its model to write, by the markers it mentions.

May import: nothing of pdserve outside router/text/tool_formats; never aiohttp.
"""

from __future__ import annotations

from pdserve.router.text.tool_formats.base import CallFormat
from pdserve.router.text.tool_formats.hermes import HERMES
from pdserve.router.text.tool_formats.json_calls import JSON_CALLS
from pdserve.router.text.tool_formats.llama3 import LLAMA3
from pdserve.router.text.tool_formats.mistral import MISTRAL

FORMATS: dict[str, CallFormat] = {
    "hermes": HERMES,
    "qwen25": HERMES,  # SGLang's names for the same <tool_call> format
    "qwen": HERMES,
    "qwen3": HERMES,
    "llama3": LLAMA3,
    "mistral": MISTRAL,
    "json": JSON_CALLS,
}


def call_format(name: str) -> CallFormat:
    if name not in FORMATS:
        raise ValueError(f"unknown tool-call parser {name!r}; choose one of {', '.join(FORMATS)}")
    return FORMATS[name]


def format_for_template(template: str | None) -> CallFormat:
    """The format whose start marker the template writes; the default JSON format otherwise."""
    for fmt in (HERMES, LLAMA3, MISTRAL):
        if template and fmt.start and fmt.start in template:
            return fmt
    return JSON_CALLS
