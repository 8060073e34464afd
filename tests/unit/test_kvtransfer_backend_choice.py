"""Which KV backend runs where: the worker-level choice of `auto`, the per-pair judgement of a
peer's shared pool, and `auto` managers choosing per pair for real (CPU pools in one process: the
same-host plane maps the peer pool through shared memory; a peer that offers no pool falls back to
zmq; a zmq peer still reaches an auto receiver). Transfers are checked bit for bit.
"""

from __future__ import annotations

import time

import pytest
import torch

from pdserve.kvtransfer import BACKENDS, KVPoll, make_kv_manager
from pdserve.kvtransfer.auto import AutoKVManager, worker_backend
from pdserve.kvtransfer.cuda_ipc import CudaIpcKVManager
from pdserve.kvtransfer.ipc_pool import Here, host_id, unreachable_reason
from pdserve.kvtransfer.zmq import ZmqKVManager
from pdserve.shared.engine.kv_pool import KVPoolShape, PagedKVPool
from pdserve.shared.launch.worker_cli import KV_TRANSFER_BACKENDS, build_parser
from pdserve.shared.launch.worker_lifecycle import kv_manager_options

SHAPE = KVPoolShape(num_layers=3, num_pages=40, page_size=4, num_kv_heads=2, head_dim=8)


def random_pool(seed: int) -> PagedKVPool:
    pool = PagedKVPool(SHAPE, torch.bfloat16, "cpu")
    gen = torch.Generator().manual_seed(seed)
    pool.kv.view(torch.int16).copy_(
        torch.randint(-(2**15), 2**15, pool.kv.shape, dtype=torch.int16, generator=gen)
    )
    return pool


def wait_until(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def transfer(sender_mgr, receiver_mgr, rid: str, src: list[int], dst: list[int]) -> tuple:
    receiver = receiver_mgr.make_receiver(rid, sender_mgr.endpoint)
    sender = sender_mgr.make_sender(rid, receiver_mgr.endpoint)
    receiver.init(dst)
    wait_until(lambda: sender.poll() != KVPoll.Bootstrapping)
    sender.send(src[:1], is_last=False)
    sender.send(src[1:], is_last=True, first_output={"rid": rid})
    wait_until(lambda: sender.poll() in (KVPoll.Success, KVPoll.Failed))
    wait_until(lambda: receiver.poll() in (KVPoll.Success, KVPoll.Failed))
    return sender, receiver


def same_pages(a: PagedKVPool, src: list[int], b: PagedKVPool, dst: list[int]) -> bool:
    return torch.equal(a.kv[:, :, src].view(torch.int16), b.kv[:, :, dst].view(torch.int16))


# ---------------------------------------------------------------------- the choice as data


def test_worker_level_choice():
    assert worker_backend("auto", "cuda") == "auto"
    assert worker_backend("auto", "cpu") == "zmq"  # CPU workers keep zmq
    assert [worker_backend(b, "cuda") for b in ("zmq", "nccl", "cuda_ipc")] == ["zmq", "nccl", "cuda_ipc"]
    assert {"cuda_ipc", "auto"} <= set(BACKENDS) and set(KV_TRANSFER_BACKENDS) <= set(BACKENDS)
    assert build_parser().parse_args(["--role", "decode"]).kv_transfer_backend == "auto"


def test_the_fallback_flag_reaches_auto_only():
    parse = build_parser().parse_args
    assert kv_manager_options(parse(["--role", "prefill"])) == {"fallback": "zmq"}
    assert kv_manager_options(parse(["--role", "prefill", "--kv-transfer-fallback", "nccl"])) == {
        "fallback": "nccl"
    }
    assert kv_manager_options(parse(["--role", "decode", "--kv-transfer-backend", "zmq"])) == {}
    manager = make_kv_manager("auto", random_pool(1), "w", fallback="nccl")  # a CPU pool: zmq whatever
    try:
        assert isinstance(manager, ZmqKVManager)
    finally:
        manager.close()


def test_cpu_auto_manager_is_zmq():
    manager = make_kv_manager("auto", random_pool(1), "w")
    try:
        assert isinstance(manager, ZmqKVManager)
    finally:
        manager.close()


def _gpu_here(**over) -> Here:
    base = {
        "host": "boot-1",
        "pid": 10,
        "kind": "cuda",
        "device_index": 0,
        "visible_uuids": ("GPU-a", "GPU-b", "GPU-c"),
        "peer_access": {"GPU-a": True, "GPU-b": True, "GPU-c": False},
    }
    return Here(**{**base, **over})


@pytest.mark.parametrize(
    ("shared", "reason"),
    [
        ({"host": "boot-1", "kind": "cuda", "pid": 11, "uuid": "GPU-a"}, None),  # same GPU
        ({"host": "boot-1", "kind": "cuda", "pid": 11, "uuid": "GPU-b"}, None),  # peer GPU
        ({"host": "boot-1", "kind": "cuda", "pid": 10, "uuid": "GPU-z"}, None),  # this very process
        ({"host": "boot-2", "kind": "cuda", "pid": 11, "uuid": "GPU-a"}, "another host"),
        ({"host": "boot-1", "kind": "host", "pid": 11}, "a host pool, this one a cuda pool"),
        ({"host": "boot-1", "kind": "cuda", "pid": 11, "uuid": "GPU-z"}, "not visible"),
        ({"host": "boot-1", "kind": "cuda", "pid": 11, "uuid": "GPU-c"}, "no peer access"),
    ],
)
def test_pair_judgement(shared, reason):
    got = unreachable_reason(shared, _gpu_here())
    assert got is None if reason is None else reason in got


def test_host_pools_need_only_the_same_host():
    me = Here(host_id(), 1, "host", None, (), {})
    assert unreachable_reason({"host": host_id(), "kind": "host", "pid": 2}, me) is None
    assert "another host" in unreachable_reason({"host": "elsewhere", "kind": "host", "pid": 2}, me)


# ---------------------------------------------------------------------- auto managers, for real


def test_auto_pair_takes_the_shared_pool():
    a, b = AutoKVManager(random_pool(1), "P"), AutoKVManager(random_pool(2), "D")
    try:
        sender, receiver = transfer(a, b, "r", [3, 9, 1, 30], [7, 2, 39, 11, 12])
        assert (sender.poll(), receiver.poll()) == (KVPoll.Success, KVPoll.Success)
        assert receiver.first_output == {"rid": "r"}
        assert same_pages(a.pool, [3, 9, 1, 30], b.pool, [7, 2, 39, 11])
        assert a.plane.choices() == {b.endpoint: "cuda_ipc"}
        assert a.stats()["mapped_pools"] == 1 and b.stats()["gate_slots"] == 0
    finally:
        a.close()
        b.close()


def test_auto_sender_falls_back_to_zmq_for_a_receiver_without_a_pool_offer():
    a, b = AutoKVManager(random_pool(1), "P"), ZmqKVManager(random_pool(2), "D")
    try:
        sender, receiver = transfer(a, b, "r", [5, 6, 7], [20, 21, 22])
        assert (sender.poll(), receiver.poll()) == (KVPoll.Success, KVPoll.Success)
        assert same_pages(a.pool, [5, 6, 7], b.pool, [20, 21, 22])
        assert a.plane.choices() == {b.endpoint: "zmq"} and a.stats()["mapped_pools"] == 0
    finally:
        a.close()
        b.close()


def test_zmq_sender_reaches_an_auto_receiver():
    a, b = ZmqKVManager(random_pool(1), "P"), AutoKVManager(random_pool(2), "D")
    try:
        sender, receiver = transfer(a, b, "r", [1, 2], [3, 4])
        assert (sender.poll(), receiver.poll()) == (KVPoll.Success, KVPoll.Success)
        assert same_pages(a.pool, [1, 2], b.pool, [3, 4]) and b.stats()["gate_slots"] == 0
    finally:
        a.close()
        b.close()


def test_cuda_ipc_refuses_a_receiver_without_a_pool_offer():
    a, b = CudaIpcKVManager(random_pool(1), "P"), ZmqKVManager(random_pool(2), "D")
    try:
        before = b.pool.kv.clone()
        sender, receiver = transfer(a, b, "r", [1, 2], [3, 4])
        assert sender.poll() == receiver.poll() == KVPoll.Failed
        assert "the receiver offers no shared pool" in sender.failure_reason
        assert torch.equal(before.view(torch.int16), b.pool.kv.view(torch.int16))
    finally:
        a.close()
        b.close()


def test_cuda_ipc_receiver_refuses_bytes_on_the_wire():
    a, b = ZmqKVManager(random_pool(1), "P"), CudaIpcKVManager(random_pool(2), "D")
    try:
        before = b.pool.kv.clone()
        sender, receiver = transfer(a, b, "r", [1, 2], [3, 4])
        assert sender.poll() == receiver.poll() == KVPoll.Failed
        assert "to a cuda_ipc receiver" in receiver.failure_reason
        assert torch.equal(before.view(torch.int16), b.pool.kv.view(torch.int16))
        wait_until(lambda: b.stats()["gate_slots"] == 0)
    finally:
        a.close()
        b.close()
