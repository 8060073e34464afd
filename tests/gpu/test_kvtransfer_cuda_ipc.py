"""cuda_ipc between real processes on one GPU (tests/helpers/kv_transfer_peer.py): the receiver's pool
is mapped into the sender's process through CUDA IPC and pages are written in place.

- bit-exact bfloat16 (random bytes: every bit pattern) from two sender processes into one receiver
  on the same GPU: odd page counts, pages in random order on both sides, several chunks, a decode
  reserve left untouched, nothing written outside the transfers' pages; `auto` between two
  processes of one GPU picks cuda_ipc (the sender maps the pool);
- SIGKILL of the sender mid-transfer: the receiver is Failed within 5 s and its gate slot is
  closed; a new sender then completes a transfer into the same receiving manager;
- SIGKILL of the receiver mid-transfer: the sender is Failed within 5 s, drops its mapping of the
  dead pool, and the dead receiver's GPU memory comes back (no mapping pins it).
"""

from __future__ import annotations

import random
import signal
import time

import pytest
import torch

from tests.helpers import ipc_transfers as ipc
from tests.helpers.ipc_transfers import IDLE, peer_processes
from tests.helpers.ipc_transfers import manager_stats as stats
from tests.helpers.ipc_transfers import transfer_request as request
from tests.helpers.kv_peer_process import PeerProcess

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SHAPE = [4, 160, 16, 8, 128]  # layers, pages, page_size, heads, head_dim: 64 KiB page-layers in bf16
BIG_SHAPE = [8, 1024, 16, 8, 128]  # 512 MiB of bf16: enough to see it freed
SEED_A, SEED_B, SEED_D = 201, 202, 203


def open_manager(
    peer: PeerProcess, seed: int, backend: str = "cuda_ipc", shape=SHAPE, device: str = "cuda:0", **config
) -> str:
    cmd = {"name": "m", "backend": backend, "device": device, "dtype": "bfloat16", "shape": shape}
    return peer.call("open", seed=seed, timeout_s=120, **cmd, **config)["endpoint"]


@pytest.fixture
def procs():
    yield from peer_processes(start_timeout_s=120)


def random_requests(src: str, dst: str, seed: int, rng: random.Random, dst_free: list[int], prefix: str):
    return ipc.random_requests(src, dst, seed, rng, dst_free, prefix, SHAPE[1], (1, 3, 7, 13, 31))


TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs: the receiver on cuda:1")


@pytest.mark.parametrize(
    ("backend", "receiver_device"),
    [("cuda_ipc", "cuda:0"), ("auto", "cuda:0"), pytest.param("cuda_ipc", "cuda:1", marks=TWO_GPUS)],
)
def test_bit_exact_bf16_two_processes_one_gpu(procs, backend, receiver_device):
    """Two senders on cuda:0 into one receiver on cuda:0, or on cuda:1 where there are two GPUs."""
    sender_a, sender_b, receiver = procs(), procs(), procs()
    src_a = open_manager(sender_a, SEED_A, backend)
    src_b = open_manager(sender_b, SEED_B, backend)
    dst = open_manager(receiver, SEED_D, backend, device=receiver_device)
    rng = random.Random(11)
    dst_free = list(range(1, SHAPE[1]))
    rng.shuffle(dst_free)
    a = random_requests(src_a, dst, SEED_A, rng, dst_free, "a")
    b = random_requests(src_b, dst, SEED_B, rng, dst_free, "b")
    sender_a.request("send", manager="m", transfers=[s for s, _ in a], wait_s=60)
    sender_b.request("send", manager="m", transfers=[s for s, _ in b], wait_s=60)
    receiver.request("recv", manager="m", transfers=[r for _, r in a + b], wait_s=60)
    sent = {**sender_a.reply(90)["results"], **sender_b.reply(90)["results"]}
    received = receiver.reply(90)
    for rid, got in received["results"].items():
        assert sent[rid]["state"] == "Success", sent[rid]
        assert (got["state"], got["reason"], got["mismatched_cells"]) == ("Success", None, 0), (rid, got)
        assert got["first_output"] == {"token": 7, "rid": rid}
    assert received["foreign_writes"] == 0
    for peer in (sender_a, sender_b):
        assert stats(peer) == {**IDLE, "mapped_pools": 1}  # the receiver's pool, mapped once, kept
    assert stats(receiver) == {**IDLE, "mapped_pools": 0}


def test_sender_killed_mid_transfer_then_a_new_sender_works(procs):
    receiver, doomed = procs(), procs()
    dst = open_manager(receiver, SEED_D)
    src = open_manager(doomed, SEED_A)
    send, recv = request(
        "k", src, dst, [[1, 2, 3, 4], [5, 6]], list(range(10, 16)), SEED_A, hold_before_chunk=1
    )
    receiver.request("recv", manager="m", transfers=[recv], wait_s=60)
    doomed.request("send", manager="m", transfers=[send], wait_s=120)
    receiver.wait_state("k", "Transferring", timeout_s=60)
    doomed.kill(signal.SIGKILL)
    killed_at = time.time()
    got = receiver.reply(60)["results"]["k"]
    assert got["state"] == "Failed"
    assert got["t"] - killed_at < 5.0, got
    doomed.close()
    assert stats(receiver)["gate_slots"] == 0

    fresh = procs()
    src = open_manager(fresh, SEED_B)
    send, recv = request("n", src, dst, [[7, 8], [9]], [20, 21, 22], SEED_B)
    fresh.request("send", manager="m", transfers=[send], wait_s=60)
    receiver.request("recv", manager="m", transfers=[recv], wait_s=60)
    assert fresh.reply(90)["results"]["n"]["state"] == "Success"
    got = receiver.reply(90)["results"]["n"]
    assert (got["state"], got["mismatched_cells"]) == ("Success", 0)


def test_receiver_killed_mid_transfer_releases_its_pool(procs):
    torch.cuda.init()
    sender, doomed = procs(), procs()
    src = open_manager(sender, SEED_A, shape=BIG_SHAPE)
    dst = open_manager(doomed, SEED_D, shape=BIG_SHAPE)
    send, recv = request("k", src, dst, [[1, 2, 3], [4]], [30, 31, 32, 33], SEED_A, hold_before_chunk=1)
    doomed.request("recv", manager="m", transfers=[recv], wait_s=120)
    sender.request("send", manager="m", transfers=[send], wait_s=60)
    sender.wait_state("k", "Transferring", timeout_s=60)
    free_before = torch.cuda.mem_get_info(0)[0]
    doomed.kill(signal.SIGKILL)
    killed_at = time.time()
    got = sender.reply(60)["results"]["k"]
    assert got["state"] == "Failed"
    assert got["t"] - killed_at < 5.0, got
    assert stats(sender) == {**IDLE, "mapped_pools": 0}
    layers, pages, page_size, heads, dim = BIG_SHAPE
    pool_bytes = layers * 2 * pages * page_size * heads * dim * 2  # K and V, bf16
    deadline = time.monotonic() + 10
    while torch.cuda.mem_get_info(0)[0] - free_before < pool_bytes and time.monotonic() < deadline:
        time.sleep(0.1)  # the dead process's memory (its pool and more) goes back to the device
    assert torch.cuda.mem_get_info(0)[0] - free_before >= pool_bytes
