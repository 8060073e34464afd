"""Seeded rows: reproducible whatever the batch around them; the draws follow softmax(logits / T)."""

import random

import torch

from pdserve.shared.engine.sampler import Sampler, SamplingInputs
from pdserve.shared.engine.sampling.noise import row_seed
from pdserve.shared.engine.sampling_params import SamplingParams

V = 64


def make_inputs(params, output):
    n = len(params)
    return SamplingInputs(
        params, [[] for _ in range(n)], output, [frozenset()] * n, [0] * n, [None] * n, [False] * n
    )


def test_row_seed_is_a_fixed_hash_of_seed_and_step():
    assert row_seed(7, 3) == row_seed(7, 3)
    assert 0 <= row_seed(-5, 0) < 2**63
    seeds = {row_seed(s, t) for s in range(-3, 30) for t in range(30)}
    assert len(seeds) == 33 * 30  # in particular (s, t+1) and (s+1, t) differ


def _target_rows(n):
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(n, V, generator=g) * 0.5  # flat enough that the draw is uncertain
    params = [SamplingParams(sampling_seed=1000 + i, temperature=0.9, top_p=0.95, top_k=50) for i in range(n)]
    outputs = [[1] * (i % 4) for i in range(n)]  # different steps
    return logits, params, outputs


def test_seeded_rows_reproduce_in_any_batch_order_and_size():
    n = 24
    logits, params, outputs = _target_rows(n)
    alone = [
        Sampler(V, "cpu", seed=0)
        .sample(logits[i : i + 1], make_inputs([params[i]], [outputs[i]]))
        .next_token_ids[0]
        for i in range(n)
    ]

    rng = random.Random(5)
    g = torch.Generator().manual_seed(12)
    for trial in range(3):
        # Shuffle the targets among extra rows: unseeded, greedy, penalised, other seeds.
        extras = 7 * trial + 3
        extra_params = [
            [
                SamplingParams(),
                SamplingParams(temperature=0.0),
                SamplingParams(sampling_seed=99, min_p=0.1),
                SamplingParams(frequency_penalty=1.0, top_k=5),
            ][j % 4]
            for j in range(extras)
        ]
        rows = [("t", i) for i in range(n)] + [("x", j) for j in range(extras)]
        rng.shuffle(rows)
        extra_logits = torch.randn(extras, V, generator=g)
        batch_logits = torch.stack([logits[i] if kind == "t" else extra_logits[i] for kind, i in rows])
        batch_params = [params[i] if kind == "t" else extra_params[i] for kind, i in rows]
        batch_outputs = [outputs[i] if kind == "t" else [2, 3] for kind, i in rows]
        sampler = Sampler(V, "cpu", seed=trial + 1)  # the worker seed does not matter for seeded rows
        got = sampler.sample(batch_logits, make_inputs(batch_params, batch_outputs)).next_token_ids
        assert [got[k] for k, (kind, _) in enumerate(rows) if kind == "t"] == [
            alone[i] for kind, i in rows if kind == "t"
        ]


def test_different_seeds_and_steps_give_different_draws():
    logits = torch.zeros(200, V)  # uniform over 64 tokens
    sampler = Sampler(V, "cpu")
    by_seed = sampler.sample(
        logits, make_inputs([SamplingParams(sampling_seed=s) for s in range(200)], [[]] * 200)
    )
    assert len(set(by_seed.next_token_ids)) > 50  # ~62.4 expected under uniform draws
    one = SamplingParams(sampling_seed=42)
    by_step = sampler.sample(logits, make_inputs([one] * 200, [[0] * t for t in range(200)]))
    assert len(set(by_step.next_token_ids)) > 50
    again = sampler.sample(logits, make_inputs([one] * 200, [[0] * t for t in range(200)]))
    assert again.next_token_ids == by_step.next_token_ids


def test_unseeded_rows_follow_the_sampler_seed():
    logits = torch.zeros(50, V)
    params = [SamplingParams() for _ in range(50)]
    a = Sampler(V, "cpu", seed=1).sample(logits, make_inputs(params, [[]] * 50)).next_token_ids
    b = Sampler(V, "cpu", seed=1).sample(logits, make_inputs(params, [[]] * 50)).next_token_ids
    c = Sampler(V, "cpu", seed=2).sample(logits, make_inputs(params, [[]] * 50)).next_token_ids
    assert a == b and a != c


def _frequencies(tokens, vocab):
    counts = torch.bincount(torch.tensor(tokens), minlength=vocab).float()
    return counts / counts.sum()


def test_empirical_distribution_matches_softmax_over_temperature():
    row = torch.tensor([1.0, 0.5, 0.0, -1.0, 0.2])
    temperature = 0.7
    expected = torch.softmax(row / temperature, dim=-1)
    n = 4000
    sampler = Sampler(5, "cpu", seed=0)
    seeded = sampler.sample(
        row.repeat(n, 1),
        make_inputs([SamplingParams(sampling_seed=s, temperature=temperature) for s in range(n)], [[]] * n),
    ).next_token_ids
    unseeded = sampler.sample(
        row.repeat(n, 1), make_inputs([SamplingParams(temperature=temperature)] * n, [[]] * n)
    ).next_token_ids
    # Std of a frequency is <= 0.008 at n = 4000; 0.03 is ~4 sigma.
    assert torch.allclose(_frequencies(seeded, 5), expected, atol=0.03)
    assert torch.allclose(_frequencies(unseeded, 5), expected, atol=0.03)
