"""TP=2 with decode CUDA graphs captured across the ranks (needs 2 GPUs): greedy tokens equal TP=2
without graphs and TP=1, on a tiny random Llama in float32, with overlap scheduling on (the CUDA
default: in-flight ids reach the follower by a device broadcast).

Thirteen requests with different output lengths finish one after another, so the decode batch
shrinks from 13 (over the largest graph, 8: eager on every rank) through the buckets 8, 4, 2 and 1
(graph steps the follower replays in rank 0's bucket). The test process is rank 0; rank 1 is a real
follower process on cuda:1 (shared/launch/tp_ranks.py).
"""

from __future__ import annotations

import gc
import random
from pathlib import Path

import pytest
import torch

from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.engine import Engine
from pdserve.shared.engine.tp_decode_graphs import TPDecodeGraphs
from pdserve.shared.launch.tp_ranks import TensorParallelRanks
from pdserve.shared.protocol import GenerateRequest
from tests.helpers.tiny_models import make_tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        torch.cuda.device_count() < 2,
        reason=f"needs 2 GPUs for TP=2 (cuda:0 and cuda:1), found {torch.cuda.device_count()}",
    ),
]

MAX_BS = 8
NUM_REQUESTS = 13


def _requests() -> list[GenerateRequest]:
    rng = random.Random(3)
    return [
        GenerateRequest(
            rid=f"r{i}",
            input_ids=[rng.randrange(3, 500) for _ in range(rng.choice((1, 9, 40)))],
            sampling_params={"temperature": 0.0, "max_new_tokens": 2 + 3 * i, "ignore_eos": True},
        )
        for i in range(NUM_REQUESTS)
    ]


def _generate(model_dir: str, tp_size: int, graphs: bool) -> dict[str, list[int]]:
    args = EngineArgs(
        model_path=model_dir,
        device="cuda",
        dtype="float32",
        tp_size=tp_size,
        cuda_graph_max_bs=MAX_BS,
        disable_cuda_graph=not graphs,
        max_total_tokens=8192,
    )
    died: list[tuple[int, int]] = []
    ranks = TensorParallelRanks(args, on_rank_exit=lambda r, s: died.append((r, s))) if tp_size > 1 else None
    engine = None
    try:
        engine = Engine(args)
        assert engine.pipeline.overlap
        if graphs:
            assert engine.runner.graphs is not None
            assert isinstance(engine.runner.graphs, TPDecodeGraphs) == (tp_size > 1)
        for req in _requests():
            engine.add_request(req)
        tokens: dict[str, list[int]] = {}
        while engine.has_work():
            for out in engine.step():
                tokens.setdefault(out.rid, []).extend(out.token_ids)
        assert engine.pipeline.num_overlapped_steps > 0
        load = engine.load()
        assert load.num_free_pages + load.num_evictable_pages == load.num_total_pages
    finally:
        engine = None  # the graphs go before the process group they captured
        gc.collect()
        torch.cuda.empty_cache()
        if ranks is not None:
            ranks.close()
    assert not died
    return tokens


def test_tp2_graphs_equal_tp2_eager_and_tp1(tmp_path: Path):
    model_dir = str(make_tiny_model("llama", tmp_path))
    single = _generate(model_dir, 1, graphs=True)
    eager = _generate(model_dir, 2, graphs=False)
    graphed = _generate(model_dir, 2, graphs=True)
    assert sorted(single) == [f"r{i}" for i in range(NUM_REQUESTS)]
    assert [len(single[f"r{i}"]) for i in range(NUM_REQUESTS)] == [2 + 3 * i for i in range(NUM_REQUESTS)]
    assert graphed == eager == single
