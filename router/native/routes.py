"""SGLang's native HTTP API on the router: every route of the seeds, same paths and methods."""

from __future__ import annotations

from aiohttp import web

from pdserve.router.native.admin import handle_abort_request, handle_flush_cache, handle_update_weights
from pdserve.router.native.classify import handle_classify
from pdserve.router.native.encode import handle_encode
from pdserve.router.native.generate import handle_generate
from pdserve.router.native.info import (
    handle_get_load,
    handle_health,
    handle_health_generate,
    handle_metrics,
    handle_model_info,
    handle_server_info,
)
from pdserve.router.native.text_parsers import handle_parse_function_call, handle_separate_reasoning
from pdserve.router.native.tokenize import handle_detokenize, handle_tokenize
from pdserve.router.native.unsupported import add_unsupported_routes


def add_native_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/generate", handle_generate)
    r.add_put("/generate", handle_generate)
    r.add_post("/encode", handle_encode)
    r.add_put("/encode", handle_encode)
    r.add_post("/classify", handle_classify)
    r.add_put("/classify", handle_classify)
    r.add_get("/get_model_info", handle_model_info)
    r.add_get("/get_server_info", handle_server_info)
    r.add_get("/server_info", handle_server_info)
    r.add_get("/health", handle_health)
    r.add_get("/health_generate", handle_health_generate)
    r.add_get("/get_load", handle_get_load)
    r.add_get("/metrics", handle_metrics)
    r.add_route("GET", "/flush_cache", handle_flush_cache)
    r.add_route("POST", "/flush_cache", handle_flush_cache)
    r.add_post("/update_weights_from_disk", handle_update_weights)
    r.add_post("/update_weights", handle_update_weights)  # the seeds' older name, same handler
    r.add_post("/abort_request", handle_abort_request)
    for prefix in ("", "/v1"):
        r.add_post(f"{prefix}/tokenize", handle_tokenize)
        r.add_post(f"{prefix}/detokenize", handle_detokenize)
    r.add_post("/separate_reasoning", handle_separate_reasoning)
    r.add_post("/parse_function_call", handle_parse_function_call)
    add_unsupported_routes(app)
