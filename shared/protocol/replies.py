"""Worker -> router: outputs (batched per client and step), a prefill worker's PrefillDone, and the
answers to load and flush queries."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from pdserve.shared.protocol.framing import Message, field_names

# ---------------------------------------------------------------- worker -> router


@dataclass
class RequestOutput(Message):
    """What one request gained in one step. Logprob lists hold only the new entries.

    `finish_reason` follows SGLang: {"type": "stop", "matched": id}, {"type": "length", "length": n},
    {"type": "abort", "message": str}. Pairs are [logprob, token_id]; input logprobs arrive once,
    with the first output of the request.
    """

    TAG: ClassVar[str] = "out"
    rid: str
    token_ids: list[int]
    index: int = 0  # which sample of an n>1 request
    finished: bool = False
    finish_reason: dict[str, Any] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    output_token_logprobs: list[list[Any]] | None = None
    output_top_logprobs: list[list[list[Any]]] | None = None
    output_token_ids_logprobs: list[list[list[Any]]] | None = None
    input_token_logprobs: list[list[Any]] | None = None
    input_top_logprobs: list[Any] | None = None
    input_token_ids_logprobs: list[Any] | None = None
    error: str | None = None  # a request the worker refused (bad params): finished with this message

    def to_row(self) -> list[Any]:
        """The field values in declaration order: how OutputBatch sends it (see there)."""
        attrs = self.__dict__
        if len(attrs) == len(field_names(RequestOutput)):
            return list(attrs.values())  # __init__ set them in declaration order
        return [attrs[name] for name in field_names(RequestOutput)]


@dataclass
class OutputBatch(Message):
    """All of one step's outputs for one router, in one frame."""

    TAG: ClassVar[str] = "outs"
    outputs: list[RequestOutput] = field(default_factory=list)

    # Outputs travel as rows (RequestOutput.to_row), not maps: a step's frame holds one output per
    # running request, and msgpack decodes 100 rows in 1/8 the time of 100 maps, which make a str
    # per key per output (the router decodes every token). A row shorter than the fields (an older
    # sender) takes the defaults of the fields it lacks; a map is still understood.
    def to_wire(self) -> dict[str, Any]:
        return {"outputs": [o.to_row() for o in self.outputs]}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> OutputBatch:
        return cls(
            outputs=[
                RequestOutput(*row) if type(row) is list else RequestOutput.from_wire(row)
                for row in data["outputs"]
            ]
        )


@dataclass
class PrefillDone(Message):
    """The prefill worker's one answer to a PrefillRequest: the KV was delivered (ok) or not (reason)."""

    TAG: ClassVar[str] = "prefill_done"
    rid: str
    ok: bool = True
    reason: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class LoadReport(Message):
    TAG: ClassVar[str] = "load"
    query_id: int = 0
    num_running: int = 0
    num_waiting: int = 0
    num_free_pages: int = 0  # free now, not counting evictable cached pages
    num_evictable_pages: int = 0
    num_total_pages: int = 0
    page_size: int = 0
    num_used_tokens: int = 0
    max_total_num_tokens: int = 0
    # progress, apart from liveness (which the connection's heartbeats prove): counters that grow
    num_steps: int = 0
    generated_tokens: int = 0


@dataclass
class FlushCacheResult(Message):
    TAG: ClassVar[str] = "flushed"
    query_id: int = 0
    success: bool = True
    message: str = ""
