"""Sampler: greedy, filters' support, penalties and masks through `Sampler.sample`, padded vocab."""

import math

import torch

from pdserve.shared.engine.sampler import Sampler, SamplingInputs
from pdserve.shared.engine.sampling_params import SamplingParams


def make_inputs(params, prompt=None, output=None, eos=None, return_logprob=None, top=None, ids=None):
    n = len(params)
    return SamplingInputs(
        params=params,
        prompt_ids=prompt or [[] for _ in range(n)],
        output_ids=output or [[] for _ in range(n)],
        eos_token_ids=eos or [frozenset() for _ in range(n)],
        top_logprobs_num=top or [0] * n,
        token_ids_logprob=ids or [None] * n,
        return_logprob=return_logprob or [False] * n,
    )


def draw_support(logits_row, n=400, **kw) -> set[int]:
    """Tokens ever drawn by n seeded copies of one row (seeds 0..n-1)."""
    sampler = Sampler(len(logits_row), "cpu")
    logits = torch.tensor([logits_row] * n)
    params = [SamplingParams(sampling_seed=s, **kw) for s in range(n)]
    return set(sampler.sample(logits, make_inputs(params)).next_token_ids)


PROBS = [0.35, 0.25, 0.2, 0.12, 0.08]
LOGITS = [math.log(p) for p in PROBS]


def test_temperature_zero_is_argmax_in_any_dtype():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0))
    sampler = Sampler(50, "cpu")
    params = [SamplingParams(temperature=0.0) for _ in range(8)]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = logits.to(dtype)
        out = sampler.sample(x, make_inputs(params))
        assert out.next_token_ids == x.float().argmax(-1).tolist()
        assert out.logprobs == [None] * 8


def test_top_k_one_equals_greedy_also_with_penalties():
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(1))
    sampler = Sampler(40, "cpu", seed=3)
    output = [[int(logits[i].argmax())] for i in range(6)]  # penalising the argmax moves the choice
    kw = {"repetition_penalty": 1.7, "frequency_penalty": 0.4}
    greedy = sampler.sample(logits, make_inputs([SamplingParams(temperature=0.0, **kw)] * 6, output=output))
    top1 = sampler.sample(
        logits, make_inputs([SamplingParams(temperature=1.3, top_k=1, **kw)] * 6, output=output)
    )
    assert top1.next_token_ids == greedy.next_token_ids
    assert greedy.next_token_ids != logits.argmax(-1).tolist()


def test_greedy_tie_goes_to_lowest_id():
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0]])
    out = Sampler(4, "cpu").sample(logits, make_inputs([SamplingParams(temperature=0.0)]))
    assert out.next_token_ids == [1]


def test_filters_support_is_exact():
    assert draw_support(LOGITS) == {0, 1, 2, 3, 4}
    assert draw_support(LOGITS, top_k=3) == {0, 1, 2}
    assert draw_support(LOGITS, top_p=0.7) == {0, 1, 2}  # id 2 crosses 0.7 (0.6 before it) and stays
    assert draw_support(LOGITS, top_p=0.3) == {0}
    assert draw_support(LOGITS, min_p=0.5) == {0, 1, 2}  # prob >= 0.175
    assert draw_support(LOGITS, min_p=0.3) == {0, 1, 2, 3}  # prob >= 0.105
    # top_p acts on the top_k-renormalised distribution: mass before id 2 is 0.6 / 0.92 > 0.62.
    assert draw_support(LOGITS, top_p=0.62) == {0, 1, 2}
    assert draw_support(LOGITS, top_k=4, top_p=0.62) == {0, 1}
    assert draw_support(LOGITS, temperature=0.5, top_k=4, min_p=0.4) == {0, 1}  # T sharpens: 0.51, 0.26


def test_top_k_tie_at_boundary_keeps_lowest_ids_when_sampling():
    assert draw_support([1.0, 0.0, 1.0, 1.0, 1.0], top_k=2) == {0, 2}


def test_mixed_batch_rows_keep_their_own_rules():
    sampler = Sampler(5, "cpu")
    n = 300
    params = []
    for s in range(n):
        params += [
            SamplingParams(sampling_seed=s, top_k=2),
            SamplingParams(temperature=0.0),
            SamplingParams(sampling_seed=s, min_p=0.3),
        ]
    logits = torch.tensor([LOGITS, LOGITS[::-1], LOGITS] * n)
    got = sampler.sample(logits, make_inputs(params)).next_token_ids
    assert set(got[0::3]) == {0, 1}
    assert set(got[1::3]) == {4}
    assert set(got[2::3]) == {0, 1, 2, 3}


def test_repetition_penalty_changes_the_greedy_choice():
    logits = torch.tensor([[2.0, -1.0, 1.5, 0.5]])
    sampler = Sampler(4, "cpu")
    plain = sampler.sample(logits, make_inputs([SamplingParams(temperature=0.0)], prompt=[[0]]))
    penalised = sampler.sample(
        logits, make_inputs([SamplingParams(temperature=0.0, repetition_penalty=1.5)], prompt=[[0]])
    )
    assert plain.next_token_ids == [0]
    assert penalised.next_token_ids == [2]  # 2.0 / 1.5 = 1.33 < 1.5


def test_frequency_presence_change_the_greedy_choice_from_output_only():
    logits = torch.tensor([[2.0, 1.8, 1.0, 0.0]] * 3)
    params = [
        SamplingParams(temperature=0.0, frequency_penalty=0.5, presence_penalty=0.25),  # 0.75, 1.05, 1.0
        SamplingParams(temperature=0.0, presence_penalty=1.5),  # 0.5, 0.3, 1.0
        SamplingParams(temperature=0.0, frequency_penalty=2.0),  # prompt tokens do not count
    ]
    out = Sampler(4, "cpu").sample(
        logits, make_inputs(params, prompt=[[], [], [0, 0, 1]], output=[[0, 0, 1], [0, 0, 1], []])
    )
    assert out.next_token_ids == [1, 2, 0]


def test_logit_bias_forces_and_bans_tokens():
    logits = torch.tensor([LOGITS] * 2)
    sampler = Sampler(5, "cpu")
    out = sampler.sample(logits, make_inputs([SamplingParams(temperature=0.0, logit_bias={"4": 10.0})] * 2))
    assert out.next_token_ids == [4, 4]
    assert draw_support(LOGITS, logit_bias={"0": -100.0, "1": -100.0}) == {2, 3, 4}


def test_min_new_tokens_masks_eos_and_stop_ids_until_reached():
    # eos 0 and stop id 1 dominate; before min_new_tokens they can never be drawn.
    row = [5.0, 5.0, 0.0, 0.0, -1.0]
    n = 300
    sampler = Sampler(5, "cpu")
    params = [SamplingParams(sampling_seed=s, min_new_tokens=3, stop_token_ids=[1]) for s in range(n)]
    eos = [frozenset({0})] * n
    early = sampler.sample(torch.tensor([row] * n), make_inputs(params, output=[[2, 3]] * n, eos=eos))
    assert set(early.next_token_ids) == {2, 3, 4}
    done = sampler.sample(torch.tensor([row] * n), make_inputs(params, output=[[2, 3, 2]] * n, eos=eos))
    assert {0, 1} <= set(done.next_token_ids)
    greedy = sampler.sample(
        torch.tensor([row]),
        make_inputs([SamplingParams(temperature=0.0, min_new_tokens=1)], eos=[frozenset({0, 1})]),
    )
    assert greedy.next_token_ids == [2]


def test_padded_vocab_columns_are_never_sampled_nor_in_logprobs():
    logits = torch.tensor([[0.0, 1.0, 0.5, 100.0, 100.0]] * 2)  # vocab 3, two padded columns
    sampler = Sampler(3, "cpu")
    params = [SamplingParams(temperature=0.0), SamplingParams(sampling_seed=1)]
    out = sampler.sample(logits, make_inputs(params, return_logprob=[True, True], top=[5, 5]))
    assert out.next_token_ids[0] == 1 and out.next_token_ids[1] in {0, 1, 2}
    assert [t for _, t in out.top_logprobs[0]] == [1, 2, 0]
    assert abs(sum(math.exp(lp) for lp, _ in out.top_logprobs[0]) - 1.0) < 1e-6


def test_empty_batch():
    out = Sampler(4, "cpu").sample(torch.empty(0, 4), make_inputs([]))
    assert out.next_token_ids == [] and out.logprobs == []


def test_tiny_temperature_behaves_as_greedy_not_nan():
    logits = torch.tensor([[30.0, 29.0, -5.0, 31.0]] * 50)
    params = [SamplingParams(sampling_seed=s, temperature=1e-30) for s in range(50)]
    assert set(Sampler(4, "cpu").sample(logits, make_inputs(params)).next_token_ids) == {3}
