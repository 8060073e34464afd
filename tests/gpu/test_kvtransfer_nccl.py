"""KV transfer between GPU processes (needs 2 GPUs): nccl, and zmq from GPU pools through pinned host
memory. Real processes (tests/helpers/kv_transfer_peer.py), each seeing every GPU (NCCL wants peer
access for NVLink; do not narrow CUDA_VISIBLE_DEVICES per process).

- bit-exact bfloat16 (every bit pattern) from cuda:0 to cuda:1: several requests at once, several
  chunks each, messages cut small so a chunk is several NCCL sends, odd page counts, a decode
  reserve left untouched; two sender processes feeding one receiver at once (two NCCL pairs);
- SIGKILL of a sender mid-transfer: the receiver is Failed within 5 s, and the same receiving
  manager then completes a transfer from a new sender (a new NCCL link).
"""

from __future__ import annotations

import signal
import time

import pytest
import torch

from tests.helpers.kv_peer_process import PeerProcess

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        torch.cuda.device_count() < 2,
        reason=f"needs 2 GPUs for a cuda:0 -> cuda:1 transfer, found {torch.cuda.device_count()}",
    ),
]

SHAPE = [4, 160, 16, 8, 128]  # layers, pages, page_size, heads, head_dim: 64 KiB page-layers in bf16
MESSAGE_BYTES = 256 << 10  # 4 page-layers per message
SEED_A, SEED_B, SEED_D = 101, 102, 103


def open_manager(peer: PeerProcess, backend: str, device: str, seed: int, name: str = "m") -> str:
    option = {"nccl": "max_message_bytes", "zmq": "slab_bytes"}[backend]
    cmd = {
        "name": name,
        "backend": backend,
        "device": device,
        "dtype": "bfloat16",
        "shape": SHAPE,
        "seed": seed,
    }
    return peer.call("open", options={option: MESSAGE_BYTES}, **cmd)["endpoint"]


def request(rid: str, src: str, dst: str, chunks: list[list[int]], dst_pages: list[int], seed: int, **hold):
    src_pages = [p for c in chunks for p in c]
    send = {"rid": rid, "dest": dst, "chunks": chunks, "first_output": {"token": 7, "rid": rid}, **hold}
    recv = {"rid": rid, "src": src, "pages": dst_pages, "expect": {"seed": seed, "src_pages": src_pages}}
    return send, recv


@pytest.fixture(scope="module")
def procs():
    started: list[PeerProcess] = []

    def start() -> PeerProcess:
        started.append(PeerProcess(start_timeout_s=120))
        return started[-1]

    yield start
    for peer in started:
        peer.close()


@pytest.mark.parametrize("backend", ["nccl", "zmq"])
def test_bit_exact_bf16_between_gpus(procs, backend):
    sender_a, sender_b, receiver = procs(), procs(), procs()
    src_a = open_manager(sender_a, backend, "cuda:0", SEED_A)
    src_b = open_manager(sender_b, backend, "cuda:0", SEED_B)
    dst = open_manager(receiver, backend, "cuda:1", SEED_D)
    a = [
        request(
            "a1", src_a, dst, [[3, 9, 27], [81, 4], [5, 6, 7, 8, 10, 11, 12]], list(range(1, 16)), SEED_A
        ),
        request("a2", src_a, dst, [[100], []], [20], SEED_A),
        request("a3", src_a, dst, [list(range(40, 73))], list(range(30, 63)), SEED_A),
    ]
    b = [request("b1", src_b, dst, [[1, 2, 3, 4, 5], [150, 151]], list(range(70, 79)), SEED_B)]
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
    for peer in (sender_a, sender_b, receiver):
        stats = peer.call("stats", manager="m")["stats"]
        assert stats == {"senders": 0, "receivers": 0, "early": 0, "sending": 0, "peer_refs": 0}


def test_nccl_sender_killed_mid_transfer_then_a_new_pair_works(procs):
    receiver, doomed = procs(), procs()
    dst = open_manager(receiver, "nccl", "cuda:1", SEED_D)
    src = open_manager(doomed, "nccl", "cuda:0", SEED_A)
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

    fresh = procs()
    src = open_manager(fresh, "nccl", "cuda:0", SEED_B)
    send, recv = request("n", src, dst, [[7, 8], [9]], [20, 21, 22], SEED_B)
    fresh.request("send", manager="m", transfers=[send], wait_s=60)
    receiver.request("recv", manager="m", transfers=[recv], wait_s=60)
    assert fresh.reply(90)["results"]["n"]["state"] == "Success"
    got = receiver.reply(90)["results"]["n"]
    assert (got["state"], got["mismatched_cells"]) == ("Success", 0), got
