"""Routes of SGLang's native API for model kinds pdserve does not serve yet: a clear 400 each.

`/encode` and `/classify` need an embedding or reward model, `/v1/rerank` a cross-encoder,
`/v1/score` a scoring head, the expert-distribution routes a mixture-of-experts model. The message
names the served model and what it lacks, so a client knows the route exists but not for it.
"""

from __future__ import annotations

from aiohttp import web

from pdserve.router.limits import http_error
from pdserve.router.state import STATE_KEY, RouterState

NEEDS = {
    "/encode": "an embedding model (pdserve serves generation models only so far)",
    "/classify": "a reward / classification model (pdserve serves generation models only so far)",
    "/v1/rerank": "a cross-encoder rerank model (pdserve serves generation models only so far)",
    "/v1/score": "a scoring model (pdserve does not serve /v1/score yet)",
}
EXPERT_PATHS = (
    "/start_expert_distribution_record",
    "/stop_expert_distribution_record",
    "/dump_expert_distribution_record",
)


def _model(state: RouterState) -> str:
    name = state.model_name or "the served model"
    arch = ", ".join(state.facts.architectures) if state.facts and state.facts.architectures else ""
    return f"{name} ({arch})" if arch else name


async def handle_unsupported(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    path = request.match_info.route.resource.canonical
    if path in EXPERT_PATHS:
        raise http_error(
            400,
            f"The served model {_model(state)} has no mixture-of-experts layers: {path} needs a MoE model "
            "with expert distribution recording.",
        )
    raise http_error(
        400, f"The served model {_model(state)} is a generation model: {path} needs {NEEDS[path]}."
    )


def add_unsupported_routes(app: web.Application) -> None:
    for path in NEEDS:
        app.router.add_post(path, handle_unsupported)
    app.router.add_put("/encode", handle_unsupported)
    for path in EXPERT_PATHS:
        app.router.add_route("GET", path, handle_unsupported)
        app.router.add_route("POST", path, handle_unsupported)
