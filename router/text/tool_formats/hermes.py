"""Hermes / Qwen 2.5 / Qwen 3: each call in its own tags, text may come before and after.

Let me check.<tool_call>
{"name": "get_weather", "arguments": {"city": "Paris"}}
</tool_call>
"""

from pdserve.router.text.tool_formats.base import CallFormat

HERMES = CallFormat(name="hermes", start="<tool_call>", end="</tool_call>")
