"""Errors in the OpenAI shape, for every route of the router (native ones too, like SGLang).

    {"object": "error", "message": "...", "type": "BadRequestError", "param": null, "code": 400}

SGLang answers this shape; the official `openai` client reads `message` from it. `type` is
`error_type(status)`, named as router/serving/generator_api.py says (the table lives there, beside
the GenerationError that carries a type up to this layer).
"""

from __future__ import annotations

from aiohttp import web

from pdserve.router.serving.generator_api import error_type


def error_body(status: int, message: str, err_type: str | None = None, param: str | None = None) -> dict:
    return {
        "object": "error",
        "message": message,
        "type": err_type or error_type(status),
        "param": param,
        "code": status,
    }


def error_response(
    status: int,
    message: str,
    err_type: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,  # e.g. the Retry-After of a 429
) -> web.Response:
    return web.json_response(error_body(status, message, err_type, param), status=status, headers=headers)
