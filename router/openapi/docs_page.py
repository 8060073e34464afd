"""The router's OpenAPI document as one HTML page, rendered on the server (no script, no CDN).

    html = render_docs(openapi_document(app))   # router/openapi/document.py serves it at GET /docs

Rules: every path and method of the document is listed with its summary, parameters and body
schema name; the component schemas follow as indented JSON. All text is HTML-escaped.
"""

from __future__ import annotations

import json
from html import escape
from typing import Any


def _operation_html(path: str, method: str, op: dict[str, Any]) -> str:
    parts = [f"<h3><code>{escape(method.upper())} {escape(path)}</code></h3>"]
    if op.get("summary"):
        parts.append(f"<p>{escape(op['summary'])}</p>")
    for p in op.get("parameters", []):
        parts.append(f"<p>{escape(p['in'])} parameter <code>{escape(p['name'])}</code></p>")
    body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
    if "$ref" in body:
        name = body["$ref"].rsplit("/", 1)[-1]
        parts.append(f'<p>Body: <a href="#schema-{escape(name)}">{escape(name)}</a></p>')
    return "\n".join(parts)


def render_docs(document: dict[str, Any]) -> str:
    info = document["info"]
    ops = [
        _operation_html(path, method, op)
        for path, methods in document["paths"].items()
        for method, op in methods.items()
    ]
    schemas = [
        f'<h3 id="schema-{escape(name)}">{escape(name)}</h3>\n<pre>{escape(json.dumps(schema, indent=2))}</pre>'
        for name, schema in document["components"]["schemas"].items()
    ]
    return "\n".join(
        [
            "<!doctype html>",
            f"<html><head><meta charset='utf-8'><title>{escape(info['title'])}</title></head><body>",
            f"<h1>{escape(info['title'])} {escape(info['version'])}</h1>",
            f"<p>{escape(info.get('description', ''))} As JSON: <a href='/openapi.json'>/openapi.json</a>.</p>",
            "<h2>Routes</h2>",
            *ops,
            "<h2>Schemas</h2>",
            *schemas,
            "</body></html>",
        ]
    )
