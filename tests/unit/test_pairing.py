"""Pairing without processes: which route an attempt takes, the messages of a pair, serve's P/D plan.

The pool holds handles with a stand-in connection (connected, nothing sent); ServerInfo gives each
its role and KV endpoint as a static `--worker-addr` worker's would.
"""

from __future__ import annotations

import argparse

import pytest

from pdserve.router.cluster.circuit_breaker import CircuitBreaker
from pdserve.router.cluster.pairing import Pairing, Route, Tried
from pdserve.router.cluster.policies import make_decode_policy, make_policy
from pdserve.router.cluster.worker_pool import WorkerHandle, WorkerPool
from pdserve.shared.cluster.worker_info import WorkerInfo
from pdserve.shared.protocol import DecodeRequest, GenerateRequest, LoadReport, PrefillRequest, ServerInfo


class _Conn:
    connected = True


def _pool(*workers: tuple[str, str, int]) -> WorkerPool:
    """workers: (worker_id, role, free pages of 100)."""
    pool = WorkerPool(make_policy("round_robin"))
    for worker_id, role, free in workers:
        kv = f"tcp://127.0.0.1:{len(pool.workers) + 1}" if role != "mixed" else ""
        pool.workers[worker_id] = WorkerHandle(
            info=WorkerInfo(worker_id=worker_id, role="mixed", zmq_addr="tcp://x:1"),
            conn=_Conn(),  # type: ignore[arg-type]
            breaker=CircuitBreaker(3, 10.0),
            server_info=ServerInfo(worker_id=worker_id, role=role, args={"kv_addr": kv}),
            last_load=LoadReport(num_free_pages=free, num_total_pages=100),
        )
    return pool


def _pairing(pool: WorkerPool, threshold: int = 64) -> Pairing:
    return Pairing(pool, make_policy("least_load"), make_decode_policy("least_load"), threshold)


def _ids(route) -> tuple[str, str | None]:
    return route.worker.worker_id, route.prefill.worker_id if route.prefill else None


def test_routes_by_prompt_length_samples_and_what_was_tried():
    pairing = _pairing(_pool(("p", "prefill", 100), ("d", "decode", 100)))
    assert _ids(pairing.route(list(range(64)), 1, Tried())) == ("d", "p")
    assert _ids(pairing.route(list(range(63)), 1, Tried())) == ("d", None)  # below the threshold
    assert _ids(pairing.route(list(range(100)), 2, Tried())) == ("d", None)  # n > 1
    assert _ids(pairing.route(list(range(100)), 1, Tried(prefill={"p"}))) == ("d", None)  # P failed


def test_mixed_workers_serve_when_no_decode_worker_can():
    pool = _pool(("m", "mixed", 100), ("p", "prefill", 100), ("d", "decode", 100))
    pairing = _pairing(pool)
    assert _ids(pairing.route(list(range(100)), 1, Tried())) == ("d", "p")
    assert _ids(pairing.route(list(range(100)), 1, Tried(workers={"d"}))) == ("m", None)
    assert _ids(_pairing(_pool(("m", "mixed", 100))).route([1, 2], 1, Tried())) == ("m", None)


def test_decode_choice_is_memory_first_then_load():
    pool = _pool(("p", "prefill", 100), ("d1", "decode", 10), ("d2", "decode", 90))
    pool.workers["d2"].inflight = 5
    pairing = _pairing(pool)
    assert {pairing.route(list(range(100)), 1, Tried()).worker.worker_id for _ in range(4)} == {"d2"}
    pool.workers["d1"].last_load = LoadReport(num_free_pages=89, num_total_pages=100)  # same eighth
    assert {pairing.route(list(range(100)), 1, Tried()).worker.worker_id for _ in range(4)} == {"d1"}


def test_a_pair_gets_each_others_kv_endpoints_and_one_rid():
    pool = _pool(("p", "prefill", 100), ("d", "decode", 100))
    route = _pairing(pool).route(list(range(100)), 1, Tried())
    req = GenerateRequest(rid="r", input_ids=list(range(100)), sampling_params={"max_new_tokens": 3})
    to_d, to_p = route.messages(req, "r~retry1")
    assert isinstance(to_d, DecodeRequest) and isinstance(to_p, PrefillRequest)
    assert to_d.request is to_p.request  # one request, carried by both messages
    assert to_d.request.rid == "r~retry1" and req.rid == "r"
    assert to_d.prefill_kv_endpoint == pool.workers["p"].kv_addr and to_d.prefill_worker_id == "p"
    assert to_p.decode_kv_endpoint == pool.workers["d"].kv_addr and to_p.decode_worker_id == "d"
    assert to_d.request.sampling_params == {"max_new_tokens": 3}
    first, none = Route(pool.workers["d"]).messages(req, "r")
    assert first is req and none is None  # a first attempt on one worker: the request itself


def test_serve_plans_prefill_and_decode_workers():
    from pdserve.shared.launch.serve.cli import build_parser
    from pdserve.shared.launch.serve.plan import PlanError, plan_disaggregated, router_command, worker_command

    cpu = plan_disaggregated(["cpu"], 1, 2)
    assert [(s.name, s.device, s.mem_fraction_static, s.wait_for) for s in cpu] == [
        ("prefill-0", "cpu", None, None),
        ("decode-1", "cpu", None, None),
        ("decode-2", "cpu", None, None),
    ]
    shared = plan_disaggregated(["cuda:0"], 1, 1, 0.8)  # one GPU: split, the second waits for the first
    assert [(s.device, s.mem_fraction_static, s.wait_for) for s in shared] == [
        ("cuda:0", 0.4, None),
        ("cuda:0", 0.8, "prefill-0"),
    ]
    assert all(s.mem_fraction_static is None for s in plan_disaggregated(["cuda:0", "cuda:1"], 1, 1))
    with pytest.raises(PlanError, match="--decode must be >= 1"):
        plan_disaggregated(["cpu"], 1, 0)

    ns = build_parser().parse_args(
        ["--prefill", "1", "--decode", "1", "--kv-transfer-timeout", "5", "--local-prefill-threshold", "32"]
    )
    cmd = worker_command(shared[1], ns, "redis://h:1/0")
    assert cmd[cmd.index("--role") + 1] == "decode" and cmd[cmd.index("--kv-transfer-backend") + 1] == "auto"
    assert cmd[cmd.index("--kv-transfer-timeout") + 1] == "5.0"
    assert cmd[cmd.index("--mem-fraction-static") + 1] == "0.8" and cmd.count("--mem-fraction-static") == 1
    router = router_command(ns, "redis://h:1/0")
    assert router[router.index("--local-prefill-threshold") + 1] == "32"
    mixed = worker_command(plan_disaggregated(["cpu"], 0, 1)[0], argparse.Namespace(**vars(ns)), "r")
    assert "--mem-fraction-static" not in mixed


def test_a_prefill_worker_that_stores_kv_otherwise_is_no_partner():
    pool = _pool(("p8", "prefill", 100), ("p", "prefill", 100), ("d", "decode", 100))
    pool.workers["p8"].server_info.args["kv_cache_dtype"] = "fp8_e4m3"  # type: ignore[union-attr]
    pairing = _pairing(pool)
    assert {_ids(pairing.route(list(range(100)), 1, Tried()))[1] for _ in range(4)} == {"p"}
    assert _ids(pairing.route(list(range(100)), 1, Tried(prefill={"p"}))) == ("d", None)  # local prefill
