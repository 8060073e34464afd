"""The router's SGLang-named series (router/serving/sglang_metrics.py, fed by
router/serving/metrics.py): names, types, SGLang's buckets, the `model_name` label, the cluster
sums, `worker_up` for every live role, and the sums over `router --processes N` (real child processes writing prometheus_client's files).

The cluster is given as data (`Cluster`: the served model and what each worker last reported),
which is what RouterMetrics reads of a running router's state through `ClusterOfState`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pdserve.router.processes import METRICS_DIR_ENV
from pdserve.router.serving.metrics import RouterMetrics, _SummedOverProcesses
from pdserve.router.serving.sglang_metrics import ClusterLoad, WorkerLoad
from pdserve.shared.protocol import LoadReport
from tests.helpers.sglang_dashboard import DASHBOARD_SAMPLES, SGLANG_BUCKETS, SGLANG_EXPORTED

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass
class Cluster:
    model_name: str
    loads: list[WorkerLoad] = field(default_factory=list)

    def worker_loads(self) -> list[WorkerLoad]:
        return list(self.loads)


def report(running: int = 0, waiting: int = 0, used: int = 0, total: int = 1000) -> LoadReport:
    return LoadReport(
        num_running=running, num_waiting=waiting, num_used_tokens=used, max_total_num_tokens=total
    )


PD_LOADS = [
    WorkerLoad("p", "prefill", True, report(running=2, waiting=3, used=100), gen_throughput=4.0),
    WorkerLoad("d", "decode", True, report(running=5, waiting=1, used=300), gen_throughput=250.0),
    WorkerLoad("m", "mixed", True, report(running=1, used=100), gen_throughput=50.0),
    WorkerLoad("gone", "decode", False, report(running=9, waiting=9, used=900), gen_throughput=999.0),
    WorkerLoad("new", "decode", True, None),  # no load report yet
]


def families(text: bytes | str) -> dict[str, object]:
    return {
        f.name: f for f in text_string_to_metric_families(text if isinstance(text, str) else text.decode())
    }


def test_cluster_load_sums_what_live_workers_reported():
    load = ClusterLoad.of(PD_LOADS)
    assert (load.num_running_reqs, load.num_queue_reqs, load.num_used_tokens) == (8, 4, 500)
    assert load.max_total_num_tokens == 3000 and load.token_usage == pytest.approx(500 / 3000)
    # a prefill worker's first tokens are streamed again by its decode worker: not counted twice
    assert load.gen_throughput == pytest.approx(300.0)
    assert ClusterLoad.of([]).token_usage == 0.0


def test_router_serves_sglang_series_with_sglang_names_types_buckets_and_model_label():
    metrics = RouterMetrics()
    metrics.attach(Cluster(MODEL, PD_LOADS))
    metrics.ttft.observe(0.15)
    for gap in (0.003, 0.03, 5.0):
        metrics.itl.observe(gap)
    metrics.observe_request_done(1.5, prompt_tokens=100, completion_tokens=4, cached_tokens=64)
    metrics.observe_request_done(0.5, prompt_tokens=60, completion_tokens=2, cached_tokens=0)
    got = families(metrics.render(lambda m: m.set_workers([])))

    for name, kind in SGLANG_EXPORTED.items():
        assert got[name].type == kind, name
        assert got[name].samples, name
        assert all(s.labels.get("model_name") == MODEL for s in got[name].samples), name
    samples = {s.name: s for f in got.values() for s in f.samples if "le" not in s.labels}
    for name in DASHBOARD_SAMPLES:
        assert any(s.name == name for f in got.values() for s in f.samples), name
    for name, bounds in SGLANG_BUCKETS.items():
        les = [s.labels["le"] for s in got[name].samples if s.name == name + "_bucket"]
        assert les == [str(float(b)) for b in bounds] + ["+Inf"], name

    def value(name: str) -> float:
        return samples[name].value

    assert value("sglang:time_to_first_token_seconds_count") == 1
    assert value("sglang:inter_token_latency_seconds_count") == 3
    assert value("sglang:inter_token_latency_seconds_sum") == pytest.approx(5.033)
    assert value("sglang:e2e_request_latency_seconds_count") == 2
    assert (value("sglang:prompt_tokens_total"), value("sglang:generation_tokens_total")) == (160, 6)
    assert (value("sglang:cached_tokens_total"), value("sglang:num_requests_total")) == (64, 2)
    assert value("sglang:cache_hit_rate") == pytest.approx(64 / 160)
    assert (value("sglang:num_running_reqs"), value("sglang:num_queue_reqs")) == (8, 4)
    assert value("sglang:num_used_tokens") == 500 and value("sglang:token_usage") == pytest.approx(500 / 3000)
    assert value("sglang:gen_throughput") == pytest.approx(300.0)
    # one observation feeds both namings
    assert value("pdserve_router_time_to_first_token_seconds_count") == 1
    assert value("pdserve_router_inter_token_latency_seconds_count") == 3


def test_itl_buckets_count_each_gap_where_sglang_would():
    metrics = RouterMetrics()
    metrics.attach(Cluster(MODEL))
    for gap in (0.002, 0.0021, 0.05, 9.0):  # 0.002 is <= its own bound
        metrics.itl.observe(gap)
    reg = metrics.registry

    def le(bound: str) -> float:
        return reg.get_sample_value(
            "sglang:inter_token_latency_seconds_bucket", {"model_name": MODEL, "le": bound}
        )

    assert (le("0.002"), le("0.004"), le("0.06"), le("8.0"), le("+Inf")) == (1, 2, 3, 3, 4)


def test_worker_up_is_one_for_every_live_worker_whatever_its_role():
    metrics = RouterMetrics()
    cluster = Cluster(
        MODEL, [WorkerLoad("p", "prefill", True, report()), WorkerLoad("d", "decode", False, None)]
    )
    metrics.attach(cluster)
    # the rows' own flag says "can stream a request": False for a prefill worker, by its role
    metrics.set_workers([("p", 0, 0, False, 2), ("d", 0, 0, False, 2)])
    up = metrics.registry.get_sample_value
    assert up("pdserve_router_worker_up", {"worker": "p"}) == 1
    assert up("pdserve_router_worker_up", {"worker": "d"}) == 0
    cluster.loads = [WorkerLoad("p", "prefill", False, report())]
    metrics.set_workers([("p", 0, 0, False, 2)])
    assert up("pdserve_router_worker_up", {"worker": "p"}) == 0
    assert up("pdserve_router_worker_up", {"worker": "d"}) is None  # gone: its series dropped


def test_without_a_known_model_only_pdserve_series_move():
    unattached = RouterMetrics()
    unattached.ttft.observe(0.2)
    unattached.observe_request_done(0.3, 5, 1, 0)
    unattached.set_workers([("w", 1, 0, True, 2)])
    text = unattached.render().decode()
    assert "pdserve_router_time_to_first_token_seconds_count 1.0" in text
    assert "sglang:time_to_first_token_seconds_count{" not in text
    assert unattached.registry.get_sample_value("pdserve_router_worker_up", {"worker": "w"}) == 1

    waiting = RouterMetrics()
    waiting.attach(Cluster("", [WorkerLoad("w", "mixed", True, report(running=1))]))  # no worker answered yet
    waiting.ttft.observe(0.2)
    waiting.set_workers([("w", 1, 0, True, 2)])
    assert "{model_name=" not in waiting.render().decode()


_CHILD = textwrap.dedent(
    """
    import sys
    from pdserve.router.serving.metrics import RouterMetrics
    from pdserve.router.serving.sglang_metrics import WorkerLoad
    from pdserve.shared.protocol import LoadReport

    class Cluster:
        model_name = sys.argv[1]
        def worker_loads(self):
            return [WorkerLoad("d", "decode", True, LoadReport(num_running=int(sys.argv[4]),
                                                               max_total_num_tokens=100), 10.0)]

    m = RouterMetrics()
    assert m.multiprocess_dir is not None
    m.attach(Cluster())
    prompt, cached = int(sys.argv[2]), int(sys.argv[3])
    for _ in range(2):
        m.ttft.observe(0.3)
        m.observe_request_done(0.5, prompt, 5, cached)
    m.set_workers([("d", 1, 0, True, 2)])
    """
)


def test_sglang_series_of_separate_router_processes_are_summed(tmp_path):
    env = {**os.environ, METRICS_DIR_ENV: str(tmp_path)}
    # two processes of one router, each saw 2 requests; they read the same worker at different times
    for args in (("100", "50", "3"), ("100", "0", "4")):
        subprocess.run([sys.executable, "-c", _CHILD, MODEL, *args], env=env, check=True, timeout=60)
    registry = CollectorRegistry()
    registry.register(_SummedOverProcesses(str(tmp_path)))
    got = families(generate_latest(registry))
    label = {"model_name": MODEL}

    def value(family: str, sample: str | None = None) -> float:
        (s,) = [s for s in got[family].samples if s.name == (sample or family) and s.labels == label]
        return s.value

    assert value("sglang:num_requests", "sglang:num_requests_total") == 4
    assert value("sglang:prompt_tokens", "sglang:prompt_tokens_total") == 400
    assert value("sglang:time_to_first_token_seconds", "sglang:time_to_first_token_seconds_count") == 4
    assert value("sglang:cache_hit_rate") == pytest.approx(100 / 400)  # from the sums
    assert value("sglang:num_running_reqs") == 4  # the latest view of the cluster, not a sum (7)
    assert value("sglang:gen_throughput") == 10.0
