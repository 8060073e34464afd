"""Errors in the OpenAI shape, for every route of the router (native ones too, like SGLang).

    {"object": "error", "message": "...", "type": "BadRequestError", "param": null, "code": 400}

SGLang answers this shape; the official `openai` client reads `message` from it. `type` is named
after the `openai` package's exception class for the status where it has one (BadRequestError,
ConflictError, UnprocessableEntityError, ...), else after the HTTP reason phrase; a status without
an entry falls back to the class of its range, so no answer ever says just "Error".
"""

from __future__ import annotations

from aiohttp import web

STATUS_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    408: "RequestTimeoutError",
    409: "ConflictError",
    413: "RequestTooLargeError",
    415: "UnsupportedMediaTypeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    499: "ClientClosedRequestError",  # nginx's code for a client that left; counted, never sent
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "TimeoutError",
}


def error_type(status: int) -> str:
    """The OpenAI-style error type of an HTTP status (the `openai` client's classes for 4xx/5xx)."""
    if status in STATUS_TYPES:
        return STATUS_TYPES[status]
    return "InternalServerError" if status >= 500 else "BadRequestError"


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
