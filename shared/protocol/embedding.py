"""Router <-> worker: an embedding request and its one answer.

An EmbedRequest is prefill-only work for a mixed or prefill worker running an embedding model
(never a decode worker). It is answered by exactly one EmbeddingOutput with the same `query_id`
(the router waits for it as for any query): the pooled vector, or `error` when the worker refused
or aborted it. A batch of texts is one EmbedRequest per text; the worker's scheduler batches them
into one forward pass as it batches prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from pdserve.shared.protocol.framing import Message


@dataclass
class EmbedRequest(Message):
    TAG: ClassVar[str] = "embed"
    rid: str
    input_ids: list[int]
    query_id: int = 0


@dataclass
class EmbeddingOutput(Message):
    """The pooled embedding (float32 values, normalized when the model normalizes) of `rid`."""

    TAG: ClassVar[str] = "embedding"
    rid: str
    query_id: int = 0
    embedding: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None  # refused or aborted: no embedding
