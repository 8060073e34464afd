"""One batch of greedy generation through an Engine of `tp_size` ranks (gloo on the CPU), for the
tensor-parallel parity tests: the test process is rank 0, `TensorParallelRanks` starts the others
as real processes.

    single, _ = tp_generate(model_dir, 1, prompts, max_new=6)
    out, expert_counts = tp_generate(model_dir, 2, prompts, max_new=6)
    assert_tp_parity(single, out, hf_greedy(model_dir, prompts, 6), tol=1e-5)

Checks on the way: every page is back after the batch, each rank's KV pool holds its share of the
KV heads, and no rank died. `expert_counts` is rank 0's expert-distribution record summed over the
passes ([layers, experts]; None for a dense model).
"""

from __future__ import annotations

import random

import pytest
import torch

from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.engine import Engine
from pdserve.shared.launch.tp_ranks import TensorParallelRanks
from pdserve.shared.models.tensor_parallel import kv_heads_per_rank
from tests.helpers import zygote


def tp_generate(
    model_dir: str, tp_size: int, prompts: list[list[int]], max_new: int
) -> tuple[list[dict], torch.Tensor | None]:
    args = EngineArgs(
        model_path=model_dir,
        device="cpu",
        dtype="float32",
        tp_size=tp_size,
        page_size=4,
        chunked_prefill_size=16,  # the long prompts prefill in chunks
        max_total_tokens=1024,
        expert_distribution_recorder_mode="stat",
    )
    died: list[tuple[int, int]] = []
    ranks = (
        TensorParallelRanks(args, on_rank_exit=lambda r, s: died.append((r, s)), popen=zygote.popen)
        if tp_size > 1
        else None
    )
    try:
        engine = Engine(args)
        recorder = engine.runner.expert_recorder
        if recorder is not None:
            recorder.start()
        out = engine.generate(prompts, {"temperature": 0.0, "max_new_tokens": max_new}, return_logprob=True)
        load = engine.load()
        assert load.num_free_pages + load.num_evictable_pages == load.num_total_pages
        kv_heads = kv_heads_per_rank(engine.model_config.num_kv_heads, tp_size)
        assert engine.runner.pool.kv.shape[4] == kv_heads
        counts = None if recorder is None else recorder.logical_count().sum(0)
    finally:
        if ranks is not None:
            ranks.close()
    assert not died
    return out, counts


def output_logprobs(out: dict) -> list[float]:
    return [lp for lp, _tok, *_ in out["meta_info"]["output_token_logprobs"]]


def assert_tp_parity(
    single: list[dict], sharded: list[dict], reference: list[tuple[list[int], list[float]]], tol: float
) -> None:
    """Each prompt's greedy tokens equal at TP=1, sharded and in transformers; logprobs within `tol`."""
    for one, many, (hf_ids, hf_lps) in zip(single, sharded, reference, strict=True):
        assert many["output_ids"] == one["output_ids"] == hf_ids
        assert output_logprobs(many) == pytest.approx(output_logprobs(one), abs=tol)
        assert output_logprobs(many) == pytest.approx(hf_lps, abs=tol)


def random_prompts(lengths: tuple[int, ...], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(n)] for n in lengths]


def check_sharded_generation(
    model_dir: str, tp_sizes: tuple[int, ...], prompts: list[list[int]], max_new: int = 6, tol: float = 1e-5
) -> None:
    """At each of `tp_sizes`: `assert_tp_parity` against TP=1 and transformers (logprobs within
    `tol`) and, for an MoE model, rank 0's expert-distribution record equal to TP=1's (routing is
    replicated)."""
    from tests.helpers.hf_reference import hf_greedy

    single, single_counts = tp_generate(model_dir, 1, prompts, max_new)
    reference = hf_greedy(model_dir, prompts, max_new)
    for tp_size in tp_sizes:
        sharded, counts = tp_generate(model_dir, tp_size, prompts, max_new)
        assert_tp_parity(single, sharded, reference, tol)
        if single_counts is None:
            assert counts is None
        else:
            assert single_counts.sum() > 0
            assert counts is not None and torch.equal(counts, single_counts), tp_size
