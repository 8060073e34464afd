"""CUDA graphs across tensor-parallel ranks, the parts the CPU can check (tp_decode_graphs.py):

- a graph step's round trip through a real step channel (ZMQ on loopback), in order with the
  other messages;
- a follower replays exactly the bucket rank 0 chose, and refuses a step its graphs cannot match;
- every rank's capture order is agreed through the process group (two gloo ranks, real processes),
  and a rank whose buckets differ makes every rank refuse;
- overlap: rank 0's in-flight ids, resolved on its device, reach the follower's ids buffer through
  the broadcast the graph step asks for.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import zmq

from pdserve.shared.engine.attention_ref import TorchRefAttention
from pdserve.shared.engine.cuda_graph_runner import (
    DecodeInputs,
    batch_size_buckets,
    capture_order,
    pack_decode_inputs,
    smallest_bucket,
)
from pdserve.shared.engine.in_flight import FutureTokenIds
from pdserve.shared.engine.request import Req
from pdserve.shared.engine.sampling_params import SamplingParams
from pdserve.shared.engine.tp_decode_graphs import (
    agree_on_capture_order,
    follower_bucket,
    receive_rank0_ids,
    resolve_and_broadcast_ids,
)
from pdserve.shared.engine.tp_graph_step import GraphStep
from pdserve.shared.engine.tp_steps import ReloadWeights, StepReceiver, StepSender
from pdserve.shared.models.tensor_parallel_layers import TPRank


def _step(batch_size: int, pages_per_req: int = 3) -> DecodeInputs:
    ids = [100 + i for i in range(batch_size)]
    positions = [5 * i + 2 for i in range(batch_size)]
    pages = [
        [7 * i + j + 1 for j in range(1 + (i + pages_per_req) % pages_per_req)] for i in range(batch_size)
    ]
    slots = [pages[i][0] * 4 + 1 for i in range(batch_size)]
    return DecodeInputs(ids, positions, slots, pages)


def _graph_step(step: DecodeInputs, buckets: list[int], ids_from_rank0: bool = False) -> GraphStep:
    """What rank 0 sends for `step` (TPDecodeGraphs.replay: DecodeGraphRunner.pack's choice)."""
    width = max(len(r) for r in step.page_rows)
    meta, table = pack_decode_inputs(step, smallest_bucket(buckets, step.batch_size), width)
    return GraphStep(meta, table, ids_from_rank0)


def test_graph_step_round_trips_through_the_step_channel_in_order():
    ctx = zmq.Context()
    sender = StepSender(ctx, 1)
    receiver = StepReceiver(ctx, sender.addresses[0])
    try:
        buckets = batch_size_buckets(16)
        sent = [_graph_step(_step(bs), buckets, ids_from_rank0=bs % 2 == 1) for bs in (1, 3, 13)]
        sender.send_graph_step(sent[0])
        sender.send_control(ReloadWeights("/nowhere", "auto"))
        for step in sent[1:]:
            sender.send_graph_step(step)
        got = [receiver.receive(None, TorchRefAttention(), torch.device("cpu"), 5.0) for _ in range(4)]
        assert got[1] == ReloadWeights("/nowhere", "auto")
        for want, have in zip(sent, [got[0], *got[2:]], strict=True):
            assert isinstance(have, GraphStep)
            assert torch.equal(have.meta, want.meta) and have.meta.dtype == torch.int64
            assert torch.equal(have.table, want.table) and have.table.dtype == torch.int32
            assert (have.bucket, have.batch_size, have.ids_from_rank0) == (
                want.bucket,
                want.batch_size,
                want.ids_from_rank0,
            )
        assert [g.bucket for g in sent] == [1, 4, 16]
        assert receiver.receive(None, TorchRefAttention(), torch.device("cpu"), 0.05) is None
    finally:
        receiver.close()
        sender.close()
        ctx.term()


def test_follower_replays_the_bucket_rank_0_chose():
    buckets = batch_size_buckets(40)
    assert buckets == [1, 2, 4, 8, 16, 24, 32, 40]
    for bs in range(1, 41):
        step = _graph_step(_step(bs), buckets)
        assert follower_bucket(step, buckets) == step.bucket == smallest_bucket(buckets, bs)
    # graphs that differ across ranks are refused, never replayed in another bucket
    with pytest.raises(ValueError, match="bucket 16 for 12 requests"):
        follower_bucket(_graph_step(_step(12), batch_size_buckets(16)), batch_size_buckets(12))
    with pytest.raises(ValueError, match="bucket 24 for 20 requests"):
        follower_bucket(_graph_step(_step(20), batch_size_buckets(24)), batch_size_buckets(16))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, max_bs_of_rank: list[int], results) -> None:
    """One gloo rank: agree on the capture order, then the in-flight ids broadcast of a graph step."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        tp = TPRank.current()
        try:
            agree_on_capture_order(capture_order(batch_size_buckets(max_bs_of_rank[rank])), tp)
            agreed = "agreed"
        except ValueError as e:
            agreed = str(e)
        # the step before sampled [11, 22, 33] for reqs a, b, c; this step holds b, new, c (in flight)
        reqs = [Req(rid=r, input_ids=[1], params=SamplingParams()) for r in "abc"]
        futures = FutureTokenIds(reqs, torch.tensor([11, 22, 33]))
        ids = torch.tensor([futures.placeholder(reqs[1]), 57, futures.placeholder(reqs[2])])
        if rank == 0:
            resolve_and_broadcast_ids(futures.resolve, ids)
        else:
            receive_rank0_ids(ids)  # a follower's rows hold the placeholders rank 0 sent
        results.put((rank, agreed, ids.tolist()))
    finally:
        dist.destroy_process_group()


def _run_two_ranks(max_bs_of_rank: list[int]) -> dict[int, tuple[str, list[int]]]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    mp.start_processes(
        _rank_main, args=(_free_port(), max_bs_of_rank, results), nprocs=2, start_method="spawn", join=True
    )
    out = {}
    for _ in range(2):
        rank, agreed, ids = results.get(timeout=30)
        out[rank] = (agreed, ids)
    return out


@pytest.mark.timeout(120)
def test_ranks_agree_on_capture_order_and_share_in_flight_ids_over_gloo():
    same = _run_two_ranks([24, 24])
    assert same == {0: ("agreed", [22, 57, 33]), 1: ("agreed", [22, 57, 33])}
    differ = _run_two_ranks([24, 16])
    for rank in (0, 1):
        assert "capture orders differ" in differ[rank][0]
        assert differ[rank][1] == [22, 57, 33]
