"""Typed messages between router and workers: one dataclass per message, msgpack on the wire.

    from pdserve.shared.protocol import GenerateRequest, decode, encode

A frame is the msgpack encoding of `[type_tag, {field: value, ...}]`; `encode`/`decode` go through a
table keyed by tag (framing.py). Fields are plain msgpack types (ints, floats, str, lists, dicts,
None); a message holding messages encodes them with its own `to_wire`/`from_wire`. The messages by
direction: requests.py (router -> worker), replies.py (worker -> router), embedding.py (embedding requests and their
answers), admin.py (server info, weight updates and SGLang's control routes). Every message is importable from here.

May import: msgpack only (the router and every worker speak it).
"""

from pdserve.shared.protocol.admin import (
    AdminReply,
    ContinueGeneration,
    ExpertRecord,
    FreezeGC,
    GetWeightsByName,
    PauseGeneration,
    ServerInfo,
    ServerInfoQuery,
    StartProfile,
    StopProfile,
    UpdateWeightsFromTensor,
    UpdateWeightsRequest,
    UpdateWeightsResult,
    UpdateWeightVersion,
    WeightsByName,
)
from pdserve.shared.protocol.embedding import EmbeddingOutput, EmbedRequest
from pdserve.shared.protocol.framing import _REGISTRY, Message, ProtocolError, decode, encode, field_names
from pdserve.shared.protocol.replies import (
    FlushCacheResult,
    LoadReport,
    OutputBatch,
    PrefillDone,
    RequestOutput,
)
from pdserve.shared.protocol.requests import (
    AbortRequest,
    DecodeRequest,
    FlushCacheRequest,
    GenerateRequest,
    LoadQuery,
    PrefillRequest,
    RequestMessage,
)

__all__ = [
    "_REGISTRY",
    "AbortRequest",
    "AdminReply",
    "ContinueGeneration",
    "DecodeRequest",
    "EmbedRequest",
    "EmbeddingOutput",
    "ExpertRecord",
    "FlushCacheRequest",
    "FlushCacheResult",
    "FreezeGC",
    "GenerateRequest",
    "GetWeightsByName",
    "LoadQuery",
    "LoadReport",
    "Message",
    "OutputBatch",
    "PauseGeneration",
    "PrefillDone",
    "PrefillRequest",
    "ProtocolError",
    "RequestMessage",
    "RequestOutput",
    "ServerInfo",
    "ServerInfoQuery",
    "StartProfile",
    "StopProfile",
    "UpdateWeightVersion",
    "UpdateWeightsFromTensor",
    "UpdateWeightsRequest",
    "UpdateWeightsResult",
    "WeightsByName",
    "decode",
    "encode",
    "field_names",
]
