"""Llama 3.1 / 3.2 / 3.3 JSON tool calls: `parameters` (or `arguments`), after `<|python_tag|>` or
as the whole output; several calls joined by `;`.

    <|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}
    {"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": 1}}
"""

from pdserve.router.text.tool_formats.base import CallFormat

LLAMA3 = CallFormat(name="llama3", start="<|python_tag|>", bare_start=True, separator=";")
