"""`GET /v1/models` and `GET /v1/models/{model}`: the one model this router serves.

Generation routes accept any `model` name (SGLang does the same); only the model lookup by name
answers 404 for a name that is not the served one, in OpenAI's words.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from pdserve.router.http.errors import error_response
from pdserve.router.openai.common import router_state


def model_card(model_name: str, model_path: str, context_length: int, created: int) -> dict[str, Any]:
    return {
        "id": model_name,
        "object": "model",
        "created": created,
        "owned_by": "pdserve",
        "root": model_path,
        "max_model_len": context_length,
    }


def _card(request: web.Request) -> dict[str, Any]:
    """The served model's card; 503 (GenerationError) until a worker has told the router what it serves,
    so that clients polling /v1/models for readiness (SGLang's `wait_for_server`) wait long enough."""
    state = router_state(request)
    facts = state.require_ready()
    return model_card(state.model_name, state.model_path, facts.context_length, int(time.time()))


async def handle_list_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_card(request)]})


async def handle_retrieve_model(request: web.Request) -> web.Response:
    card = _card(request)
    name = request.match_info["model"]
    if name != card["id"]:
        return error_response(404, f"The model `{name}` does not exist.", param="model")
    return web.json_response(card)
