"""Typed messages between router and workers: one dataclass per message, msgpack on the wire.

A frame is the msgpack encoding of `[type_tag, {field: value, ...}]`. `encode`/`decode` go through a
table keyed by tag, so receivers dispatch on message type with a dict, not an isinstance chain.
Fields are plain msgpack types (ints, floats, str, lists, dicts, None); nested messages are encoded
as lists of field dicts by the message's own `to_wire`/`from_wire` where needed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack


class ProtocolError(ValueError):
    """A frame that is not a known message or whose fields do not match its type."""


_REGISTRY: dict[str, type[Message]] = {}


@dataclass
class Message:
    TAG: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.TAG:
            assert cls.TAG not in _REGISTRY, f"duplicate message tag {cls.TAG}"
            _REGISTRY[cls.TAG] = cls

    def to_wire(self) -> dict[str, Any]:
        attrs = self.__dict__
        names = field_names(type(self))
        if len(attrs) == len(names):  # the fields and nothing else (as always): one C-level copy
            return attrs.copy()
        return {name: attrs[name] for name in names}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Message:
        return cls(**data)


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def field_names(cls: type) -> tuple[str, ...]:
    """The dataclass fields of cls, in declaration order (cached: `dataclasses.fields` is slow)."""
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


def encode(msg: Message) -> bytes:
    return msgpack.packb([msg.TAG, msg.to_wire()], use_bin_type=True)


def decode(frame: bytes) -> Message:
    try:
        tag, data = msgpack.unpackb(frame, raw=False, strict_map_key=False)
        cls = _REGISTRY[tag]
        return cls.from_wire(data)
    except (KeyError, TypeError, ValueError, msgpack.exceptions.ExtraData) as exc:
        raise ProtocolError(f"bad frame: {exc!r}") from exc


# ---------------------------------------------------------------- router -> worker


@dataclass
class GenerateRequest(Message):
    """A tokenized generation request. `sampling_params` uses SamplingParams' field names."""

    TAG: ClassVar[str] = "gen"
    rid: str
    input_ids: list[int]
    sampling_params: dict[str, Any] = field(default_factory=dict)
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1
    token_ids_logprob: list[int] | None = None
    stream: bool = True
    # Tokens this request already generated on a worker that died (the router moves a request that
    # streamed tokens to another worker): the engine holds them as its own output (their KV is
    # computed with the prompt's; they count against max/min_new_tokens, penalties and seeds) and
    # reports only the tokens after them. n must be 1.
    generated_ids: list[int] | None = None

    @property
    def request(self) -> GenerateRequest:
        """Itself: code that takes any RequestMessage reads the generation request the same way."""
        return self


@dataclass
class AbortRequest(Message):
    TAG: ClassVar[str] = "abort"
    rid: str
    message: str = "Aborted by the client."


@dataclass
class LoadQuery(Message):
    TAG: ClassVar[str] = "load?"
    query_id: int = 0


@dataclass
class FlushCacheRequest(Message):
    TAG: ClassVar[str] = "flush"
    query_id: int = 0


# ---------------------------------------------------------------- router -> prefill / decode worker


@dataclass
class PrefillRequest(Message):
    """For a prefill worker: prefill `request`, then send its KV pages (and the first token) to the
    decode worker at `decode_kv_endpoint`; answered by exactly one PrefillDone."""

    TAG: ClassVar[str] = "prefill"
    request: GenerateRequest
    decode_kv_endpoint: str
    decode_worker_id: str = ""

    def to_wire(self) -> dict[str, Any]:
        return {**super().to_wire(), "request": self.request.to_wire()}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> PrefillRequest:
        return cls(**{**data, "request": _request_from_wire(data)})


@dataclass
class DecodeRequest(Message):
    """For a decode worker: generate `request` from KV that the prefill worker at
    `prefill_kv_endpoint` sends; answered with RequestOutputs as a GenerateRequest is."""

    TAG: ClassVar[str] = "decode"
    request: GenerateRequest
    prefill_kv_endpoint: str
    prefill_worker_id: str = ""

    def to_wire(self) -> dict[str, Any]:
        return {**super().to_wire(), "request": self.request.to_wire()}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> DecodeRequest:
        return cls(**{**data, "request": _request_from_wire(data)})


def _request_from_wire(data: dict[str, Any]) -> GenerateRequest:
    request = data.get("request")
    if not isinstance(request, dict):
        raise TypeError(f"request must hold a GenerateRequest's fields, got {type(request).__name__}")
    return GenerateRequest(**request)


RequestMessage = GenerateRequest | PrefillRequest | DecodeRequest  # each answers .request


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


# ---------------------------------------------------------------- router <-> worker: admin


@dataclass
class ServerInfoQuery(Message):
    TAG: ClassVar[str] = "info?"
    query_id: int = 0


@dataclass
class ServerInfo(Message):
    """A worker's arguments and facts, for /get_server_info and /get_model_info."""

    TAG: ClassVar[str] = "info"
    query_id: int = 0
    worker_id: str = ""
    role: str = "mixed"
    args: dict[str, Any] = field(default_factory=dict)  # EngineArgs.to_dict() plus the worker's flags
    model_path: str = ""
    tokenizer_path: str = ""
    served_model_name: str = ""
    model_type: str = ""
    architectures: list[str] = field(default_factory=list)
    context_length: int = 0
    vocab_size: int = 0
    max_total_num_tokens: int = 0
    page_size: int = 0
    kv_pool_bytes: int = 0
    weight_version: str = "default"
    version: str = ""
    weight_bytes: int = 0  # parameters and buffers of the loaded model


@dataclass
class UpdateWeightsRequest(Message):
    """Reload weights from disk without restarting; the radix cache is flushed on success."""

    TAG: ClassVar[str] = "update_weights"
    query_id: int = 0
    model_path: str = ""
    load_format: str | None = None
    weight_version: str | None = None


@dataclass
class UpdateWeightsResult(Message):
    TAG: ClassVar[str] = "weights_updated"
    query_id: int = 0
    success: bool = True
    message: str = ""
    weight_version: str = "default"


# ---------------------------------------------------------------- router <-> worker: SGLang's control routes


@dataclass
class AdminReply(Message):
    """The answer to the control messages below that return no data."""

    TAG: ClassVar[str] = "admin_reply"
    query_id: int = 0
    success: bool = True
    message: str = ""


@dataclass
class PauseGeneration(Message):
    """Stop scheduling until ContinueGeneration; requests that arrive meanwhile are held in arrival
    order. mode "abort" aborts the live requests first (SGLang's default); "in_place" keeps them
    where they are, their KV pages included."""

    TAG: ClassVar[str] = "pause"
    query_id: int = 0
    mode: str = "abort"


@dataclass
class ContinueGeneration(Message):
    TAG: ClassVar[str] = "continue"
    query_id: int = 0


@dataclass
class UpdateWeightVersion(Message):
    TAG: ClassVar[str] = "set_weight_version"
    query_id: int = 0
    new_version: str = ""


@dataclass
class StartProfile(Message):
    """Start a torch profiler trace; it ends at StopProfile or after `num_steps` engine steps and
    is written to `output_dir` (None: $SGLANG_TORCH_PROFILER_DIR, else /tmp)."""

    TAG: ClassVar[str] = "profile_start"
    query_id: int = 0
    profile_id: str = ""
    output_dir: str | None = None
    num_steps: int | None = None
    activities: list[str] | None = None  # "CPU", "GPU"; None: both
    with_stack: bool | None = None
    record_shapes: bool | None = None


@dataclass
class StopProfile(Message):
    TAG: ClassVar[str] = "profile_stop"
    query_id: int = 0


@dataclass
class FreezeGC(Message):
    """Move every object the worker tracks into the garbage collector's permanent generation."""

    TAG: ClassVar[str] = "freeze_gc"
    query_id: int = 0


@dataclass
class UpdateWeightsFromTensor(Message):
    """New values for some parameters, as one rank's entry of SGLang's `serialized_named_tensors`
    (shared/worker/tensor_payload.py); answered with UpdateWeightsResult."""

    TAG: ClassVar[str] = "update_weights_tensor"
    query_id: int = 0
    serialized_named_tensors: str | bytes = ""
    load_format: str | None = None
    flush_cache: bool = True
    weight_version: str | None = None


@dataclass
class GetWeightsByName(Message):
    TAG: ClassVar[str] = "weights?"
    query_id: int = 0
    name: str = ""
    truncate_size: int = 100


@dataclass
class WeightsByName(Message):
    """The first `truncate_size` rows of a parameter as float lists, or why not."""

    TAG: ClassVar[str] = "weights"
    query_id: int = 0
    success: bool = True
    message: str = ""
    parameter: list[Any] | None = None
