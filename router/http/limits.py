"""Request limits: body size (413), content type (415), JSON well-formedness and shape (400), batch
size (400).

Rules:
- a body larger than `--max-body-bytes` is refused with 413 before it is parsed: at once when its
  Content-Length says so (the `body_limit_middleware`), else while reading (aiohttp's
  `client_max_size`, set to the same limit by the app);
- the body is read as JSON only when the Content-Type header is absent (or empty), or is
  `application/json` or `application/<anything>+json`, parameters such as `; charset=utf-8` allowed:
  FastAPI's rule, so SGLang answers the same bodies; any other type is 415 before the body is read;
- a body that is empty, not UTF-8 or not JSON is 400 "Malformed JSON body: ...", and so is JSON
  nested deeper than MAX_JSON_DEPTH (the parser's own recursion limit would otherwise be a 500, and
  everything that walks the body later, from error messages to msgpack, is safe below it);
- `http_error(status, message)` is the one way handlers refuse: the error middleware turns it into
  the OpenAI error shape (router/http/errors.py).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from pdserve.router.serving.generator_api import GenerationError, error_type

MAX_BODY_KEY = web.AppKey("pdserve_max_body_bytes", int)
# Real bodies nest a few levels (chat content parts, a JSON schema a few more); msgpack refuses
# 512 levels and Python's recursion limit is 1,000, so 64 is generous and safe for every walker.
MAX_JSON_DEPTH = 64


def http_error(status: int, message: str) -> GenerationError:
    return GenerationError(status, message, error_type(status))


def is_json_content_type(header: str | None) -> bool:
    """Whether a Content-Type header lets the body be read as JSON (FastAPI's rule, see above)."""
    if not header or not header.strip():
        return True
    media_type = header.split(";", 1)[0].strip().lower()
    main, _, sub = media_type.partition("/")
    return main == "application" and (sub == "json" or sub.endswith("+json"))


def json_too_deep(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether lists/objects nest more than `limit` levels in `value` (walked without recursion)."""
    stack = [(value, 1)] if isinstance(value, (list, dict)) else []
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, (list, dict)))
    return False


def too_large(limit: int) -> GenerationError:
    return http_error(
        413, f"The request body exceeds the router's limit of {limit} bytes (--max-body-bytes)."
    )


async def read_json(request: web.Request) -> Any:
    """The parsed JSON body; http_error 413, 415 or 400 as the module docstring says."""
    content_type = request.headers.get("Content-Type")
    if not is_json_content_type(content_type):
        raise http_error(
            415, f"Unsupported Content-Type {content_type!r:.100}: the body must be JSON (application/json)."
        )
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large(request.app[MAX_BODY_KEY]) from None
    if not body.strip():
        raise http_error(400, "Malformed JSON body: the request body is empty.")
    too_deep = f"Malformed JSON body: nested too deeply (more than {MAX_JSON_DEPTH} levels)."
    try:
        data = json.loads(body)
    except RecursionError:
        raise http_error(400, too_deep) from None
    except ValueError as exc:  # UnicodeDecodeError (not UTF-8) is a ValueError too
        raise http_error(400, f"Malformed JSON body: {exc}") from None
    # Depth is at most the number of brackets: most bodies (one prompt, one id list) skip the walk.
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH and json_too_deep(data):
        raise http_error(400, too_deep)
    return data


async def read_json_object(request: web.Request) -> dict[str, Any]:
    data = await read_json(request)
    if not isinstance(data, dict):
        raise http_error(400, f"The request body must be a JSON object, got {type(data).__name__}.")
    return data


def check_batch_size(size: int, limit: int) -> None:
    if size > limit:
        raise http_error(400, f"The batch has {size} prompts, more than --max-batch-size {limit}.")


@web.middleware
async def body_limit_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    limit = request.app[MAX_BODY_KEY]
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)
    return await handler(request)
