"""OpenAI's `response_format` and SGLang's constrained-decoding extras, as sampling parameters.

The grammar fields of the sampling params are the one way a request is constrained end to end (the
workers compile and enforce them, shared/engine/grammar.py), so every OpenAI form maps onto the
native fields:
- `{"type": "text"}` or absent: no constraint;
- `{"type": "json_object"}`: `json_schema` `{"type": "object"}` (any JSON object, as SGLang does);
- `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`: the schema's JSON. The
  grammar is always strict (xgrammar's strict mode: no properties the schema does not name), which
  is what `strict: true` asks and a subset of what `strict: false` allows.
- `{"type": "structural_tag", "structures": [{"begin", "schema", "end"}], "triggers": [...]}` or
  xgrammar's newer `{"type": "structural_tag", "format": {...}}`: `structural_tag`, the whole
  object as JSON, as SGLang forwards it (shared/engine/structural_tag.py reads both shapes; here
  only the outer shape is checked, so the error names `response_format`).
- SGLang's extra body fields `regex`, `json_schema`, `ebnf` and `structural_tag` (strings) pass
  through as they are.
At most one of these per request.
"""

from __future__ import annotations

import json
from typing import Any

from pdserve.router.openai.params import OpenAIRequestError

GRAMMAR_EXTRAS = ("regex", "json_schema", "ebnf", "structural_tag")
JSON_OBJECT_SCHEMA = '{"type": "object"}'


def constraint_from_body(body: dict) -> dict[str, str]:
    """The constrained-decoding sampling params of an OpenAI body (empty for a free request)."""
    found: dict[str, str] = {}
    for name in GRAMMAR_EXTRAS:
        value = body.get(name)
        if value is not None:
            if not isinstance(value, str):
                raise OpenAIRequestError(f"{name} must be a string, got {type(value).__name__}.", name)
            found[name] = value
    constraint = _response_format_constraint(body.get("response_format"))
    if constraint is not None:
        if found:
            raise OpenAIRequestError(
                f"response_format cannot be combined with {', '.join(found)}.", "response_format"
            )
        found[constraint[0]] = constraint[1]
    if len(found) > 1:
        raise OpenAIRequestError(
            f"Only one of regex, json_schema, ebnf and structural_tag may be set, got {', '.join(found)}.",
            next(iter(found)),
        )
    return found


def _response_format_constraint(fmt: Any) -> tuple[str, str] | None:
    """(sampling param, its value) for a response_format, None for free text."""
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "structural_tag":
        shaped = isinstance(fmt.get("format"), dict) or (
            isinstance(fmt.get("structures"), list) and isinstance(fmt.get("triggers"), list)
        )
        if not shaped:
            raise OpenAIRequestError(
                "response_format structural_tag needs a 'format' object, or 'structures' and 'triggers' lists.",
                "response_format",
            )
        return "structural_tag", json.dumps(fmt)
    schema = _response_format_schema(fmt)
    return None if schema is None else ("json_schema", schema)


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
            "response_format type must be 'text', 'json_object', 'json_schema' or 'structural_tag', "
            f"got {kind or fmt!r}.",
            "response_format",
        )
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise OpenAIRequestError(
            "response_format json_schema must be an object with a 'schema' object.", "response_format"
        )
    if not isinstance(spec.get("strict", False), (bool, type(None))):
        raise OpenAIRequestError("response_format json_schema.strict must be a boolean.", "response_format")
    # OpenAI lets `schema` be absent (any JSON); an empty schema compiles to any JSON value. Keys
    # keep their order: it is the order the grammar makes the model write the properties in.
    return json.dumps(spec.get("schema") or {})
