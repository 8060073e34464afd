"""`/tokenize`, `/detokenize` and their `/v1/` aliases, with the fields of SGLang's docs.

    POST /tokenize   {"prompt": str | [str], "add_special_tokens": true}
      -> {"tokens": [int] | [[int]], "count": int | [int], "max_model_len": int}
    POST /detokenize {"tokens": [int] | [[int]], "skip_special_tokens": true}
      -> {"text": str | [str]}

Round trip: detokenize(tokenize(text, add_special_tokens=False)) == text for any text the
tokenizer can represent: decoding never cleans up spaces (router/text/detokenizer.py). `model` may be
given and is not checked (one model is served). Token ids outside the vocabulary are a 400.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from pdserve.router.http.limits import check_batch_size, http_error, read_json_object
from pdserve.router.state import STATE_KEY
from pdserve.router.text.detokenizer import decode_ids


def _bool_field(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise http_error(400, f"{name} must be a boolean.")
    return value


def _is_ids(x: Any, vocab: int) -> bool:
    return isinstance(x, list) and all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in x
    )


async def handle_tokenize(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    body = await read_json_object(request)
    tokenizer = state.require_tokenizer()
    add_special = _bool_field(body, "add_special_tokens", True)
    prompt = body.get("prompt", body.get("text"))
    if isinstance(prompt, str):
        tokens: Any = tokenizer.encode(prompt, add_special_tokens=add_special)
        count: Any = len(tokens)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        check_batch_size(len(prompt), state.args.max_batch_size)
        tokens = [tokenizer.encode(p, add_special_tokens=add_special) for p in prompt]
        count = [len(t) for t in tokens]
    else:
        raise http_error(400, "prompt must be a string or a non-empty list of strings.")
    return web.json_response({"tokens": tokens, "count": count, "max_model_len": state.context_length})


async def handle_detokenize(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    body = await read_json_object(request)
    tokenizer = state.require_tokenizer()
    skip = _bool_field(body, "skip_special_tokens", True)
    tokens = body.get("tokens")
    vocab = state.facts.vocab_size if state.facts and state.facts.vocab_size else len(tokenizer)
    if _is_ids(tokens, vocab):
        text: Any = decode_ids(tokenizer, tokens, skip)
    elif isinstance(tokens, list) and tokens and all(_is_ids(t, vocab) for t in tokens):
        check_batch_size(len(tokens), state.args.max_batch_size)
        text = [decode_ids(tokenizer, t, skip) for t in tokens]
    else:
        raise http_error(
            400, f"tokens must be a list of token ids in [0, {vocab}) or a non-empty list of such lists."
        )
    return web.json_response({"text": text})
