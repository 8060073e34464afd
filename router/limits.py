"""Request limits: body size (413), JSON well-formedness and shape (400), batch size (400).

Rules:
- a body larger than `--max-body-bytes` is refused with 413 before it is parsed: at once when its
  Content-Length says so (the `body_limit_middleware`), else while reading (aiohttp's
  `client_max_size`, set to the same limit by the app);
- a body that is empty, not UTF-8 or not JSON is 400 "Malformed JSON body: ...";
- `http_error(status, message)` is the one way handlers refuse: the error middleware turns it into
  the OpenAI error shape (router/errors.py).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from pdserve.router.errors import STATUS_TYPES
from pdserve.router.generation import GenerationError

MAX_BODY_KEY = web.AppKey("pdserve_max_body_bytes", int)


def http_error(status: int, message: str) -> GenerationError:
    return GenerationError(status, message, STATUS_TYPES.get(status, "Error"))


def too_large(limit: int) -> GenerationError:
    return http_error(
        413, f"The request body exceeds the router's limit of {limit} bytes (--max-body-bytes)."
    )


async def read_json(request: web.Request) -> Any:
    """The parsed JSON body; http_error 413 or 400 as the module docstring says."""
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large(request.app[MAX_BODY_KEY]) from None
    if not body.strip():
        raise http_error(400, "Malformed JSON body: the request body is empty.")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise http_error(400, f"Malformed JSON body: {exc}") from None


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
