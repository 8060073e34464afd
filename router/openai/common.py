"""What every OpenAI handler needs: the router state, its tokenizer, errors in the OpenAI shape."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from pdserve.router.http.errors import error_response
from pdserve.router.openai.params import OpenAIRequestError
from pdserve.router.serving.generator_api import GenerationError
from pdserve.router.state import STATE_KEY, RouterState


def router_state(request: web.Request) -> RouterState:
    return request.app[STATE_KEY]


def openai_error(exc: OpenAIRequestError | GenerationError) -> web.Response:
    if isinstance(exc, OpenAIRequestError):
        return error_response(exc.status, exc.message, param=exc.param)
    return error_response(exc.status, exc.message, exc.err_type, headers=exc.headers)


def token_decoder(tokenizer: Any):
    """`id -> text` for logprob entries that came without their token text."""
    return lambda token_id: tokenizer.decode([token_id])
