"""Errors in the OpenAI shape, for every route of the router (native ones too, like SGLang).

    {"object": "error", "message": "...", "type": "BadRequestError", "param": null, "code": 400}

SGLang answers this shape; the official `openai` client reads `message` from it.
"""

from __future__ import annotations

from aiohttp import web

STATUS_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    413: "RequestTooLargeError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
    504: "TimeoutError",
}


def error_body(status: int, message: str, err_type: str | None = None, param: str | None = None) -> dict:
    return {
        "object": "error",
        "message": message,
        "type": err_type or STATUS_TYPES.get(status, "Error"),
        "param": param,
        "code": status,
    }


def error_response(
    status: int, message: str, err_type: str | None = None, param: str | None = None
) -> web.Response:
    return web.json_response(error_body(status, message, err_type, param), status=status)
