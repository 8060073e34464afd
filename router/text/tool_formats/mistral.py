"""Mistral (7B v0.3, Nemo): one JSON array of calls after `[TOOL_CALLS]`.

[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]
"""

from pdserve.router.text.tool_formats.base import CallFormat

MISTRAL = CallFormat(name="mistral", start="[TOOL_CALLS]")
