"""What a request carries from the prefill worker to the decode worker besides its KV pages.

The prefill side samples the first token at its last chunk and computes the prompt logprobs; the
decode side must report them to the client exactly as a mixed engine would. `first_output_of` packs
them into the plain, msgpack-able dict that travels with the last `KVSender.send` call
(kvtransfer/base.py: `first_output`); `apply_first_output` unpacks it into the decode side's Req.
Pairs are [logprob, token_id] on the wire and (logprob, token_id) in a Req.

No torch here: both roles' schedulers may use it.
"""

from __future__ import annotations

from typing import Any

from pdserve.shared.engine.request import Req

_TOP_KEYS = (
    "output_top_logprobs",
    "output_token_ids_logprobs",
    "input_top_logprobs",
    "input_token_ids_logprobs",
)


class HandoffError(ValueError):
    """A first_output that does not fit the request (a broken or mismatched peer)."""


def first_output_of(req: Req) -> dict[str, Any]:
    """The prefill side's first token (None when max_new_tokens is 0), cached_tokens and, when the
    request asked for logprobs, its output logprobs so far (the first token's) and prompt logprobs."""
    data: dict[str, Any] = {
        "token": req.output_ids[0] if req.output_ids else None,
        "cached_tokens": req.cached_tokens,
    }
    if req.return_logprob:
        data["output_token_logprobs"] = [[lp, tok] for lp, tok in req.output_token_logprobs]
        data["input_token_logprobs"] = [[lp, tok] for lp, tok in req.input_token_logprobs]
        for key in _TOP_KEYS:
            data[key] = [None if e is None else [[lp, tok] for lp, tok in e] for e in getattr(req, key)]
    return data


def apply_first_output(req: Req, data: Any, vocab_size: int) -> None:
    """Sets the decode side's req as if it had prefilled itself: output_ids = [first token], the
    logprobs, cached_tokens, prompt logprobs done. Raises HandoffError (req unchanged) when data
    does not fit the request."""
    if not isinstance(data, dict):
        raise HandoffError(f"first_output is {type(data).__name__}, not a dict")
    token = data.get("token")
    wants_token = req.params.max_new_tokens > 0
    if wants_token and not (isinstance(token, int) and 0 <= token < vocab_size):
        raise HandoffError(f"first token {token!r} is not a token id in [0, {vocab_size})")
    if not wants_token and token is not None:
        raise HandoffError("a first token for a request with max_new_tokens 0")
    try:
        unpacked = {
            "output_token_logprobs": _pairs(data.get("output_token_logprobs", [])),
            "input_token_logprobs": _pairs(data.get("input_token_logprobs", [])),
        }
        for key in _TOP_KEYS:
            unpacked[key] = [None if e is None else _pairs(e) for e in data.get(key, [])]
        cached = int(data.get("cached_tokens", 0))
    except (TypeError, ValueError) as exc:
        raise HandoffError(f"malformed logprobs in first_output: {exc}") from exc
    if req.return_logprob and wants_token and len(unpacked["output_token_logprobs"]) != 1:
        raise HandoffError("first_output lacks the first token's logprob")
    req.output_ids = []
    if wants_token:
        req.append_output(token)  # the grammar, if any, advances over the prefill side's token
    req.cached_tokens = cached
    req.input_logprobs_done = True  # the prefill side computed them; decode never scores the prompt
    if req.return_logprob:
        for key, value in unpacked.items():
            setattr(req, key, value)


def _pairs(entries: Any) -> list[tuple[float | None, int]]:
    return [(None if lp is None else float(lp), int(tok)) for lp, tok in entries]
