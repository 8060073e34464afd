"""SGLang's SageMaker routes: `GET /ping` (health) and `POST /invocations` (chat completions).

    curl localhost:30000/ping                                    # 200 once the router can serve
    curl -X POST localhost:30000/invocations -d '{"messages": [{"role": "user", "content": "Hi"}]}'

Rules: `/ping` answers as `/health` does (200, or 503 naming why no worker can serve);
`/invocations` is `/v1/chat/completions` under SageMaker's path, body and answer alike (SGLang
serves it with its chat handler). Both take the API key like any route but `/health`.
"""

from __future__ import annotations

from aiohttp import web

from pdserve.router.native.info import handle_health
from pdserve.router.openai.chat import handle_chat_completions


def add_sagemaker_routes(app: web.Application) -> None:
    app.router.add_get("/ping", handle_health)
    app.router.add_post("/invocations", handle_chat_completions)
