"""The KV manager of a tensor-parallel worker (shared/engine/tp_kv_transfer.py) over the fake
backend, in one process: rank 0's manager, the followers' FollowerKV stepped by the test through
the real step channel (tp_steps.py) and report sockets, so every state between ranks is seen.

- same widths (P TP=2 -> D TP=2): rank i's pages land in rank i, bit-exact; poll is the minimum
  over ranks (a follower that has not acted keeps the request Bootstrapping); first_output is rank 0's;
- different widths (P TP=2 -> D TP=1, P TP=1 -> D TP=4, replicated heads on either side): each decode head
  holds the prefill rank's slice that holds it;
- a follower's failure fails the request on rank 0 with that rank's reason;
- different widths with a side that moves whole pools only (cuda_ipc, nccl) are refused by name
  when the handle is made, on either side: nothing moves.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
import zmq

from pdserve.kvtransfer import FakeTransferHub, KVPoll, KVTransferError
from pdserve.kvtransfer.rank_kv import RankKV
from pdserve.kvtransfer.tp_legs import RankEndpoint, WorkerKVEndpoint, plan_legs
from pdserve.shared.engine.kv_pool import KVPoolShape, PagedKVPool
from pdserve.shared.engine.tp_kv_follower import FollowerKV, follower_heads
from pdserve.shared.engine.tp_kv_transfer import TPKVManager
from pdserve.shared.engine.tp_steps import StepReceiver, StepSender
from pdserve.shared.models.tensor_parallel import kv_heads_per_rank
from pdserve.shared.models.tensor_parallel_layers import TPRank

KV_HEADS = 4
LAYERS, PAGES, PAGE_SIZE, HEAD_DIM = 2, 12, 4, 8


class Worker:
    """A worker of len(pools) ranks in this process: rank 0's manager and the stepped followers."""

    def __init__(self, name: str, hub: FakeTransferHub, width: int, dtype: torch.dtype = torch.float32):
        heads = kv_heads_per_rank(KV_HEADS, width)
        shape = KVPoolShape(LAYERS, PAGES, PAGE_SIZE, heads, HEAD_DIM)
        self.pools = [PagedKVPool(shape, torch.float32 if r == 0 else dtype, "cpu") for r in range(width)]
        self.heads = [follower_heads(p, TPRank(r, width), KV_HEADS) for r, p in enumerate(self.pools)]
        local = RankKV.open("fake", self.pools[0], name, self.heads[0], hub=hub)
        self.manager = TPKVManager("fake", local, self.pools[0], name, None)
        self.followers: list[tuple[FollowerKV, StepReceiver]] = []
        if width == 1:
            return
        ctx = zmq.Context.instance()
        self.steps = StepSender(ctx, width - 1)
        for r in range(1, width):
            kv = FollowerKV(self.pools[r], r, self.heads[r], {"hub": hub})
            self.followers.append((kv, StepReceiver(ctx, self.steps.addresses[r - 1])))
        opening = threading.Thread(
            target=self.manager.open_followers, args=(self.steps.send_control, width - 1, "127.0.0.1", {})
        )
        opening.start()
        while opening.is_alive():
            self.step()
        opening.join()

    def step(self) -> None:
        """Each follower acts on what rank 0 sent, then reports (its loop's work between passes)."""
        for kv, receiver in self.followers:
            while (msg := receiver.receive(kv.pool, None, torch.device("cpu"), 0.001)) is not None:
                kv.handlers()[type(msg)](msg)
            kv.pump()

    def close(self) -> None:
        self.manager.close()
        self.step()
        for kv, receiver in self.followers:
            kv.close()
            receiver.close()
        if self.followers:
            self.steps.close()


def settle(workers: list[Worker], handle, state: KVPoll) -> None:
    deadline = time.monotonic() + 10
    while handle.poll() != state:
        assert time.monotonic() < deadline, f"still {handle.poll()!r}, expected {state!r}"
        for w in workers:
            w.step()
        time.sleep(0.002)


def fill(worker: Worker, pages: list[int]) -> None:
    """Random K/V per global head: ranks that replicate a head hold the same values, as computed."""
    for pool, heads in zip(worker.pools, worker.heads):
        for k, head in enumerate(heads):
            torch.manual_seed(head)
            pool.kv[:, :, pages, :, k] = torch.randn_like(pool.kv[:, :, pages, :, k])


def by_global_head(worker: Worker, pages: list[int]) -> torch.Tensor:
    """[layers, planes, pages, page_size, KV_HEADS, head_dim]: each head as a rank holding it has it."""
    out = torch.full((LAYERS, 2, len(pages), PAGE_SIZE, KV_HEADS, HEAD_DIM), float("nan"))
    for pool, heads in zip(worker.pools, worker.heads):
        for k, head in enumerate(heads):
            out[:, :, :, :, head] = pool.kv[:, :, pages, :, k].float()
    return out


@pytest.fixture
def hub() -> FakeTransferHub:
    return FakeTransferHub()


def transfer(p: Worker, d: Worker, src: list[int], dst: list[int]):
    sender = p.manager.make_sender("r1", d.manager.endpoint)
    receiver = d.manager.make_receiver("r1", p.manager.endpoint)
    receiver.init(dst)
    return sender, receiver


def test_same_widths_move_rank_i_to_rank_i_and_poll_is_the_minimum(hub):
    p, d = Worker("p", hub, 2), Worker("d", hub, 2)
    src, dst = [1, 2, 3], [7, 5, 9]
    fill(p, src)
    sender, receiver = transfer(p, d, src, dst)
    ((_, own_leg),) = p.manager.local.legs(0).items()
    assert own_leg.poll() == KVPoll.WaitingForInput  # rank 0's leg is ready, rank 1 has not acted
    assert sender.poll() == KVPoll.Bootstrapping and receiver.poll() == KVPoll.Bootstrapping
    settle([p, d], sender, KVPoll.WaitingForInput)
    sender.send(src, is_last=True, first_output={"token": 42})
    settle([p, d], receiver, KVPoll.Success)
    settle([p, d], sender, KVPoll.Success)
    assert receiver.first_output == {"token": 42}
    for p_pool, d_pool in zip(p.pools, d.pools):
        assert torch.equal(d_pool.kv[:, :, dst], p_pool.kv[:, :, src])
    assert hub.open_links() == 0
    p.close(), d.close()


@pytest.mark.parametrize(("p_width", "d_width"), [(2, 1), (1, 4), (4, 2), (8, 2), (2, 8)])
def test_different_widths_land_each_head_in_its_slice(hub, p_width, d_width):
    p, d = Worker("p", hub, p_width), Worker("d", hub, d_width)
    src, dst = [2, 4], [3, 1]
    fill(p, src)
    sender, receiver = transfer(p, d, src, dst)
    settle([p, d], sender, KVPoll.WaitingForInput)
    sender.send(src[:1], is_last=False)
    sender.send(src[1:], is_last=True, first_output={"token": 7})
    settle([p, d], receiver, KVPoll.Success)
    settle([p, d], sender, KVPoll.Success)
    assert receiver.first_output == {"token": 7}
    assert torch.equal(by_global_head(d, dst), by_global_head(p, src))
    for pool, heads in zip(d.pools, d.heads):  # replicated heads too: every rank's copy
        assert torch.equal(pool.kv[:, :, dst], by_global_head(p, src)[:, :, :, :, heads])
    assert hub.open_links() == 0
    p.close(), d.close()


def test_a_follower_failure_fails_the_request_with_its_reason(hub):
    p, d = Worker("p", hub, 2), Worker("d", hub, 2, dtype=torch.float16)  # rank 1 pools disagree
    sender, receiver = transfer(p, d, [1], [2])
    settle([p, d], receiver, KVPoll.Failed)
    settle([p, d], sender, KVPoll.Failed)
    for handle in (sender, receiver):
        assert "tensor-parallel rank 1" in handle.failure_reason
        assert "dtype mismatch" in handle.failure_reason
    assert not p.manager.local.legs(0) and not d.manager.local.legs(0)  # rank 0's legs aborted
    deadline = time.monotonic() + 5
    while hub.open_links():
        assert time.monotonic() < deadline, "links left open"
        p.step(), d.step()
    p.close(), d.close()


def test_different_widths_without_head_slices_are_refused_by_name():
    prefill = WorkerKVEndpoint("nccl", [RankEndpoint("nccl://a"), RankEndpoint("nccl://b")])
    decode = WorkerKVEndpoint.parse("nccl://c")
    with pytest.raises(KVTransferError, match=r"--tp 2 cannot send KV to a decode worker of --tp 1"):
        plan_legs(prefill, decode, own_sends=True)
    assert [leg.peer for leg in plan_legs(decode, decode, own_sends=False)] == ["nccl://c"]


def test_a_rank_without_head_slices_refuses_another_width_when_the_handle_is_made(hub):
    p = Worker("p", hub, 2)
    shape = KVPoolShape(LAYERS, PAGES, PAGE_SIZE, KV_HEADS, HEAD_DIM)
    pool = PagedKVPool(shape, torch.float32, "cpu")
    whole_pools_only = RankKV.open("fake", pool, "d", list(range(KV_HEADS)), hub=hub)
    whole_pools_only.full.moves_head_slices = False  # as cuda_ipc's or nccl's manager says
    d = TPKVManager("fake", whole_pools_only, pool, "d", None)
    assert d.endpoint == whole_pools_only.full.endpoint  # one rank, whole pools: the plain endpoint
    with pytest.raises(KVTransferError, match=r"--tp 2 cannot send KV to a decode worker of --tp 1"):
        d.make_receiver("r1", p.manager.endpoint)
    with pytest.raises(KVTransferError, match=r"--tp 2 cannot send KV to a decode worker of --tp 1"):
        p.manager.make_sender("r1", d.endpoint)
    assert hub.open_links() == 0
    d.close(), p.close()
