"""A request that continues another one (`GenerateRequest.generated_ids`: how the router moves a
stream whose worker died) gives the tokens the undisturbed request would have given after them.

Tiny random Llama, CPU, float32. For greedy, seeded sampling (the seed goes by the count of
generated tokens) and repetition/frequency penalties (they read the generated tokens), a run that
stops after k tokens and resumes elsewhere with those k tokens must continue exactly; counts
(prompt_tokens, completion_tokens, finish reason) are the undisturbed run's; logprobs come only for
the new tokens; every page is back afterwards. Bad generated_ids are refused with a message.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.engine import Engine
from pdserve.shared.engine.request_validation import RequestError
from pdserve.shared.protocol import GenerateRequest
from tests.helpers.tiny_models import make_tiny_model

PARAMS = {
    "greedy": {"temperature": 0.0, "max_new_tokens": 24, "ignore_eos": True},
    "seeded": {
        "temperature": 0.9,
        "top_p": 0.9,
        "sampling_seed": 7,
        "max_new_tokens": 24,
        "ignore_eos": True,
    },
    "penalties": {
        "temperature": 0.0,
        "max_new_tokens": 24,
        "ignore_eos": True,
        "frequency_penalty": 0.7,
        "repetition_penalty": 1.3,
        "min_new_tokens": 20,
    },
}


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    model_dir = make_tiny_model("llama", Path(tmp_path_factory.mktemp("llama")))
    return Engine(EngineArgs(model_path=str(model_dir), device="cpu", dtype="float32"))


def _run(engine: Engine, msg: GenerateRequest) -> list:
    engine.add_request(msg)
    outs = []
    while engine.has_work():
        outs += engine.step()
    return outs


@pytest.mark.parametrize("kind", sorted(PARAMS))
@pytest.mark.parametrize("k", [1, 9, 23])
def test_a_resumed_request_continues_exactly(engine, kind, k):
    prompt = [random.Random(k).randrange(3, 500) for _ in range(37)]
    params = PARAMS[kind]
    whole = _run(engine, GenerateRequest(rid=f"whole-{kind}-{k}", input_ids=prompt, sampling_params=params))
    ids = [t for o in whole for t in o.token_ids]
    assert len(ids) == 24
    engine.flush_cache()  # the resumed run computes the generated tokens' KV itself
    resumed = _run(
        engine,
        GenerateRequest(
            rid=f"resumed-{kind}-{k}",
            input_ids=prompt,
            sampling_params=params,
            return_logprob=True,
            logprob_start_len=0,
            generated_ids=ids[:k],
        ),
    )
    assert [t for o in resumed for t in o.token_ids] == ids[k:]
    last = resumed[-1]
    assert last.finished and last.finish_reason == whole[-1].finish_reason
    assert (last.prompt_tokens, last.completion_tokens) == (37, 24)
    assert sum(len(o.output_token_logprobs) for o in resumed) == 24 - k
    assert all(lp is not None for o in resumed for lp, _ in o.output_token_logprobs)
    assert not any(o.input_token_logprobs for o in resumed)  # the prompt was scored before the move
    load = engine.load()
    assert load.num_free_pages + load.num_evictable_pages == load.num_total_pages


@pytest.mark.parametrize(
    ("generated", "extra", "words"),
    [
        ([1, 2, 10**9], {}, "generated_ids must be a list of token ids"),
        ("12", {}, "generated_ids must be a list"),
        ([1, 2], {"n": 2}, "needs n = 1"),
        ([1, 2, 3, 4], {"max_new_tokens": 4}, "leaves none to generate"),
    ],
)
def test_bad_generated_ids_are_refused(engine, generated, extra, words):
    msg = GenerateRequest(
        rid="bad",
        input_ids=[5, 6, 7],
        sampling_params={"max_new_tokens": 8, **extra},
        generated_ids=generated,
    )
    with pytest.raises(RequestError, match=words):
        engine.add_request(msg)
