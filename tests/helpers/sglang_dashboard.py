"""What SGLang's own Grafana dashboard reads, recorded as facts (names only, no dashboard JSON).

Source: github.com/sgl-project/sglang, examples/monitoring/grafana/dashboards/json/sglang-dashboard.json
(and its predecessor examples/monitoring/grafana.json), the versions around SGLang 0.5.3. Its panels
query these sample names; its `model_name` template variable is `label_values(model_name)` and
the heatmaps filter `{model_name=~"$model_name"}`, so every one must carry a `model_name` label.

`SGLANG_EXPORTED` lists the series of sglang/srt/metrics/collector.py (SGLang 0.5.3) that pdserve
serves too, by the family name (a counter's family without `_total`).
"""

from __future__ import annotations

DASHBOARD_SAMPLES = (
    "sglang:e2e_request_latency_seconds_bucket",
    "sglang:e2e_request_latency_seconds_sum",
    "sglang:e2e_request_latency_seconds_count",
    "sglang:time_to_first_token_seconds_bucket",
    "sglang:time_to_first_token_seconds_sum",
    "sglang:time_to_first_token_seconds_count",
    "sglang:num_running_reqs",
    "sglang:gen_throughput",
    "sglang:cache_hit_rate",
    "sglang:num_queue_reqs",
)
DASHBOARD_LABEL = "model_name"

# sglang/srt/metrics/collector.py (0.5.3): family name -> type
SGLANG_EXPORTED = {
    "sglang:num_running_reqs": "gauge",
    "sglang:num_queue_reqs": "gauge",
    "sglang:num_used_tokens": "gauge",
    "sglang:token_usage": "gauge",
    "sglang:gen_throughput": "gauge",
    "sglang:cache_hit_rate": "gauge",
    "sglang:prompt_tokens": "counter",
    "sglang:generation_tokens": "counter",
    "sglang:cached_tokens": "counter",
    "sglang:num_requests": "counter",
    "sglang:time_to_first_token_seconds": "histogram",
    "sglang:inter_token_latency_seconds": "histogram",
    "sglang:e2e_request_latency_seconds": "histogram",
}

# SGLang 0.5.3's default upper bounds of its three latency histograms (collector.py), for checking
# the `le` labels independently of pdserve's own copy
SGLANG_BUCKETS = {
    "sglang:time_to_first_token_seconds": (
        0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400,
    ),
    "sglang:inter_token_latency_seconds": (
        0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.025, 0.03, 0.035, 0.04, 0.06, 0.08, 0.1,
        0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8,
    ),
    "sglang:e2e_request_latency_seconds": (
        0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400, 600, 1200, 1800, 2400,
    ),
}  # fmt: skip
