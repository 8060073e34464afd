"""A GenerateRequest becomes its n sample requests: validated (request_validation.py), each sample
seeded apart and with its own grammar matcher (grammar.py), samples 1..n-1 sharing sample 0's prompt
pages, resumed where a moved request left off (its matcher advanced over the moved tokens)."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from pdserve.shared.engine.grammar import advance_over, grammar_source
from pdserve.shared.engine.request import Req, resume
from pdserve.shared.engine.request_validation import RequestError, validate_request
from pdserve.shared.engine.sampling_params import SamplingParams
from pdserve.shared.protocol import GenerateRequest

if TYPE_CHECKING:
    from pdserve.shared.engine.grammar import GrammarBackend
    from pdserve.shared.models.config import ModelConfig


def new_samples(
    msg: GenerateRequest,
    model_config: ModelConfig,
    max_total_num_tokens: int,
    share_prompt: bool,
    grammars: GrammarBackend | None = None,
) -> list[Req]:
    """Validates msg and builds its n sample requests (queued nowhere yet); raises RequestError.
    `share_prompt` (the radix cache is on): samples 1..n-1 wait for sample 0's prompt pages.
    `grammars` compiles a constrained request's grammar (without it such a request is refused)."""
    params = validate_request(msg, model_config.vocab_size, model_config.context_length, max_total_num_tokens)
    matchers = grammars.matchers(params, params.n) if grammars is not None else [None] * params.n
    if grammars is None and grammar_source(params) is not None:
        raise RequestError("Constrained decoding is not served by this engine.")
    samples: list[Req] = []
    for index in range(params.n):
        sample_params = params if index == 0 else derive_sample_params(params, index)
        req = Req(
            rid=msg.rid,
            input_ids=list(msg.input_ids),
            params=sample_params,
            index=index,
            share_prompt_with=samples[0] if index > 0 and share_prompt else None,
            eos_token_ids=model_config.eos_token_ids,
            grammar=matchers[index],
            return_logprob=msg.return_logprob,
            top_logprobs_num=msg.top_logprobs_num,
            logprob_start_len=msg.logprob_start_len,
            token_ids_logprob=list(msg.token_ids_logprob) if msg.token_ids_logprob else None,
        )
        if msg.generated_ids:
            resume(req, msg.generated_ids)
            advance_over([req.grammar], msg.generated_ids)
        samples.append(req)
    return samples


def derive_sample_params(params: SamplingParams, index: int) -> SamplingParams:
    """Sample i of an n>1 request: same parameters, its own seed (when seeded) so samples differ."""
    seed = None if params.sampling_seed is None else params.sampling_seed + index
    return replace(params, sampling_seed=seed)
