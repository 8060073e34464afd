"""Engine features on a tiny random Llama (CPU, float32): prompt logprobs, seeds, n>1, validation, abort."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.engine import Engine
from pdserve.shared.engine.request_validation import RequestError
from pdserve.shared.protocol import GenerateRequest
from tests.helpers.tiny_models import make_tiny_model

pytestmark = pytest.mark.untimed


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(make_tiny_model("llama", Path(tmp_path_factory.mktemp("llama"))))


@pytest.fixture(scope="module")
def engine(model_dir) -> Engine:
    return Engine(EngineArgs(model_path=model_dir, device="cpu", dtype="float32", chunked_prefill_size=16))


def _prompt(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 256) for _ in range(n)]


def _all_pages_back(engine: Engine) -> bool:
    load = engine.load()
    return load.num_free_pages + load.num_evictable_pages == load.num_total_pages and load.num_running == 0


@torch.inference_mode()
def _hf_prompt_logprobs(model_dir: str, prompt: list[int]) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    logits = model(torch.tensor([prompt])).logits[0]
    return torch.log_softmax(logits.float(), -1)  # row p scores token p+1


@pytest.mark.parametrize("start", [0, 5, 39])
def test_prompt_logprobs_match_transformers_across_chunks(engine, model_dir, start):
    prompt = _prompt(40, seed=start)
    ref = _hf_prompt_logprobs(model_dir, prompt)
    out = engine.generate(
        [prompt],
        {"temperature": 0, "max_new_tokens": 2},
        return_logprob=True,
        top_logprobs_num=3,
        logprob_start_len=start,
        token_ids_logprob=[5, 7],
    )[0]
    meta = out["meta_info"]
    lps = meta["input_token_logprobs"]
    assert [tok for _, tok in lps] == prompt[start:]
    if start == 0:
        assert lps[0][0] is None and meta["input_top_logprobs"][0] is None
        lps, tops, asked = lps[1:], meta["input_top_logprobs"][1:], meta["input_token_ids_logprobs"][1:]
    else:
        tops, asked = meta["input_top_logprobs"], meta["input_token_ids_logprobs"]
    first = max(start, 1)
    expected = torch.tensor([ref[p - 1, prompt[p]].item() for p in range(first, len(prompt))])
    assert torch.allclose(torch.tensor([lp for lp, _ in lps]), expected, atol=1e-4)
    for p, top, ask in zip(range(first, len(prompt)), tops, asked):
        want = torch.topk(ref[p - 1], 3)
        assert [tok for _, tok in top] == want.indices.tolist()
        assert torch.allclose(torch.tensor([lp for lp, _ in top]), want.values, atol=1e-4)
        assert [tok for _, tok in ask] == [5, 7]
        assert abs(ask[1][0] - ref[p - 1, 7].item()) < 1e-4
    assert len(meta["output_token_logprobs"]) == 2 and len(meta["output_top_logprobs"]) == 2
    assert _all_pages_back(engine)


def test_prompt_scoring_with_zero_new_tokens(engine):
    prompt = _prompt(20, seed=3)
    out = engine.generate([prompt], {"max_new_tokens": 0}, return_logprob=True, logprob_start_len=0)[0]
    assert out["output_ids"] == []
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
    assert len(out["meta_info"]["input_token_logprobs"]) == 20


def test_seeded_sampling_is_independent_of_the_batch(engine):
    target = _prompt(30, seed=11)
    params = {
        "temperature": 1.0,
        "top_p": 0.9,
        "sampling_seed": 1234,
        "max_new_tokens": 12,
        "ignore_eos": True,
    }
    alone = engine.generate([target], params)[0]["output_ids"]
    others = [_prompt(n, seed=n) for n in (5, 50, 17)]
    crowd = engine.generate(
        others[:2] + [target] + others[2:],
        [{"temperature": 0.7, "max_new_tokens": 20}] * 2
        + [params]
        + [{"temperature": 0, "max_new_tokens": 3}],
    )
    assert crowd[2]["output_ids"] == alone
    different_seed = engine.generate([target], {**params, "sampling_seed": 99})[0]["output_ids"]
    assert different_seed != alone


def test_n_samples_share_the_prompt_through_the_cache(model_dir):
    engine = Engine(EngineArgs(model_path=model_dir, device="cpu", dtype="float32"))
    prompt = _prompt(70, seed=5)
    outs = engine.generate(
        [prompt], {"n": 3, "temperature": 1.0, "sampling_seed": 7, "max_new_tokens": 8, "ignore_eos": True}
    )
    assert len(outs) == 3
    assert outs[0]["meta_info"]["cached_tokens"] == 0
    assert [o["meta_info"]["cached_tokens"] for o in outs[1:]] == [64, 64]  # every whole page of the prompt
    assert len({tuple(o["output_ids"]) for o in outs}) > 1  # samples get their own seeds
    assert _all_pages_back(engine)


def test_stop_token_ids_and_ignore_eos(engine):
    prompt = _prompt(12, seed=8)
    free_run = engine.generate([prompt], {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True})[0]
    ids = free_run["output_ids"]
    assert len(ids) == 10 and free_run["meta_info"]["finish_reason"] == {"type": "length", "length": 10}
    stop_at = ids[3]
    stopped = engine.generate(
        [prompt], {"temperature": 0, "max_new_tokens": 10, "stop_token_ids": [stop_at]}
    )[0]
    first = ids.index(stop_at)
    assert stopped["output_ids"] == ids[: first + 1]
    assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_at}


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"input_ids": []}, "input_ids"),
        ({"input_ids": [1, 2, 100000]}, "input_ids"),
        ({"sampling_params": {"temperature": -1}}, "temperature"),
        ({"sampling_params": {"top_p": 0}}, "top_p"),
        ({"sampling_params": {"top_k": 0}}, "top_k"),
        ({"sampling_params": {"min_p": 2}}, "min_p"),
        ({"sampling_params": {"max_new_tokens": -3}}, "max_new_tokens"),
        ({"sampling_params": {"frequency_penalty": 5}}, "frequency_penalty"),
        ({"sampling_params": {"repetition_penalty": 0}}, "repetition_penalty"),
        ({"sampling_params": {"n": 0}}, "n must"),
        ({"sampling_params": {"bogus": 1}}, "bogus"),
        ({"sampling_params": {"stop_token_ids": [99999]}}, "stop_token_ids"),
        ({"sampling_params": {"regex": 3}}, "regex"),  # one that does not compile ends later
        ({"sampling_params": {"structural_tag": "{}"}}, "structural_tag"),
        ({"top_logprobs_num": -1}, "top_logprobs_num"),
        ({"logprob_start_len": 50}, "logprob_start_len"),
        ({"token_ids_logprob": [1, -2]}, "token_ids_logprob"),
        ({"input_ids": [1] * 1024}, "context length"),
    ],
)
def test_invalid_requests_are_refused_with_the_field_named(engine, fields, message):
    msg = GenerateRequest(rid="bad", input_ids=[1, 2, 3])
    for key, value in fields.items():
        setattr(msg, key, value)
    with pytest.raises(RequestError, match=message):
        engine.add_request(msg)
    assert not engine.has_work()


def test_abort_mid_decode_returns_the_pages(engine):
    engine.add_request(
        GenerateRequest(
            rid="long", input_ids=_prompt(33), sampling_params={"max_new_tokens": 500, "ignore_eos": True}
        )
    )
    engine.add_request(
        GenerateRequest(rid="short", input_ids=_prompt(9), sampling_params={"max_new_tokens": 4})
    )
    finished = {}
    for _ in range(6):
        for out in engine.step():
            if out.finished:
                finished[out.rid] = out
    (aborted,) = engine.abort("long", "client went away")
    assert aborted.finished and aborted.finish_reason == {"type": "abort", "message": "client went away"}
    while engine.has_work():
        for out in engine.step():
            if out.finished:
                finished[out.rid] = out
    assert finished["short"].finish_reason["type"] in ("length", "stop")
    assert _all_pages_back(engine)
    assert engine.abort("long") == []  # unknown by now: nothing to abort
