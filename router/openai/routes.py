"""The OpenAI-compatible routes of the router: `/v1/models`, `/v1/completions`, `/v1/chat/completions`,
`/v1/embeddings`, `/v1/classify`, `/v1/rerank`, `/v1/score`.

Handlers read the router state (`request.app[STATE_KEY]`) at request time, so the routes can be
registered before the state is built.
"""

from __future__ import annotations

from aiohttp import web

from pdserve.router.openai.chat import handle_chat_completions
from pdserve.router.openai.classify import handle_classify_v1
from pdserve.router.openai.completions import handle_completions
from pdserve.router.openai.embeddings import handle_embeddings
from pdserve.router.openai.models import handle_list_models, handle_retrieve_model
from pdserve.router.openai.rerank import handle_rerank
from pdserve.router.openai.score import handle_score


def add_openai_routes(app: web.Application) -> None:
    """Register the OpenAI routes on `app`."""
    app.router.add_get("/v1/models", handle_list_models)
    app.router.add_get("/v1/models/{model:.+}", handle_retrieve_model)
    app.router.add_post("/v1/completions", handle_completions)
    app.router.add_post("/v1/chat/completions", handle_chat_completions)
    app.router.add_post("/v1/embeddings", handle_embeddings)
    app.router.add_post("/v1/classify", handle_classify_v1)
    app.router.add_post("/v1/rerank", handle_rerank)
    app.router.add_put("/v1/rerank", handle_rerank)
    app.router.add_post("/v1/score", handle_score)
