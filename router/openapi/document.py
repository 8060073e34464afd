"""The OpenAPI 3.1 document of the router, built from its registered routes and request models.

    curl localhost:30000/openapi.json      # the document (no API key needed)
    curl localhost:30000/docs              # the same, as a plain HTML page (router/openapi/docs_page.py)
    doc = openapi_document(app)            # in tests: the dict itself

Rules:
- every route the app registers appears with every method it has: the document walks
  `app.router` when asked, so a route added anywhere is listed without an edit here (the HEAD
  aiohttp adds beside each GET is left out, as other servers' documents do);
- a path's parameters come from its aiohttp pattern (`/v1/models/{model:.+}` -> `{model}`);
- request bodies come from router/openapi/schemas.py (`REQUEST_BODIES` says which route takes
  which); a route without an entry documents no body (its handler takes none or an optional one);
- every operation lists its success and the router's error shape for 4xx and 5xx answers;
- the summary of an operation is the first line of its handler's docstring, when it has one.
`add_openapi_routes(app)` registers GET /openapi.json and GET /docs; router/http/auth.py leaves them open.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

from aiohttp import web

from pdserve.router.openapi.schemas import component_schemas

TITLE = "pdserve router"
# path -> the schema of its JSON body, for every method of the path that takes one (POST, PUT)
REQUEST_BODIES = {
    "/generate": "GenerateRequest",
    "/v1/completions": "CompletionRequest",
    "/v1/chat/completions": "ChatCompletionRequest",
    "/invocations": "ChatCompletionRequest",  # SageMaker's route to the chat handler
    "/v1/embeddings": "EmbeddingRequest",
    "/encode": "EncodeRequest",
    "/tokenize": "TokenizeRequest",
    "/v1/tokenize": "TokenizeRequest",
    "/detokenize": "DetokenizeRequest",
    "/v1/detokenize": "DetokenizeRequest",
    "/abort_request": "AbortRequest",
    "/update_weights_from_disk": "UpdateWeightsFromDiskRequest",
    "/update_weights": "UpdateWeightsFromDiskRequest",
    "/separate_reasoning": "SeparateReasoningRequest",
    "/parse_function_call": "ParseFunctionCallRequest",
}
# query parameters read by handlers (request.query), per path
QUERY_PARAMETERS = {
    "/flush_cache": [
        {
            "name": "timeout",
            "in": "query",
            "required": False,
            "description": "Seconds to retry while requests run (default 0).",
            "schema": {"type": "number", "minimum": 0},
        }
    ],
}
_BODY_METHODS = ("POST", "PUT")
_PATTERN = re.compile(r"\{(\w+)(?::[^}]*)?\}")  # aiohttp's {name} or {name:regex}


def _tag(path: str) -> str:
    return "openai" if path.startswith("/v1/") else "native"


def _summary(handler: Any) -> str:
    doc = inspect.getdoc(handler) or ""
    return doc.splitlines()[0] if doc else ""


def _error_response(what: str) -> dict[str, Any]:
    return {
        "description": what,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
    }


def _operation(path: str, method: str, handler: Any) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": f"{method.lower()}_{re.sub(r'[^A-Za-z0-9]+', '_', path).strip('_') or 'root'}",
        "tags": [_tag(path)],
        "responses": {
            "200": {"description": "Success."},
            "4XX": _error_response("The request was refused; `message` says why."),
            "5XX": _error_response("No worker could serve the request, or an internal error."),
        },
    }
    summary = _summary(handler)
    if summary:
        op["summary"] = summary
    names = _PATTERN.findall(path)
    params = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in names]
    params += QUERY_PARAMETERS.get(path, [])
    if params:
        op["parameters"] = params
    body = REQUEST_BODIES.get(path)
    if body is not None and method in _BODY_METHODS:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}},
        }
    return op


def registered_routes(app: web.Application) -> list[tuple[str, str, Any]]:
    """(path pattern, method, handler) of every route of `app`, the automatic HEADs left out."""
    routes = []
    for route in app.router.routes():
        resource = route.resource
        if resource is None or route.method == "HEAD":
            continue
        routes.append((resource.canonical, route.method, route.handler))
    return routes


def openapi_document(app: web.Application) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for pattern, method, handler in registered_routes(app):
        path = _PATTERN.sub(r"{\1}", pattern)
        methods = ("GET", "POST", "PUT", "DELETE", "PATCH") if method == "*" else (method,)
        for m in methods:
            paths.setdefault(path, {})[m.lower()] = _operation(path, m, handler)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": TITLE,
            "version": _version(),
            "description": "SGLang's native API and the OpenAI API, served by the pdserve router.",
        },
        "paths": dict(sorted(paths.items())),
        # a bearer key where the router was started with --api-key; none otherwise
        "security": [{}, {"bearer": []}],
        "components": {
            "schemas": component_schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pdserve")
    except PackageNotFoundError:
        return "0"


async def handle_openapi(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 document of this router."""
    return web.json_response(openapi_document(request.app))


async def handle_docs(request: web.Request) -> web.Response:
    """The OpenAPI document as an HTML page."""
    from pdserve.router.openapi.docs_page import render_docs

    return web.Response(text=render_docs(openapi_document(request.app)), content_type="text/html")


def add_openapi_routes(app: web.Application) -> None:
    app.router.add_get("/openapi.json", handle_openapi)
    app.router.add_get("/docs", handle_docs)
