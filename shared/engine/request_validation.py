"""Checks a GenerateRequest against the model and the pool before it reaches the scheduler.

Every message names the field and the allowed range: the router answers HTTP 400 with it verbatim.
"""

from __future__ import annotations

from pdserve.shared.engine.sampling_params import SamplingParams, SamplingParamsError
from pdserve.shared.protocol import GenerateRequest


class RequestError(ValueError):
    """A request the engine refuses; the message is safe to show the client."""


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _are_token_ids(ids: list, vocab_size: int) -> bool:
    """Every element an int (not a bool) in [0, vocab_size). Three C-level passes instead of a Python
    loop per id: the router runs this on every prompt on its way to the worker."""
    return set(map(type, ids)) == {int} and min(ids) >= 0 and max(ids) < vocab_size


def validate_request(
    msg: GenerateRequest, vocab_size: int, context_length: int, pool_tokens: int
) -> SamplingParams:
    ids = msg.input_ids
    if not isinstance(ids, list) or not ids:
        raise RequestError("input_ids must be a non-empty list of token ids.")
    if not _are_token_ids(ids, vocab_size):
        raise RequestError(f"input_ids must hold token ids in [0, {vocab_size}).")
    if len(ids) >= context_length:
        raise RequestError(
            f"The input ({len(ids)} tokens) is longer than the model's context length ({context_length} tokens)."
        )
    if len(ids) + 1 > pool_tokens:
        raise RequestError(
            f"The input ({len(ids)} tokens) does not fit in the KV cache ({pool_tokens} tokens)."
        )
    if msg.sampling_params is not None and not isinstance(msg.sampling_params, dict):
        raise RequestError("sampling_params must be an object.")
    try:
        params = SamplingParams.from_dict(msg.sampling_params)
        params.check_vocab(vocab_size)
    except TypeError as exc:  # wrong field types reaching the dataclass constructor
        raise RequestError(f"Invalid sampling_params: {exc}") from exc
    except SamplingParamsError as exc:
        raise RequestError(str(exc)) from exc
    if not isinstance(msg.return_logprob, bool):
        raise RequestError("return_logprob must be a boolean.")
    if not _is_int(msg.top_logprobs_num) or msg.top_logprobs_num < 0:
        raise RequestError(f"top_logprobs_num must be an integer >= 0, got {msg.top_logprobs_num!r}.")
    if msg.top_logprobs_num > vocab_size:
        raise RequestError(f"top_logprobs_num must be <= the vocabulary size {vocab_size}.")
    if not _is_int(msg.logprob_start_len) or not -1 <= msg.logprob_start_len < len(ids):
        raise RequestError(
            f"logprob_start_len must be an integer in [-1, {len(ids) - 1}] (the prompt has {len(ids)} tokens), "
            f"got {msg.logprob_start_len!r}."
        )
    if msg.token_ids_logprob is not None and (
        not isinstance(msg.token_ids_logprob, list)
        or not all(_is_int(t) and 0 <= t < vocab_size for t in msg.token_ids_logprob)
    ):
        raise RequestError(f"token_ids_logprob must be a list of token ids in [0, {vocab_size}).")
    _check_generated_ids(msg.generated_ids, params, vocab_size)
    return params


def _check_generated_ids(generated: list | None, params: SamplingParams, vocab_size: int) -> None:
    """Tokens a moved request generated before (protocol.GenerateRequest.generated_ids)."""
    if generated is None:
        return
    if not isinstance(generated, list) or (generated and not _are_token_ids(generated, vocab_size)):
        raise RequestError(f"generated_ids must be a list of token ids in [0, {vocab_size}).")
    if params.n != 1:
        raise RequestError("generated_ids needs n = 1 (each sample moves on its own).")
    if len(generated) >= params.max_new_tokens:
        raise RequestError(
            f"generated_ids holds {len(generated)} tokens: max_new_tokens ({params.max_new_tokens}) leaves none to generate."
        )
