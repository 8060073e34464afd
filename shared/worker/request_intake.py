"""The three request messages at a worker's door: how each kind is refused, and the rid of a frame
too malformed to decode.

A GenerateRequest and a DecodeRequest are answered with RequestOutputs, a PrefillRequest with one
PrefillDone: a refusal is the answer its sender waits for, whichever role refuses it. Which engine
call takes which kind is each role's table (MixedWorker._intake); a kind not in it is refused.

    reply = refusal(PrefillRequest, "r1", "worker is shutting down")   # PrefillDone(ok=False)
"""

from __future__ import annotations

import msgpack

from pdserve.shared.protocol import (
    DecodeRequest,
    GenerateRequest,
    Message,
    OutputBatch,
    PrefillDone,
    PrefillRequest,
    RequestMessage,
    RequestOutput,
)
from pdserve.shared.worker.update_queue import num_samples

REQUEST_KINDS: tuple[type[RequestMessage], ...] = (GenerateRequest, PrefillRequest, DecodeRequest)
_KIND_BY_TAG = {kind.TAG: kind for kind in REQUEST_KINDS}


def error_output(rid: str, message: str) -> RequestOutput:
    """The single, finished output of a request the worker refused."""
    return RequestOutput(
        rid=rid,
        token_ids=[],
        finished=True,
        finish_reason={"type": "abort", "message": message},
        error=message,
    )


def refusal(kind: type[Message], rid: str, message: str) -> Message:
    """The answer to a request of `kind` that never entered the engine."""
    if kind is PrefillRequest:
        return PrefillDone(rid=rid, ok=False, reason=message)
    return OutputBatch(outputs=[error_output(rid, message)])


def held_refusal(msg: RequestMessage, message: str) -> Message:
    """The answer to a request aborted while it was held (one output per sample, nothing generated)."""
    gen = msg.request
    if isinstance(msg, PrefillRequest):
        return refusal(PrefillRequest, gen.rid, message)
    return OutputBatch(
        outputs=[
            RequestOutput(
                rid=gen.rid,
                token_ids=[],
                index=i,
                finished=True,
                finish_reason={"type": "abort", "message": message},
                prompt_tokens=len(gen.input_ids),
            )
            for i in range(num_samples(gen))
        ]
    )


def not_served(role: str, kind: type[Message], served: list[type[Message]]) -> str:
    names = " and ".join(k.__name__ for k in served)
    return f"A {role} worker does not serve {kind.__name__}; it serves {names} only."


def salvage_request(frame: bytes) -> tuple[type[RequestMessage], str] | None:
    """The kind and rid of a request frame whose fields do not match its message, if it names a
    rid: its sender then gets a refusal instead of waiting for a reply that never comes."""
    try:
        tag, data = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.exceptions.UnpackException):  # garbage: no rid to answer
        return None
    kind = _KIND_BY_TAG.get(tag) if isinstance(tag, str) else None
    if kind is None or not isinstance(data, dict):
        return None
    fields = data if kind is GenerateRequest else data.get("request")
    rid = fields.get("rid") if isinstance(fields, dict) else None
    return (kind, rid) if isinstance(rid, str) else None
