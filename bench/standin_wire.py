"""The stand-in engine's output frames, built by hand: a RequestOutput's wire row and an OutputBatch
frame, byte for byte what the protocol's encoding gives (tests/unit/test_standin_engine.py checks)."""

from __future__ import annotations

from typing import Any

import msgpack

from pdserve.shared.protocol import OutputBatch, RequestOutput, field_names

# Every field of a RequestOutput with its default, as the row OutputBatch sends: one step's outputs
# are built as plain lists from it (cheaper than a dataclass per token) and decode to exactly the
# worker's RequestOutput.
_OUTPUT_TEMPLATE = RequestOutput(rid="", token_ids=[]).to_row()
_AT = {name: i for i, name in enumerate(field_names(RequestOutput))}
_RID, _INDEX, _TOKENS, _FINISHED, _REASON, _PROMPT, _COMPLETION, _ERROR = (
    _AT[name]
    for name in (
        "rid",
        "index",
        "token_ids",
        "finished",
        "finish_reason",
        "prompt_tokens",
        "completion_tokens",
        "error",
    )
)


def output_wire(
    rid: str,
    index: int,
    token_ids: list[int],
    prompt_tokens: int,
    completion_tokens: int,
    finish_reason: dict[str, Any] | None,
    error: str | None = None,
) -> list[Any]:
    """The wire row of one RequestOutput (finished when finish_reason is given)."""
    out = list(_OUTPUT_TEMPLATE)
    out[_RID] = rid
    out[_INDEX] = index
    out[_TOKENS] = token_ids
    out[_FINISHED] = finish_reason is not None
    out[_REASON] = finish_reason
    out[_PROMPT] = prompt_tokens
    out[_COMPLETION] = completion_tokens
    out[_ERROR] = error
    return out


def batch_frame(outputs: list[list[Any]]) -> bytes:
    """An OutputBatch frame, byte for byte what `encode(OutputBatch(...))` gives."""
    return msgpack.packb([OutputBatch.TAG, {"outputs": outputs}], use_bin_type=True)
