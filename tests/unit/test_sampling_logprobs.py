"""Reported logprobs are log_softmax of the raw logits; top lists and asked ids; prompt helper."""

import math

import pytest
import torch

from pdserve.shared.engine.sampler import Sampler, SamplingInputs, token_logprobs
from pdserve.shared.engine.sampling_params import SamplingParams

V = 100


def _reference(logits):
    return torch.log_softmax(logits.double(), dim=-1)


def _check_top(top, ref_row, n):
    assert len(top) == n
    values = [lp for lp, _ in top]
    assert values == sorted(values, reverse=True)
    best = torch.sort(ref_row, descending=True, stable=True).indices[:n].tolist()
    assert [t for _, t in top] == best
    for lp, t in top:
        assert abs(lp - ref_row[t].item()) < 1e-6


def test_decode_logprobs_are_raw_log_softmax_whatever_the_processing():
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(3)) * 3
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(sampling_seed=1, temperature=0.5, top_k=3, repetition_penalty=1.3),
        SamplingParams(sampling_seed=2, logit_bias={"7": 5.0}),
        SamplingParams(temperature=0.0),
    ]
    inputs = SamplingInputs(
        params=params,
        prompt_ids=[[1, 2]] * 4,
        output_ids=[[3]] * 4,
        eos_token_ids=[frozenset()] * 4,
        top_logprobs_num=[5, 0, 2, 3],
        token_ids_logprob=[[7, 3, 99, 3], None, [0], [1]],
        return_logprob=[True, True, True, False],
    )
    out = Sampler(V, "cpu").sample(logits, inputs)
    ref = _reference(logits)
    for i in range(3):
        assert abs(out.logprobs[i] - ref[i, out.next_token_ids[i]].item()) < 1e-6
    _check_top(out.top_logprobs[0], ref[0], 5)
    _check_top(out.top_logprobs[2], ref[2], 2)
    assert out.top_logprobs[1] is None and out.token_ids_logprobs[1] is None
    assert [t for _, t in out.token_ids_logprobs[0]] == [7, 3, 99, 3]
    for lp, t in out.token_ids_logprobs[0]:
        assert abs(lp - ref[0, t].item()) < 1e-6
    assert out.logprobs[3] is None and out.top_logprobs[3] is None and out.token_ids_logprobs[3] is None


def test_logprobs_of_bfloat16_logits_are_computed_in_float32():
    logits = (torch.randn(2, V, generator=torch.Generator().manual_seed(4)) * 4).bfloat16()
    inputs = SamplingInputs(
        [SamplingParams(temperature=0.0)] * 2,
        [[], []],
        [[], []],
        [frozenset()] * 2,
        [3, 3],
        [None, None],
        [True, True],
    )
    out = Sampler(V, "cpu").sample(logits, inputs)
    ref = _reference(logits.float())
    assert out.next_token_ids == logits.float().argmax(-1).tolist()
    for i in range(2):
        assert abs(out.logprobs[i] - ref[i, out.next_token_ids[i]].item()) < 1e-6
        assert out.top_logprobs[i][0] == (out.logprobs[i], out.next_token_ids[i])


def test_top_logprobs_ties_are_ordered_by_id():
    logits = torch.tensor([[0.0, 1.0, 1.0, 2.0, 1.0]])
    out = token_logprobs(logits, [3], top_n=3)
    assert [t for _, t in out.top_logprobs[0]] == [3, 1, 2]


def test_prompt_logprobs_helper_matches_reference_and_chunks():
    n = 9
    logits = torch.randn(n, V, generator=torch.Generator().manual_seed(5)) * 2
    next_ids = torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(6))
    ref = _reference(logits)
    whole = token_logprobs(logits, next_ids, top_n=4, token_ids=[5, 0])
    chunked = token_logprobs(logits, next_ids.tolist(), top_n=4, token_ids=[5, 0], max_chunk_elems=2 * V)
    assert chunked == whole
    assert len(whole.logprobs) == n
    for i in range(n):
        assert abs(whole.logprobs[i] - ref[i, next_ids[i]].item()) < 1e-6
        _check_top(whole.top_logprobs[i], ref[i], 4)
        assert [t for _, t in whole.token_ids_logprobs[i]] == [5, 0]
        assert all(abs(lp - ref[i, t].item()) < 1e-6 for lp, t in whole.token_ids_logprobs[i])
    lps, tops, id_lps = whole  # the model runner unpacks it
    assert (lps, tops, id_lps) == (whole.logprobs, whole.top_logprobs, whole.token_ids_logprobs)
    bare = token_logprobs(logits, next_ids)
    assert bare.top_logprobs == [None] * n and bare.token_ids_logprobs == [None] * n
    assert bare.logprobs == whole.logprobs


def test_sampler_prompt_logprobs_cuts_padded_vocab():
    logits = torch.tensor([[0.0, math.log(3.0), 50.0]])
    out = Sampler(2, "cpu").prompt_logprobs(logits, [1], top_n=5)
    assert out.logprobs[0] == pytest.approx(math.log(0.75), abs=1e-6)
    assert [t for _, t in out.top_logprobs[0]] == [1, 0]


def test_asked_ids_outside_vocab_raise():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        token_logprobs(torch.zeros(1, 4), [0], token_ids=[4])
