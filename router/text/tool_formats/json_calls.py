"""The default format: the whole reply is one JSON call object or a JSON array of them.

It is what router/openai/tool_template.py asks for when the model's chat template has no tool
section, and what constrained decoding writes for `tool_choice` "required" or a named function:

    {"name": "get_weather", "arguments": {"city": "Paris"}}
    [{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": 1}}]
"""

from pdserve.router.text.tool_formats.base import CallFormat

JSON_CALLS = CallFormat(name="json", start=None, bare_start=True)
