"""What the embedding routes (`/v1/embeddings`, `/encode`) share: their inputs as token-id lists,
the check that an embedding model is served, and Matryoshka truncation.

    ids, batched = input_token_lists(state, body["input"], "input")  # str | [str] | [int] | [[int]]
    outs = await embed(state, ids)          # EmbeddingOutputs in input order (400/503/504 as errors)

Texts are tokenized with the model's tokenizer and its special tokens (BERT's [CLS] ... [SEP]), as
sentence-transformers and SGLang do. Token ids must lie in the vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from pdserve.router.http.limits import check_batch_size, http_error
from pdserve.router.state import ModelFacts, RouterState
from pdserve.shared.protocol import EmbeddingOutput

CLASSIFIER = "a reward or classification model (*ForSequenceClassification)"
CROSS_ENCODER = (
    "a cross-encoder (BertForSequenceClassification or XLMRobertaForSequenceClassification, "
    "e.g. BAAI/bge-reranker-v2-m3)"
)


def require_model(state: RouterState, path: str, fits: Callable[[ModelFacts], bool], needs: str) -> None:
    """400 naming the served model's kind unless `fits` says it serves `path` (503 before any worker)."""
    facts = state.require_ready()
    if not fits(facts):
        raise http_error(400, f"The served model {state.model_name} is {facts.kind}: {path} needs {needs}.")


def require_embedding_model(state: RouterState, path: str) -> None:
    require_model(state, path, lambda facts: not facts.is_generation, "an embedding model")


def is_token_ids(value: Any) -> bool:
    """A non-empty list of ints (bools excluded)."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def input_token_lists(state: RouterState, value: Any, name: str) -> tuple[list[list[int]], bool]:
    """(one token-id list per input, whether the request was a batch); http_error 400 otherwise."""
    if isinstance(value, str) or is_token_ids(value):
        lists, batched = [value], False
    elif (
        isinstance(value, list)
        and value
        and (all(isinstance(v, str) for v in value) or all(map(is_token_ids, value)))
    ):
        lists, batched = list(value), True
    else:
        raise http_error(
            400,
            f"{name} must be a string, a non-empty list of strings, a non-empty list of token ids, "
            "or a non-empty list of such lists.",
        )
    check_batch_size(len(lists), state.args.max_batch_size)
    encode = state.encoder(add_special_tokens=True) if isinstance(lists[0], str) else None
    ids = [encode(v) if encode is not None else v for v in lists]
    vocab = state.facts.vocab_size if state.facts else 0
    for one in ids:
        if not one:
            raise http_error(400, f"{name} holds an empty input: it tokenizes to no tokens.")
        if vocab and any(not 0 <= t < vocab for t in one):
            raise http_error(400, f"{name} holds token ids outside the vocabulary [0, {vocab}).")
    return ids, batched


async def embed(state: RouterState, ids: list[list[int]]) -> list[EmbeddingOutput]:
    return await state.embedder.embed(ids)


def check_dimensions(state: RouterState, dimensions: Any) -> int | None:
    """The `dimensions` asked for, if the model allows cutting its embeddings to it (Matryoshka,
    as its config says); http_error 400 otherwise (vLLM's and SGLang's refusal)."""
    if dimensions is None:
        return None
    if not isinstance(dimensions, int) or isinstance(dimensions, bool):
        raise http_error(400, "dimensions must be an integer.")
    facts = state.require_ready()
    allowed = facts.matryoshka_dimensions
    if allowed is None:
        raise http_error(
            400,
            f"Model '{state.model_name}' does not support matryoshka representation, changing output "
            "dimensions will lead to poor results.",
        )
    if allowed and dimensions not in allowed:
        raise http_error(400, f"Model '{state.model_name}' only supports dimensions {allowed}.")
    if not 1 <= dimensions <= (facts.hidden_size or dimensions):
        raise http_error(400, f"dimensions must be in [1, {facts.hidden_size}], got {dimensions}.")
    return dimensions


def cut(embedding: list[float], dimensions: int | None) -> list[float]:
    """The first `dimensions` values, normalized again (a Matryoshka prefix is unit length again)."""
    if dimensions is None or dimensions >= len(embedding):
        return embedding
    head = embedding[:dimensions]
    norm = math.sqrt(sum(v * v for v in head)) or 1.0
    return [v / norm for v in head]
