"""A GenerateRequest becomes its n sample requests: validated (request_validation.py), each sample
seeded apart, samples 1..n-1 sharing sample 0's prompt pages, resumed where a moved request left
off. Their grammar matchers come next, when the grammar is compiled (grammar_compiles.py: it
advances them over the moved tokens)."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from pdserve.shared.engine.grammar import grammar_source
from pdserve.shared.engine.request import Req, resume
from pdserve.shared.engine.request_validation import RequestError, validate_request
from pdserve.shared.engine.sampling_params import SamplingParams
from pdserve.shared.protocol import GenerateRequest

if TYPE_CHECKING:
    from pdserve.shared.models.config import ModelConfig


def new_samples(
    msg: GenerateRequest,
    model_config: ModelConfig,
    max_total_num_tokens: int,
    share_prompt: bool,
    serves_grammars: bool = False,
) -> list[Req]:
    """Validates msg and builds its n sample requests (queued nowhere yet, no grammar matcher yet);
    raises RequestError. `share_prompt` (the radix cache is on): samples 1..n-1 wait for sample 0's
    prompt pages. Without `serves_grammars` a constrained request is refused."""
    params = validate_request(msg, model_config.vocab_size, model_config.context_length, max_total_num_tokens)
    if not serves_grammars and grammar_source(params) is not None:
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
            return_logprob=msg.return_logprob,
            top_logprobs_num=msg.top_logprobs_num,
            logprob_start_len=msg.logprob_start_len,
            token_ids_logprob=list(msg.token_ids_logprob) if msg.token_ids_logprob else None,
        )
        if msg.generated_ids:
            resume(req, msg.generated_ids)
        samples.append(req)
    return samples


def derive_sample_params(params: SamplingParams, index: int) -> SamplingParams:
    """Sample i of an n>1 request: same parameters, its own seed (when seeded) so samples differ."""
    seed = None if params.sampling_seed is None else params.sampling_seed + index
    return replace(params, sampling_seed=seed)
