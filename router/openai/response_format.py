"""OpenAI's `response_format` and SGLang's constrained-decoding extras, as sampling parameters.

`json_schema` in the sampling params is the one way a request is constrained end to end (the
workers compile and enforce it, shared/engine/grammar.py), so every OpenAI form maps onto the three
native fields:
- `{"type": "text"}` or absent: no constraint;
- `{"type": "json_object"}`: `json_schema` `{"type": "object"}` (any JSON object, as SGLang does);
- `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`: the schema's JSON. The
  grammar is always strict (xgrammar's strict mode: no properties the schema does not name), which
  is what `strict: true` asks and a subset of what `strict: false` allows.
- SGLang's extra body fields `regex`, `json_schema` (a string) and `ebnf` pass through as they are.
At most one of these per request; `structural_tag` is refused by name.
"""

from __future__ import annotations

import json
from typing import Any

from pdserve.router.openai.params import OpenAIRequestError

GRAMMAR_EXTRAS = ("regex", "json_schema", "ebnf")
JSON_OBJECT_SCHEMA = '{"type": "object"}'


def constraint_from_body(body: dict) -> dict[str, str]:
    """The constrained-decoding sampling params of an OpenAI body (empty for a free request)."""
    if body.get("structural_tag") is not None:
        raise OpenAIRequestError(
            "structural_tag (constrained decoding) is not supported yet by pdserve.", "structural_tag"
        )
    found: dict[str, str] = {}
    for name in GRAMMAR_EXTRAS:
        value = body.get(name)
        if value is not None:
            if not isinstance(value, str):
                raise OpenAIRequestError(f"{name} must be a string, got {type(value).__name__}.", name)
            found[name] = value
    schema = _response_format_schema(body.get("response_format"))
    if schema is not None:
        if found:
            raise OpenAIRequestError(
                f"response_format cannot be combined with {', '.join(found)}.", "response_format"
            )
        found["json_schema"] = schema
    if len(found) > 1:
        raise OpenAIRequestError(
            f"Only one of regex, json_schema and ebnf may be set, got {', '.join(found)}.", next(iter(found))
        )
    return found


def _response_format_schema(fmt: Any) -> str | None:
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_OBJECT_SCHEMA
    if kind != "json_schema":
        raise OpenAIRequestError(
            f"response_format type must be 'text', 'json_object' or 'json_schema', got {kind or fmt!r}.",
            "response_format",
        )
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise OpenAIRequestError(
            "response_format json_schema must be an object with a 'schema' object.", "response_format"
        )
    if not isinstance(spec.get("strict", False), (bool, type(None))):
        raise OpenAIRequestError("response_format json_schema.strict must be a boolean.", "response_format")
    # OpenAI lets `schema` be absent (any JSON); an empty schema compiles to any JSON value.
    return json.dumps(spec.get("schema") or {}, sort_keys=True)
