"""The engine's embedding mode: an embedding request is prefill-only work whose answer is the
pooled last hidden states of its prompt, not a token.

    mode = EmbeddingMode.for_model(args, local_dir, model_config)   # None: a generation model
    req = mode.new_request(EmbedRequest(rid="e1", input_ids=[...]), context_length, pool_tokens)
    mode.collect(batch, hidden)        # the runner, after each forward: pools finished prompts
    out = mode.output(req)             # the EmbeddingOutput of a finished request

Rules:
- an embedding request is a Req with `wants_embedding` and max_new_tokens 0: the scheduler admits,
  batches and chunks it like any prompt, and the role finishes it once its prompt is computed;
- last-token pooling reads only the final chunk's last row, so chunked prefill and the prefix
  cache work unchanged (the scheduler always computes a prompt's last token);
- a classifier (reward model, cross-encoder) is the same with its head after the pooling: the
  answer is its scores, one per label;
- mean and CLS pooling, and encoders (bidirectional attention), need the whole prompt in one
  forward: `whole_prompts` is then set, and the engine runs without chunking and prefix cache.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.request import Req
from pdserve.shared.engine.request_validation import RequestError
from pdserve.shared.engine.sampling_params import SamplingParams
from pdserve.shared.engine.scheduled_batch import ScheduledBatch
from pdserve.shared.models.config import ModelConfig
from pdserve.shared.models.pooling import PoolingConfig, is_embedding_model, is_encoder, pool_hidden
from pdserve.shared.protocol import EmbeddingOutput, EmbedRequest


def generation_refused(model: str) -> str:
    return (
        f"The served model {model} is an embedding model: it does not generate text; "
        "use /encode or /v1/embeddings."
    )


def embedding_refused(model: str) -> str:
    return f"The served model {model} is a generation model: embeddings need an embedding model."


def matryoshka_dimensions(hf_config: object) -> list[int] | None:
    """The widths an embedding may be cut to, as the config says (vLLM's and SGLang's keys): the
    listed `matryoshka_dimensions`, [] (any) for `is_matryoshka`, None when it was not trained so."""
    listed = getattr(hf_config, "matryoshka_dimensions", None)
    if isinstance(listed, list) and listed:
        return [int(d) for d in listed]
    return [] if getattr(hf_config, "is_matryoshka", False) else None


@dataclass(frozen=True)
class EmbeddingMode:
    pooling: PoolingConfig
    whole_prompts: bool  # see the module rules
    # a classifier's head: pooled rows [N, H] -> scores [N, labels] (the model's score_pooled)
    head: Callable[[torch.Tensor], torch.Tensor] | None = None

    def with_head_of(self, model: object) -> EmbeddingMode:
        """This mode, scoring with the model's head when it has one (reward models, cross-encoders)."""
        return dataclasses.replace(self, head=getattr(model, "score_pooled", None))

    @staticmethod
    def for_model(
        args: EngineArgs, local_dir: str | Path | None, config: ModelConfig
    ) -> EmbeddingMode | None:
        archs = list(config.architectures)
        if not is_embedding_model(local_dir, archs, args.is_embedding):
            return None
        pooling = PoolingConfig.for_model(local_dir, archs)
        return EmbeddingMode(pooling, is_encoder(archs) or pooling.method != "last")

    def new_request(self, msg: EmbedRequest, context_length: int, pool_tokens: int, vocab_size: int) -> Req:
        """The Req of an embedding request; RequestError naming what is wrong."""
        ids = msg.input_ids
        if not isinstance(ids, list) or not ids:
            raise RequestError("input_ids must be a non-empty list of token ids.")
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in ids):
            raise RequestError(f"input_ids must hold token ids in [0, {vocab_size}).")
        limit = min(context_length, pool_tokens)
        if len(ids) > limit:
            raise RequestError(
                f"The input ({len(ids)} tokens) is longer than the model's context length ({limit} tokens)."
            )
        return Req(
            rid=msg.rid, input_ids=list(ids), params=SamplingParams(max_new_tokens=0), wants_embedding=True
        )

    def collect(self, batch: ScheduledBatch, hidden: torch.Tensor) -> None:
        """Pools each request of the batch whose prompt this forward completed (hidden: [T, H])."""
        start = 0
        for req, prefix, extend in zip(batch.reqs, batch.prefix_lens, batch.extend_lens):
            if req.wants_embedding and prefix + extend == len(req.input_ids):
                rows = hidden[start : start + extend]
                pooled = pool_hidden(rows, self.pooling.method, self.pooling.normalize)
                if self.head is not None:
                    pooled = self.head(pooled[None])[0]
                req.embedding = pooled.tolist()
            start += extend

    @staticmethod
    def output(req: Req) -> EmbeddingOutput:
        reason = req.finish_reason or {}
        error = None
        if req.embedding is None:
            error = str(reason.get("message") or "the request ended before its embedding was computed")
        return EmbeddingOutput(
            rid=req.rid,
            embedding=req.embedding or [],
            prompt_tokens=len(req.input_ids),
            cached_tokens=req.cached_tokens,
            error=error,
        )
