"""SGLang routes pdserve does not serve (yet): a clear 400 each, never a bare 404.

    curl -X POST localhost:30000/load_lora_adapter -d '{...}'   # 400: "... pdserve has no LoRA support ..."

Each is answered 400 in the OpenAI error shape with the route's name and the reason: features
pdserve does not have (LoRA adapters, sessions, GPU memory release (the message says why on this cluster's device), weight sync over
  torch.distributed, the hierarchical cache's storage backend, deliberate slow-down, file uploads,
  the OpenAI Responses API, Vertex AI's request format). Routes of a model kind (embeddings,
classification, rerank, score, expert-distribution recording) are served, and each answers a model
of another kind with a 400 naming what it needs.
Methods are SGLang's (`api_route(..., methods=[...])` in its http_server.py), PUT included.
"""

from __future__ import annotations

from aiohttp import web

from pdserve.router.http.limits import http_error
from pdserve.router.state import STATE_KEY, RouterState

NO_RESPONSES = "the Responses API is not supported by pdserve yet: use /v1/chat/completions"
GET_POST = ("GET", "POST")
NO_DISTRIBUTED = (
    "pdserve does not update weights over torch.distributed groups; use /update_weights_from_tensor "
    "(a trainer on the workers' host) or /update_weights_from_disk"
)
# path -> (methods, why pdserve does not serve it)
MISSING = {
    "/load_lora_adapter": (
        ("POST",),
        "pdserve has no LoRA support: the served model runs its base weights only",
    ),
    "/unload_lora_adapter": (("POST",), "pdserve has no LoRA support: no adapter is ever loaded"),
    "/open_session": (
        GET_POST,
        (
            "sessions are not supported by pdserve: send the whole conversation with each request "
            "(the prefix cache reuses what earlier requests computed)"
        ),
    ),
    "/close_session": (GET_POST, "sessions are not supported by pdserve: no session is ever open"),
    "/init_weights_update_group": (("POST",), NO_DISTRIBUTED),
    "/destroy_weights_update_group": (("POST",), NO_DISTRIBUTED),
    "/update_weights_from_distributed": (("POST",), NO_DISTRIBUTED),
    "/init_weights_send_group_for_remote_instance": (("POST",), NO_DISTRIBUTED),
    "/send_weights_to_remote_instance": (("POST",), NO_DISTRIBUTED),
    "/clear_hicache_storage_backend": (
        GET_POST,
        (
            "pdserve has no hierarchical cache storage backend (its prefix cache lives in the KV pool; "
            "/flush_cache empties it)"
        ),
    ),
    "/slow_down": (
        GET_POST,
        "not supported by pdserve: workers do not sleep between forward passes on request",
    ),
    "/generate_from_file": (("POST",), "not supported by pdserve: send the prompt to /generate as JSON"),
    "/v1/responses": (("POST",), NO_RESPONSES),
    "/v1/responses/{response_id}": (("GET",), NO_RESPONSES),
    "/v1/responses/{response_id}/cancel": (("POST",), NO_RESPONSES),
    "/vertex_generate": (
        ("POST",),
        "Vertex AI's request format is not supported by pdserve: use /generate or /v1/chat/completions",
    ),
}
MEMORY_PATHS = ("/release_memory_occupation", "/resume_memory_occupation")


def _devices(state: RouterState) -> set[str]:
    return {
        str(h.server_info.args.get("device", "cpu")) for h in state.pool.workers.values() if h.server_info
    }


def _memory_reason(state: RouterState) -> str:
    devices = _devices(state)
    if devices and all(not d.startswith("cuda") for d in devices):
        return (
            f"the workers run on {', '.join(sorted(devices))}: the route releases GPU memory (weights, "
            "KV cache) between RL phases, and there is none to release"
        )
    return (
        "pdserve cannot release GPU memory: its KV pool and CUDA graphs keep fixed device addresses "
        "for the workers' lifetime (SGLang pauses them with torch_memory_saver, which pdserve does not use)"
    )


async def handle_unsupported(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    path = request.match_info.route.resource.canonical
    if path in MEMORY_PATHS:
        raise http_error(400, f"{path} is not supported: {_memory_reason(state)}.")
    raise http_error(400, f"{path}: {MISSING[path][1]}.")


def add_unsupported_routes(app: web.Application) -> None:
    routes = {path: methods for path, (methods, _) in MISSING.items()}
    routes.update({path: GET_POST for path in MEMORY_PATHS})
    for path, methods in routes.items():
        for method in methods:
            app.router.add_route(method, path, handle_unsupported)
