"""A worker's SGLang-named series: the engine's latency histograms (shared/engine/latency_stats.py)
and what WorkerMetrics renders from engine snapshots (shared/worker/sglang_metrics.py).

Snapshots are built from the engine's own types (LoadReport, EngineStats, RequestLatencies fed
real Req objects), the way the worker loop takes them with EngineSnapshot.of(engine).
"""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdserve.shared.engine.engine_stats import EngineStats
from pdserve.shared.engine.latency_stats import ITL_BUCKETS, TTFT_BUCKETS, LatencyHistogram, RequestLatencies
from pdserve.shared.engine.request import Req
from pdserve.shared.engine.sampling_params import SamplingParams
from pdserve.shared.protocol import LoadReport
from pdserve.shared.worker.metrics import EngineSnapshot, WorkerMetrics
from tests.helpers.sglang_dashboard import SGLANG_BUCKETS, SGLANG_EXPORTED


def test_histogram_buckets_are_upper_bounds_and_counts_can_repeat():
    hist = LatencyHistogram((0.1, 1.0))
    for value in (0.1, 0.05, 0.5, 3.0):  # a value on a bound belongs to that bound's bucket
        hist.observe(value)
    hist.observe(0.2, times=3)
    assert hist.counts == [2, 4, 1] and hist.count == 7
    assert hist.cumulative() == [2, 6, 7]
    assert hist.sum == pytest.approx(0.1 + 0.05 + 0.5 + 3.0 + 0.6)
    before = hist.copy()
    hist.observe(0.01)
    assert hist.minus(before).counts == [1, 0, 0] and before.counts == [2, 4, 1]


def test_buckets_are_sglangs():
    assert TTFT_BUCKETS == SGLANG_BUCKETS["sglang:time_to_first_token_seconds"]
    assert ITL_BUCKETS == SGLANG_BUCKETS["sglang:inter_token_latency_seconds"]


def make_req(arrival: float) -> Req:
    return Req(rid="r", input_ids=[1, 2, 3], params=SamplingParams(max_new_tokens=8), arrival_time=arrival)


def test_request_latencies_from_arrival_first_output_each_token_and_finish():
    lat = RequestLatencies()
    req = make_req(arrival=100.0)
    lat.on_output(req, 1, now=100.5)  # first token: time to first token
    lat.on_output(req, 1, now=100.52)
    lat.on_output(req, 4, now=100.60)  # 4 tokens after 80 ms: 4 gaps of 20 ms, as SGLang counts them
    req.finish({"type": "length", "length": 6})
    lat.on_finish(req, now=100.60)
    assert lat.ttft.count == 1 and lat.ttft.sum == pytest.approx(0.5)
    assert lat.itl.count == 5 and lat.itl.sum == pytest.approx(0.1)
    assert lat.itl.counts[ITL_BUCKETS.index(0.02)] == 5  # each gap of 20 ms (0.0800/4) in its bucket
    assert lat.e2e.count == 1 and lat.e2e.sum == pytest.approx(0.6)

    aborted = make_req(arrival=200.0)
    aborted.finish({"type": "abort", "message": "Aborted by the client."})
    lat.on_finish(aborted, now=201.0)
    assert lat.e2e.count == 1  # an aborted request has no end-to-end latency


def snapshot(
    stats: EngineStats, latency: RequestLatencies, running: int = 0, used: int = 0
) -> EngineSnapshot:
    load = LoadReport(num_running=running, num_waiting=2, num_used_tokens=used, max_total_num_tokens=1024)
    return EngineSnapshot(load=load, stats=stats, latency=latency)


def test_worker_renders_sglang_series_after_its_baseline():
    metrics = WorkerMetrics(role="decode", model="my-model", window_s=1.0)
    lat = RequestLatencies()
    warm_up = make_req(arrival=0.0)
    lat.on_output(warm_up, 1, now=0.3)  # before the baseline (the worker's warm-up): not shown
    metrics.publish(
        snapshot(EngineStats(num_requests=1, num_finished=1, prompt_tokens=1), lat.copy()), now=10.0
    )

    req = make_req(arrival=20.0)
    lat.on_output(req, 1, now=20.25)
    lat.on_output(req, 1, now=20.26)
    stats = EngineStats(
        num_requests=4,
        num_finished=3,
        num_aborted=1,
        prompt_tokens=301,
        cached_tokens=150,
        generated_tokens=40,
        decode_tokens_computed=500,
    )
    metrics.publish(snapshot(stats, lat.copy(), running=2, used=256), now=12.0)
    text = metrics.render()[0].decode()
    got = {f.name: f for f in text_string_to_metric_families(text)}

    for name, kind in SGLANG_EXPORTED.items():
        assert got[name].type == kind and got[name].samples, name
        assert all(s.labels["model_name"] == "my-model" for s in got[name].samples), name
    gauge_labels = got["sglang:num_running_reqs"].samples[0].labels
    assert gauge_labels == {"model_name": "my-model", "engine_type": "decode", "tp_rank": "0", "pp_rank": "0"}
    for name, bounds in SGLANG_BUCKETS.items():
        les = [s.labels["le"] for s in got[name].samples if s.name == name + "_bucket"]
        assert les == [str(float(b)) for b in bounds] + ["+Inf"], name

    values = {s.name: s.value for f in got.values() for s in f.samples if "le" not in s.labels}
    assert values["sglang:num_running_reqs"] == 2 and values["sglang:num_queue_reqs"] == 2
    assert values["sglang:num_used_tokens"] == 256 and values["sglang:token_usage"] == 0.25
    assert values["sglang:prompt_tokens_total"] == 300 and values["sglang:generation_tokens_total"] == 40
    assert values["sglang:cached_tokens_total"] == 150 and values["sglang:num_requests_total"] == 2
    assert values["sglang:num_aborted_requests_total"] == 1
    assert values["sglang:cache_hit_rate"] == pytest.approx(0.5)
    assert values["sglang:gen_throughput"] == pytest.approx(250.0)  # 500 decode tokens over 2 s
    assert values["sglang:time_to_first_token_seconds_count"] == 1  # the warm-up's is not counted
    assert values["sglang:time_to_first_token_seconds_sum"] == pytest.approx(0.25)
    assert values["sglang:inter_token_latency_seconds_count"] == 1
    # pdserve's own series are still there
    assert (
        values["pdserve_worker_num_running_reqs"] == 2 and values["pdserve_worker_prompt_tokens_total"] == 300
    )


def test_engine_types_follow_sglangs_names_for_each_role():
    for role, engine_type in (("mixed", "unified"), ("prefill", "prefill"), ("decode", "decode")):
        metrics = WorkerMetrics(role=role, model="m")
        labels = {"model_name": "m", "engine_type": engine_type, "tp_rank": "0", "pp_rank": "0"}
        metrics.publish(snapshot(EngineStats(), RequestLatencies(), running=3), now=0.0)
        assert metrics.registry.get_sample_value("sglang:num_running_reqs", labels) == 3
