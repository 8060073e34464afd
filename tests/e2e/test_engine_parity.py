"""Greedy output of the engine is token-identical to Hugging Face transformers (CPU, float32).

For SmolLM2-135M-Instruct (real weights) and tiny random Llama, Qwen2 and Qwen3 models, the same
prompts (1 to ~1,500 tokens for SmolLM2) are generated with 32 new tokens:
  (a) one request at a time (three of SmolLM2's), (b) all in one batch, (c) with --chunked-prefill-size 64,
  (d) after a request sharing a long prefix (radix hit, cached_tokens > 0),
  (e) with a KV pool so small that retraction happens.
Logprobs of the chosen tokens equal transformers' log-softmax within 1e-4.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.engine import Engine
from tests.helpers.hf_reference import hf_greedy
from tests.helpers.tiny_models import make_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.untimed]

NEW_TOKENS = 32
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _tiny_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, 3, 17, 40, 64, 65, 130, 250]
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def _smollm2_prompts(tokenizer) -> list[list[int]]:
    paragraph = (
        "The history of computing is a story of layered abstractions. Early machines were programmed "
        "by rewiring panels; later, stored programs let the same hardware run many tasks. Compilers "
        "translated human-readable code into machine instructions, and operating systems shared one "
        "machine among many users. Networks then tied machines together, and the web made documents "
        "reachable from anywhere. "
    )
    texts = [
        "Hi",
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "Explain in two sentences why the sky is blue.",
        paragraph,
        paragraph * 3 + "Summarize the text above.",
        paragraph * 8 + "What came after compilers?",
        paragraph * 22 + "Give the text a title.",
    ]
    prompts = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    prompts[0] = prompts[0][:1]  # a one-token prompt
    return prompts


class Case:
    """One model under test: where it lives, its prompts and the transformers reference."""

    def __init__(self, model_dir: str, prompts: list[list[int]], real_model: bool = False):
        self.model_dir = model_dir
        self.prompts = prompts
        self.real_model = real_model
        self._reference: list[tuple[list[int], list[float]]] | None = None

    @property
    def reference(self) -> list[tuple[list[int], list[float]]]:
        if self._reference is None:
            self._reference = hf_greedy(self.model_dir, self.prompts, NEW_TOKENS)
        return self._reference

    def engine(self, **overrides) -> Engine:
        args = EngineArgs(model_path=self.model_dir, device="cpu", dtype="float32", **overrides)
        return Engine(args)


@pytest.fixture(scope="module", params=["smollm2", "llama", "qwen2", "qwen3"])
def case(request, tmp_path_factory) -> Case:
    kind = request.param
    if kind == "smollm2":
        from pdserve.shared.models.resolver import resolve_model
        from pdserve.shared.tokenizer import get_tokenizer

        local = str(resolve_model(SMOLLM2).local_dir)
        return Case(local, _smollm2_prompts(get_tokenizer(local)), real_model=True)
    model_dir = make_tiny_model(kind, Path(tmp_path_factory.mktemp(kind)))
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    return Case(str(model_dir), _tiny_prompts(vocab))


def _greedy(**extra) -> dict:
    return {"temperature": 0.0, "max_new_tokens": NEW_TOKENS, **extra}


def _assert_same(outputs: list[dict], reference, label: str, check_logprobs: bool = False) -> None:
    for i, (out, (ref_ids, ref_lps)) in enumerate(zip(outputs, reference)):
        assert out["output_ids"] == ref_ids, f"{label}: prompt {i} differs from transformers"
        if check_logprobs:
            lps = [lp for lp, _ in out["meta_info"]["output_token_logprobs"]]
            assert torch.allclose(torch.tensor(lps), torch.tensor(ref_lps), atol=1e-4), (
                f"{label}: prompt {i} logprobs"
            )


def test_one_at_a_time_and_batched(case: Case):
    engine = case.engine()
    # SmolLM2 alone: the one-token, a short and the longest prompt one at a time (the batch-1 path
    # is the same code at every length; each request there costs 32 sequential steps of a real model)
    alone = [0, 3, len(case.prompts) - 1] if case.real_model else range(len(case.prompts))
    one_by_one = [engine.generate([case.prompts[i]], _greedy(), return_logprob=True)[0] for i in alone]
    _assert_same(one_by_one, [case.reference[i] for i in alone], "one at a time", check_logprobs=True)
    batched = engine.generate(case.prompts, _greedy(), return_logprob=True)
    _assert_same(batched, case.reference, "batched", check_logprobs=True)


def test_chunked_prefill(case: Case):
    engine = case.engine(chunked_prefill_size=64, disable_radix_cache=True)
    _assert_same(engine.generate(case.prompts, _greedy()), case.reference, "chunked prefill 64")


def test_radix_prefix_hit(case: Case):
    engine = case.engine()
    longest = max(case.prompts, key=len)
    # a request sharing all but the last few tokens of the longest prompt warms the cache
    engine.generate([longest[:-3] + [longest[-1]]], _greedy(max_new_tokens=1))
    out = engine.generate([longest], _greedy())[0]
    assert out["meta_info"]["cached_tokens"] > 0
    assert out["meta_info"]["cached_tokens"] >= (len(longest) - 3) // 16 * 16 - 16
    _assert_same([out], [case.reference[case.prompts.index(longest)]], "radix hit")


def test_retraction_under_a_tiny_pool(case: Case):
    longest = max(len(p) for p in case.prompts)
    pool_tokens = (longest + NEW_TOKENS + 64) // 16 * 16 + 16
    engine = case.engine(max_total_tokens=pool_tokens)
    outputs = engine.generate(case.prompts, _greedy())
    assert engine.stats.num_retractions > 0, "the pool was meant to be small enough to force retraction"
    _assert_same(outputs, case.reference, "retraction")
    load = engine.load()
    assert load.num_free_pages + load.num_evictable_pages == load.num_total_pages
