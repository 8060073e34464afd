"""HTTP middlewares other than auth and limits: metrics per route and code, errors in one shape.

Order on the app (outermost first): metrics, errors, auth, body limit. So every answer is counted,
including refusals; a request without the key is 401 before its size is looked at (a 413 would
answer an unauthenticated client); every refusal is in the OpenAI error shape (router/http/errors.py);
aiohttp's own 404/405 become that shape too; an unexpected exception is logged and answered 500 without a
traceback; a client that disconnected (handler cancelled) is counted as 499 like nginx does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from pdserve.router.http.errors import error_response
from pdserve.router.serving.generator_api import GenerationError
from pdserve.router.serving.metrics import RouterMetrics

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
METRICS_KEY = web.AppKey("pdserve_router_metrics", RouterMetrics)
CLIENT_CLOSED = 499


def route_label(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "other"


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    metrics = request.app[METRICS_KEY]
    code = 500
    try:
        resp = await handler(request)
        code = resp.status
        return resp
    except asyncio.CancelledError:
        code = CLIENT_CLOSED
        raise
    except web.HTTPException as exc:
        code = exc.status
        raise
    finally:
        metrics.observe_http(route_label(request), code)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except GenerationError as exc:
        return error_response(exc.status, exc.message, exc.err_type, headers=exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 404:
            message = f"Not found: {request.method} {request.path}"
        elif exc.status == 405:
            message = f"Method {request.method} is not allowed on {request.path}."
        else:
            message = exc.text or exc.reason
        return error_response(exc.status, message)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:  # a bug must not kill the connection without an answer
        logger.exception("%s %s failed", request.method, request.path)
        return error_response(500, f"Internal error in the router: {type(exc).__name__}")
