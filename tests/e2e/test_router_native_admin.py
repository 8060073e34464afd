"""SGLang's native admin, observability and route checks through the router on a tiny random Llama:
real `worker` and `router` processes on loopback (tests/helpers/router_native_stack.py).

flush_cache while busy, abort_request (its finish_reason message, the per-worker gauges while it
runs), /metrics deltas, /get_load, PUT /generate, get_model_info's preferred_sampling_params, the API
key on /metrics and before the body-size check, the `/update_weights` alias's admin key.
"""

from __future__ import annotations

import pytest
import requests

from tests.helpers.router_http import (
    ADMIN,
    AUTH,
    assert_error,
    assert_native_stream_grows,
    post,
    sse_chunks,
)

# the fixtures come from the helper module: test arguments that name them are not redefinitions
# ruff: noqa: F811
from tests.helpers.router_native_stack import (  # noqa: F401 (fixtures)
    GREEDY,
    PREFERRED,
    stream_in_background,
    tiny,
    tiny_model,
    tiny_worker,
)

pytestmark = [pytest.mark.slow, pytest.mark.untimed]


# ---------------------------------------------------------------------- admin and observability


def test_flush_cache_waits_for_running_requests_with_timeout(tiny):
    result: dict = {}
    params = {"temperature": 0.0, "max_new_tokens": 500, "ignore_eos": True}
    thread = stream_in_background(tiny, {"input_ids": [1, 2, 3], "sampling_params": params}, result)
    for _ in range(200):  # until the worker runs it
        if requests.get(tiny + "/get_load", headers=AUTH).json()[0]["num_reqs"]:
            break
    refused = requests.post(tiny + "/flush_cache", headers=ADMIN)
    assert_error(refused, 400, "Cache not flushed", "running", "?timeout=")
    waited = requests.post(tiny + "/flush_cache?timeout=60", headers=ADMIN)
    assert waited.status_code == 200, waited.text
    thread.join(60)
    assert result["status"] == 200 and result["chunks"][-2]["meta_info"]["completion_tokens"] == 500
    assert_error(requests.post(tiny + "/flush_cache?timeout=-1", headers=ADMIN), 400, "timeout")


def scrape(url: str, headers=AUTH) -> dict[str, float]:
    """The router's /metrics as {sample name with labels: value}."""
    resp = requests.get(url + "/metrics", headers=headers, timeout=10)
    assert resp.status_code == 200, resp.text
    samples = {}
    for line in resp.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_abort_request_ends_the_stream_and_frees_the_worker(tiny, tiny_worker):
    load_gauge = f'pdserve_router_worker_load{{worker="{tiny_worker}"}}'
    inflight_gauge = f'pdserve_router_worker_inflight{{worker="{tiny_worker}"}}'
    requests.get(tiny + "/get_load", headers=AUTH)  # a fresh load report: the last test's request ended
    idle = scrape(tiny)
    assert (idle[load_gauge], idle[inflight_gauge]) == (0, 0)
    result: dict = {}
    params = {"temperature": 0.0, "max_new_tokens": 900, "ignore_eos": True}
    thread = stream_in_background(
        tiny, {"input_ids": [4, 5], "sampling_params": params, "rid": "stop-me"}, result
    )
    for _ in range(200):
        if requests.get(tiny + "/get_load", headers=AUTH).json()[0]["num_running_reqs"]:
            break
    running = scrape(tiny)  # the per-worker gauges see the request while it runs
    assert (running[load_gauge], running[inflight_gauge]) == (1, 1)
    assert running["pdserve_router_generation_requests_running"] == 1
    assert requests.post(tiny + "/abort_request", json={"rid": "stop-me"}, headers=ADMIN).status_code == 200
    thread.join(60)
    final = result["chunks"][-2]
    assert final["meta_info"]["finish_reason"] == {"type": "abort", "message": "Aborted by the client."}
    assert final["meta_info"]["completion_tokens"] < 900
    (load,) = requests.get(tiny + "/get_load", headers=AUTH).json()
    assert (load["num_running_reqs"], load["num_waiting_reqs"], load["router_inflight"]) == (0, 0, 0)
    assert load["num_free_pages"] + load["num_evictable_pages"] == load["num_total_pages"]
    after = scrape(tiny)  # /get_load just refreshed the worker's load: the gauges are back to 0
    assert (after[load_gauge], after[inflight_gauge]) == (0, 0)
    assert_error(post(tiny, "/abort_request", {}, headers=ADMIN), 400, "rid")
    assert requests.post(tiny + "/abort_request", json={"abort_all": True}, headers=ADMIN).status_code == 200


def test_metrics_count_requests_tokens_and_workers(tiny):
    before = scrape(tiny)
    post(tiny, "/generate", {"input_ids": [1, 2, 3], "sampling_params": GREEDY})
    post(tiny, "/generate", {"input_ids": []})
    samples = scrape(tiny)
    assert samples['pdserve_router_requests_total{code="200",route="/generate"}'] >= 1
    assert samples['pdserve_router_request_errors_total{code="400",route="/generate"}'] >= 1
    assert samples["pdserve_router_time_to_first_token_seconds_count"] >= 1
    assert samples["pdserve_router_generation_tokens_total"] >= 12
    assert samples["pdserve_router_prompt_tokens_total"] >= 3
    assert 0.0 <= samples["pdserve_router_cache_hit_rate"] <= 1.0
    assert samples["pdserve_router_generation_requests_running"] == 0
    assert any(k.startswith("pdserve_router_worker_up{") and v == 1 for k, v in samples.items())

    def moved(name: str) -> float:
        return samples[name] - before.get(name, 0.0)

    # exactly the one request that generated moved the histograms and counters (the refused one did not)
    e2e = "pdserve_router_e2e_request_latency_seconds"
    assert moved(e2e + "_count") == 1 and moved(e2e + '_bucket{le="+Inf"}') == 1
    assert 0 < moved(e2e + "_sum") < 60
    assert moved("pdserve_router_time_to_first_token_seconds_count") == 1
    # one inter-token latency per gap between output events: 11 for 12 tokens, fewer where the
    # router folded a backlog into one event (router/cluster/output_merge.py)
    assert 1 <= moved("pdserve_router_inter_token_latency_seconds_count") <= 11
    assert moved("pdserve_router_generation_tokens_total") == 12
    assert moved("pdserve_router_prompt_tokens_total") == 3
    assert moved('pdserve_router_requests_total{code="200",route="/generate"}') == 1
    assert moved('pdserve_router_request_errors_total{code="400",route="/generate"}') == 1
    # one scrape was counted between the two
    assert moved('pdserve_router_requests_total{code="200",route="/metrics"}') == 1


# ---------------------------------------------------------------------- routes and keys


def test_put_generate_works_like_post(tiny):
    body = {"input_ids": [5, 6, 7], "sampling_params": GREEDY}
    posted = post(tiny, "/generate", body).json()
    put = requests.put(tiny + "/generate", json=body, headers=AUTH, timeout=60)
    assert put.status_code == 200, put.text
    got = put.json()
    assert (got["output_ids"], got["text"]) == (posted["output_ids"], posted["text"])
    assert got["meta_info"]["finish_reason"] == {"type": "length", "length": 12}
    assert got["meta_info"]["prompt_tokens"] == 3
    streamed = sse_chunks(requests.put(tiny + "/generate", json={**body, "stream": True}, headers=AUTH))
    assert_native_stream_grows(streamed[:-1], 12)
    assert streamed[-2]["output_ids"] == posted["output_ids"]
    assert_error(requests.put(tiny + "/generate", json=body), 401, "no API key")


def test_model_info_echoes_preferred_sampling_params(tiny, tiny_model):
    info = requests.get(tiny + "/get_model_info", headers=AUTH).json()
    assert info["preferred_sampling_params"] == PREFERRED == {"max_new_tokens": 5}
    assert info["model_path"] == tiny_model


def test_api_key_guards_metrics_and_comes_before_the_body_size(tiny):
    assert_error(requests.get(tiny + "/metrics"), 401, "/metrics", "no API key")
    assert_error(requests.get(tiny + "/metrics", headers={"Authorization": "Bearer nope"}), 401, "wrong")
    assert "pdserve_router_requests_total" in requests.get(tiny + "/metrics", headers=AUTH).text
    assert requests.get(tiny + "/metrics", headers=ADMIN).status_code == 200  # the admin key works too
    assert requests.get(tiny + "/health").status_code == 200  # the one open route

    big = {"text": "x" * 300_000}  # over --max-body-bytes 200000
    assert_error(requests.post(tiny + "/generate", json=big), 401, "no API key")
    assert_error(post(tiny, "/generate", big, headers={"Authorization": "Bearer nope"}), 401, "wrong")
    assert_error(post(tiny, "/generate", big), 413, "--max-body-bytes")  # with the key: the size check

    def chunked():  # no Content-Length: the size is only known while reading
        yield b'{"text": "'
        yield b"x" * 300_000
        yield b'"}'

    json_type = {"Content-Type": "application/json"}
    assert_error(requests.post(tiny + "/generate", data=chunked(), headers=json_type), 401, "no API key")
    assert_error(
        requests.post(tiny + "/generate", data=chunked(), headers={**json_type, **AUTH}),
        413,
        "--max-body-bytes",
    )


def test_update_weights_alias_takes_the_admin_key(tiny, tiny_model):
    body = {"model_path": tiny_model + "-wrong"}
    assert_error(requests.post(tiny + "/update_weights", json=body), 401, "admin API key", "no API key")
    assert_error(post(tiny, "/update_weights", body, headers=AUTH), 401, "admin API key", "wrong")
    resp = post(tiny, "/update_weights", body, headers=ADMIN)
    assert resp.status_code == 400
    assert resp.json() == {
        "success": False,
        "message": f"Failed to get weights iterator: {tiny_model}-wrong (repository not found).",
        "num_paused_requests": 0,
    }
    assert_error(requests.get(tiny + "/update_weights", headers=ADMIN), 405, "GET")
