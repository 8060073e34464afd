"""Router <-> worker: server info, weight updates and SGLang's other control routes (pause,
profile, gc, weight read-out); each answered by the worker it was sent to."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from pdserve.shared.protocol.framing import Message

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
    is_generation: bool = True  # False: an embedding model (EmbedRequest only)
    # the widths an embedding may be cut to (`dimensions`): None when the model was not trained
    # for it (Matryoshka); [] when any width up to hidden_size is allowed
    matryoshka_dimensions: list[int] | None = None
    hidden_size: int = 0
    labels: list[str] = field(default_factory=list)  # a classifier's labels by index (id2label)
    cross_encoder: bool = False  # a classifier over text pairs (/v1/rerank)


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
class ExpertRecord(Message):
    """Expert-distribution recording: `action` "start", "stop" or "dump" (the dump's file is named
    by `dump_id`, one for every worker); answered by an AdminReply (a dump's message: the file)."""

    TAG: ClassVar[str] = "expert_record"
    query_id: int = 0
    action: str = ""
    dump_id: str = ""


@dataclass
class FreezeGC(Message):
    """Move every object the worker tracks into the garbage collector's permanent generation."""

    TAG: ClassVar[str] = "freeze_gc"
    query_id: int = 0


@dataclass
class UpdateWeightsFromTensor(Message):
    """New values for some parameters: SGLang's `serialized_named_tensors`, one entry per
    tensor-parallel rank (or one entry as such; shared/engine/tensor_payload.py); answered with
    UpdateWeightsResult."""

    TAG: ClassVar[str] = "update_weights_tensor"
    query_id: int = 0
    serialized_named_tensors: str | bytes | list[str | bytes] = ""
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
