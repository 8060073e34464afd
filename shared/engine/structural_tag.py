"""A structural tag (SGLang's `structural_tag` sampling parameter): the shapes accepted and the one
canonical form a worker compiles (grammar.py) and caches.

The parameter is the OpenAI `response_format` object itself, as a JSON string (SGLang's routers
forward it so), in one of two shapes:
- legacy: `{"type": "structural_tag", "structures": [{"begin", "schema", "end"}, ...],
  "triggers": [...]}`: free text until a trigger (a prefix of some structure's `begin`), then that
  structure's begin, a JSON value of its schema, its end, then free text again;
- format: `{"type": "structural_tag", "format": {...}}`: any of xgrammar's structural-tag formats
  (`tag`, `triggered_tags`, `sequence`, `json_schema`, `any_text`, ...).
Both become the format shape (a legacy tag as the `triggered_tags` format xgrammar itself converts
it to, each schema's whitespace runs capped as a `json_schema` request's are), written as compact
JSON: the cache key. Only the outer shape is checked here; xgrammar checks the format when it
compiles, and its reason reaches the client as a 400.
"""

from __future__ import annotations

import json
from typing import Any


class StructuralTagError(ValueError):
    """A structural tag of the wrong shape; the message is safe to show a client."""


def check_structural_tag(source: Any) -> dict[str, Any]:
    """The parsed tag; raises StructuralTagError naming what is wrong with its shape."""
    if not isinstance(source, str):
        raise StructuralTagError("structural_tag must be a string (the response_format object as JSON).")
    try:
        tag = json.loads(source)
    except ValueError as exc:
        raise StructuralTagError(f"structural_tag is not valid JSON: {exc}.") from None
    if not isinstance(tag, dict):
        raise StructuralTagError("structural_tag must be a JSON object.")
    if tag.get("type", "structural_tag") != "structural_tag":
        raise StructuralTagError(f'structural_tag\'s type must be "structural_tag", got {tag.get("type")!r}.')
    if "format" in tag:
        if not isinstance(tag["format"], dict):
            raise StructuralTagError("structural_tag's format must be an object.")
        return tag
    structures, triggers = tag.get("structures"), tag.get("triggers")
    if not isinstance(structures, list) or not isinstance(triggers, list):
        raise StructuralTagError(
            'structural_tag needs "format", or "structures" and "triggers" (both lists).'
        )
    for i, item in enumerate(structures):
        ok = (
            isinstance(item, dict) and isinstance(item.get("begin"), str) and isinstance(item.get("end"), str)
        )
        if not ok or not isinstance(item.get("schema"), (dict, bool)):
            raise StructuralTagError(
                f"structural_tag structures[{i}] must have a string begin and end and a schema object."
            )
    if not all(isinstance(t, str) and t for t in triggers):
        raise StructuralTagError("structural_tag's triggers must be non-empty strings.")
    return tag


def canonical_structural_tag(source: str, max_whitespace: int) -> str:
    """The format shape of a checked tag as compact JSON (key order kept: it is the writing order)."""
    tag = check_structural_tag(source)
    if "format" in tag:
        canonical = {"type": "structural_tag", "format": tag["format"]}
    else:
        tags = [
            {
                "type": "tag",
                "begin": item["begin"],
                "content": {
                    "type": "json_schema",
                    "json_schema": item["schema"],
                    "max_whitespace_cnt": max_whitespace,
                },
                "end": item["end"],
            }
            for item in tag["structures"]
        ]
        canonical = {
            "type": "structural_tag",
            "format": {"type": "triggered_tags", "triggers": tag["triggers"], "tags": tags},
        }
    return json.dumps(canonical, separators=(",", ":"))
