"""Builds the RequestOutput a step reports for one request: only what is new since the last one."""

from __future__ import annotations

from pdserve.shared.engine.request import Req
from pdserve.shared.protocol import RequestOutput


def _pairs(entries) -> list[list]:
    return [[lp, tok] for lp, tok in entries]


def _top_lists(entries) -> list:
    return [None if e is None else _pairs(e) for e in entries]


def build_output(req: Req) -> RequestOutput:
    """Consumes the request's unreported tokens and logprobs (advances `num_sent`)."""
    start, end = req.num_sent, len(req.output_ids)
    out = RequestOutput(
        rid=req.rid,
        index=req.index,
        token_ids=req.output_ids[start:end],
        finished=req.is_finished,
        finish_reason=req.finish_reason if req.is_finished else None,
        prompt_tokens=len(req.input_ids),
        completion_tokens=end,
        cached_tokens=req.cached_tokens,
    )
    if req.return_logprob:
        out.output_token_logprobs = _pairs(req.output_token_logprobs[start:end])
        if req.top_logprobs_num > 0:
            out.output_top_logprobs = _top_lists(req.output_top_logprobs[start:end])
        if req.token_ids_logprob:
            out.output_token_ids_logprobs = _top_lists(req.output_token_ids_logprobs[start:end])
        if not req.reported:
            out.input_token_logprobs = _pairs(req.input_token_logprobs)
            if req.top_logprobs_num > 0:
                out.input_top_logprobs = _top_lists(req.input_top_logprobs)
            if req.token_ids_logprob:
                out.input_token_ids_logprobs = _top_lists(req.input_token_ids_logprobs)
    req.num_sent = end
    return out
