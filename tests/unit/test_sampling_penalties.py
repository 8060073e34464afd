"""Penalty formulas on fixed logits; the expected values are computed by hand."""

import torch

from pdserve.shared.engine.sampling.penalties import (
    apply_frequency_presence,
    apply_logit_bias,
    apply_repetition_penalty,
    mask_tokens,
)

NEG = float("-inf")


def test_repetition_penalty_divides_positive_multiplies_negative_over_prompt_and_output():
    x = torch.tensor([[2.0, -1.0, 1.5, 0.5, -0.5], [2.0, -1.0, 1.5, 0.5, -0.5]])
    # Row 0: token 1 occurs twice, still penalised once. Row 1: penalty 1 leaves it untouched.
    apply_repetition_penalty(x, [2.0, 1.0], [[0, 1], [0, 1]], [[1, 3, 1], [3]])
    assert x.tolist() == [[1.0, -2.0, 1.5, 0.25, -0.5], [2.0, -1.0, 1.5, 0.5, -0.5]]


def test_repetition_penalty_below_one_rewards():
    x = torch.tensor([[2.0, -1.0, 0.0]])
    apply_repetition_penalty(x, [0.5], [[0, 1, 2]], [[]])
    assert x.tolist() == [[4.0, -0.5, 0.0]]


def test_frequency_and_presence_count_output_tokens_only():
    x = torch.tensor([[2.0, 1.8, 1.0, 0.0]] * 3)
    apply_frequency_presence(x, [0.5, 0.0, 0.0], [0.25, 1.5, 0.0], [[0, 0, 1], [0, 0, 1], [0]])
    expected = [
        [2.0 - (2 * 0.5 + 0.25), 1.8 - (0.5 + 0.25), 1.0, 0.0],
        [2.0 - 1.5, 1.8 - 1.5, 1.0, 0.0],
        [2.0, 1.8, 1.0, 0.0],
    ]
    assert torch.allclose(x, torch.tensor(expected), atol=1e-6, rtol=0)


def test_negative_frequency_penalty_rewards_repeats():
    x = torch.zeros(1, 3)
    apply_frequency_presence(x, [-1.0], [0.0], [[2, 2, 2]])
    assert x.tolist() == [[0.0, 0.0, 3.0]]


def test_logit_bias_adds_and_duplicate_keys_sum():
    x = torch.zeros(2, 4)
    apply_logit_bias(x, [{"3": 5.0, "0": -2.5}, {"1": 1.0, "01": 0.5}])
    assert x.tolist() == [[-2.5, 0.0, 0.0, 5.0], [0.0, 1.5, 0.0, 0.0]]


def test_mask_tokens_ignores_out_of_vocab_and_empty_rows():
    x = torch.zeros(3, 4)
    mask_tokens(x, [{1, 3, 99}, None, set()])
    assert x.tolist() == [[0.0, NEG, 0.0, NEG], [0.0] * 4, [0.0] * 4]
