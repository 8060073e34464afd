"""cuda_ipc between real processes on CPU (tests/helpers/kv_transfer_peer.py): the receiver's pool is
shared memory that the sender's process maps and writes, through the receiver's write gate.

- bit-exact bfloat16 (random bytes) from two sender processes into one receiver: odd page counts,
  pages in random order, several chunks, reserves untouched, nothing written elsewhere;
- SIGKILL of the sender mid-transfer: the receiver is Failed within 5 s with its gate slot closed,
  then a new sender process completes a transfer into the same receiving manager;
- SIGKILL of the receiver mid-transfer: the sender is Failed within 5 s and drops its mapping.
(tests/gpu/test_kvtransfer_cuda_ipc.py runs the same on one GPU through CUDA IPC.)
"""

from __future__ import annotations

import random
import signal
import time

import pytest

from tests.helpers import ipc_transfers as ipc
from tests.helpers.ipc_transfers import IDLE, peer_processes
from tests.helpers.ipc_transfers import manager_stats as stats
from tests.helpers.ipc_transfers import transfer_request as request
from tests.helpers.kv_peer_process import PeerProcess

SHAPE = [3, 96, 4, 2, 16]  # layers, pages, page_size, heads, head_dim
SEED_A, SEED_B, SEED_D = 301, 302, 303


def open_manager(peer: PeerProcess, seed: int) -> str:
    cmd = {"name": "m", "backend": "cuda_ipc", "device": "cpu", "dtype": "bfloat16", "shape": SHAPE}
    return peer.call("open", seed=seed, **cmd)["endpoint"]


@pytest.fixture
def procs():
    yield from peer_processes()


def random_requests(src: str, dst: str, seed: int, rng: random.Random, dst_free: list[int], prefix: str):
    return ipc.random_requests(src, dst, seed, rng, dst_free, prefix, SHAPE[1], (1, 3, 7, 11))


def test_bit_exact_between_processes(procs):
    sender_a, sender_b, receiver = procs(), procs(), procs()
    src_a, src_b, dst = (
        open_manager(sender_a, SEED_A),
        open_manager(sender_b, SEED_B),
        open_manager(receiver, SEED_D),
    )
    rng = random.Random(7)
    dst_free = list(range(1, SHAPE[1]))
    rng.shuffle(dst_free)
    a = random_requests(src_a, dst, SEED_A, rng, dst_free, "a")
    b = random_requests(src_b, dst, SEED_B, rng, dst_free, "b")
    sender_a.request("send", manager="m", transfers=[s for s, _ in a], wait_s=30)
    sender_b.request("send", manager="m", transfers=[s for s, _ in b], wait_s=30)
    receiver.request("recv", manager="m", transfers=[r for _, r in a + b], wait_s=30)
    sent = {**sender_a.reply(60)["results"], **sender_b.reply(60)["results"]}
    received = receiver.reply(60)
    for rid, got in received["results"].items():
        assert sent[rid]["state"] == "Success", sent[rid]
        assert (got["state"], got["reason"], got["mismatched_cells"]) == ("Success", None, 0), (rid, got)
        assert got["first_output"] == {"token": 7, "rid": rid}
    assert received["foreign_writes"] == 0
    assert stats(sender_a) == stats(sender_b) == {**IDLE, "mapped_pools": 1}
    assert stats(receiver) == {**IDLE, "mapped_pools": 0}


def test_sender_killed_mid_transfer_then_a_new_sender_works(procs):
    receiver, doomed = procs(), procs()
    dst, src = open_manager(receiver, SEED_D), open_manager(doomed, SEED_A)
    send, recv = request(
        "k", src, dst, [[1, 2, 3], [4, 5]], [10, 11, 12, 13, 14], SEED_A, hold_before_chunk=1
    )
    receiver.request("recv", manager="m", transfers=[recv], wait_s=30)
    doomed.request("send", manager="m", transfers=[send], wait_s=60)
    receiver.wait_state("k", "Transferring")
    doomed.kill(signal.SIGKILL)
    killed_at = time.time()
    got = receiver.reply(30)
    assert got["results"]["k"]["state"] == "Failed" and got["results"]["k"]["t"] - killed_at < 5.0
    assert got["foreign_writes"] == 0
    assert stats(receiver)["gate_slots"] == 0
    doomed.close()

    fresh = procs()
    src = open_manager(fresh, SEED_B)
    send, recv = request("n", src, dst, [[7, 8], [9]], [20, 21, 22], SEED_B)
    fresh.request("send", manager="m", transfers=[send], wait_s=30)
    receiver.request("recv", manager="m", transfers=[recv], wait_s=30)
    assert fresh.reply(60)["results"]["n"]["state"] == "Success"
    got = receiver.reply(60)["results"]["n"]
    assert (got["state"], got["mismatched_cells"]) == ("Success", 0)


def test_receiver_killed_mid_transfer_fails_the_sender_and_drops_the_mapping(procs):
    sender, doomed = procs(), procs()
    src, dst = open_manager(sender, SEED_A), open_manager(doomed, SEED_D)
    send, recv = request("k", src, dst, [[1, 2, 3], [4]], [30, 31, 32, 33], SEED_A, hold_before_chunk=1)
    doomed.request("recv", manager="m", transfers=[recv], wait_s=60)
    sender.request("send", manager="m", transfers=[send], wait_s=30)
    sender.wait_state("k", "Transferring")  # the first chunk is in the receiver's pool: it is mapped
    doomed.kill(signal.SIGKILL)
    killed_at = time.time()
    got = sender.reply(30)["results"]["k"]
    assert got["state"] == "Failed" and got["t"] - killed_at < 5.0, got
    assert stats(sender) == {**IDLE, "mapped_pools": 0}
