"""One stream's pending outputs folded into as few outputs as say the same thing.

    outs = merge_outputs([out1, out2, out3])    # the backlog of one stream, oldest first

Why: a router that falls behind its workers holds several outputs per stream when the stream's
turn comes (router/cluster/output_delivery.py). Handed over one by one, each costs the stream a detokenize,
an event and a socket write (a system call): the router's cost per token stays what it is at low
load, and its backlog never shrinks. Folded, a stream that fell behind catches up with one event
holding all its new tokens, as a worker's `stream_interval` output does: the less the router keeps
up, the fewer writes per token. A stream that keeps up has one pending output and is untouched.

Rules:
- outputs fold only within one sample (`index`), oldest into newest order kept, and never past a
  finished output or one carrying an error (those end the sample: nothing may follow them);
- the folded output has the tokens and output logprob entries of both, in order; the counters and
  the finish state of the newer; input logprobs (sent once, with a sample's first output) of
  whichever carried them;
- outputs whose optional logprob fields differ in presence are kept apart (never seen from one
  worker; folding them would misalign the lists with the tokens);
- the first output of the list is reused for the fold (the list owns its outputs).
"""

from __future__ import annotations

from pdserve.shared.protocol import RequestOutput

_OUTPUT_LISTS = ("output_token_logprobs", "output_top_logprobs", "output_token_ids_logprobs")
_INPUT_FIELDS = ("input_token_logprobs", "input_top_logprobs", "input_token_ids_logprobs")


def merge_outputs(outs: list[RequestOutput]) -> list[RequestOutput]:
    if len(outs) < 2:
        return outs
    merged: list[RequestOutput] = []
    last_by_index: dict[int, RequestOutput] = {}
    for out in outs:
        prev = last_by_index.get(out.index)
        if prev is not None and _can_fold(prev, out):
            _fold(prev, out)
            continue
        merged.append(out)
        last_by_index[out.index] = out
    return merged


def _can_fold(prev: RequestOutput, out: RequestOutput) -> bool:
    if prev.finished or prev.error is not None or out.error is not None:
        return False
    return all((getattr(prev, name) is None) == (getattr(out, name) is None) for name in _OUTPUT_LISTS)


def _fold(prev: RequestOutput, out: RequestOutput) -> None:
    prev.token_ids = prev.token_ids + out.token_ids
    for name in _OUTPUT_LISTS:
        newer = getattr(out, name)
        if newer is not None:
            setattr(prev, name, getattr(prev, name) + newer)
    for name in _INPUT_FIELDS:
        if getattr(prev, name) is None:
            setattr(prev, name, getattr(out, name))
    prev.finished = out.finished
    prev.finish_reason = out.finish_reason
    prev.prompt_tokens = out.prompt_tokens
    prev.completion_tokens = out.completion_tokens
    prev.cached_tokens = out.cached_tokens
