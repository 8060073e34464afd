"""Builds the RequestOutput a step reports for one request: only what is new since the last one,
and only when it is due (`stream_interval`). Offline use folds a sample's outputs back into one
result (`merge_sample_outputs`)."""

from __future__ import annotations

from typing import Any

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


def output_due(req: Req) -> bool:
    """Whether a request that progressed reports now: when finished, with its first tokens, or once
    `stream_interval` new tokens wait (SGLang's rule: the first token at once, then every N)."""
    interval = req.params.stream_interval
    if not interval or interval == 1 or req.is_finished or not req.reported:
        return True
    return len(req.output_ids) - req.num_sent >= interval


def merge_sample_outputs(outs: list[RequestOutput]) -> dict[str, Any]:
    """Folds the stream of one sample into one SGLang-shaped result (ids, not text)."""
    ids: list[int] = []
    meta: dict[str, Any] = {}
    logprob_keys = (
        "output_token_logprobs",
        "output_top_logprobs",
        "output_token_ids_logprobs",
        "input_token_logprobs",
        "input_top_logprobs",
        "input_token_ids_logprobs",
    )
    for out in outs:
        ids.extend(out.token_ids)
        for key in logprob_keys:
            value = getattr(out, key)
            if value is not None:
                meta.setdefault(key, []).extend(value)
    last = outs[-1] if outs else None
    meta.update(
        prompt_tokens=last.prompt_tokens if last else 0,
        completion_tokens=len(ids),
        cached_tokens=last.cached_tokens if last else 0,
        finish_reason=last.finish_reason if last else None,
        error=last.error if last else None,
    )
    return {"output_ids": ids, "meta_info": meta}
