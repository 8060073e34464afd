"""bench/bench_embeddings.py's own checks: the inputs it sends and the answers it accepts."""

from __future__ import annotations

import math

import pytest

from pdserve.bench.bench_embeddings import check_answer, random_sequences


def test_random_sequences_are_reproducible_and_clear_of_the_vocabulary_ends():
    seqs = random_sequences(4, 16, 151646, seed=3)
    assert seqs == random_sequences(4, 16, 151646, seed=3)
    assert [len(s) for s in seqs] == [16] * 4
    assert all(1000 <= t < 151646 - 1000 for s in seqs for t in s)
    small = random_sequences(2, 8, 100)  # a tiny vocabulary still gives valid ids
    assert all(0 <= t < 100 for s in small for t in s)


def _unit(n: int) -> list[float]:
    return [1.0 / math.sqrt(n)] * n


def test_check_answer_takes_one_unit_vector_per_input():
    check_answer({"data": [{"embedding": _unit(8)}, {"embedding": _unit(8)}]}, 2, 8)


@pytest.mark.parametrize(
    "body",
    [
        {"data": [{"embedding": _unit(8)}]},  # one answer for two inputs
        {"data": [{"embedding": _unit(8)}, {"embedding": _unit(4)}]},  # wrong size
        {"data": [{"embedding": _unit(8)}, {"embedding": [1.0] * 8}]},  # not normalised
        {"error": {"message": "x"}},
    ],
)
def test_check_answer_refuses_what_the_server_should_not_send(body):
    with pytest.raises(SystemExit):
        check_answer(body, 2, 8)
