"""SGLang's metric names on real processes: after some traffic, every sample SGLang's Grafana
dashboard queries (tests/helpers/sglang_dashboard.py) is on the router's /metrics with the served
model as `model_name`, in mixed mode, in P/D mode and with `router --processes 2`; each worker
serves its own `sglang:*` series; `pdserve_router_worker_up` is 1 for a healthy prefill worker;
`/get_server_info` has the shape SGLang's tools read.

Workers: tiny random Llama on the CPU (float32), one mixed, one prefill + one decode (zmq KV).
"""

from __future__ import annotations

import random
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.sglang_dashboard import (
    DASHBOARD_LABEL,
    DASHBOARD_SAMPLES,
    SGLANG_BUCKETS,
    SGLANG_EXPORTED,
)

pytestmark = [pytest.mark.slow, pytest.mark.untimed]

COMMON = ["--dtype", "float32", "--device", "cpu", "--max-total-tokens", "4096", "--log-level", "warning"]
PD = ["--kv-transfer-backend", "zmq"]
PARAMS = {"temperature": 0.0, "max_new_tokens": 6, "ignore_eos": True}
LONG = 100  # tokens: over the router's --local-prefill-threshold (64), so P/D prompts go to P


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 256) for _ in range(n)]


def scrape(url: str) -> dict[str, object]:
    text = requests.get(url + "/metrics", timeout=10).text
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample_values(families: dict[str, object], name: str) -> list[tuple[dict, float]]:
    return [(s.labels, s.value) for f in families.values() for s in f.samples if s.name == name]


def traffic(url: str, prompts: list[list[int]]) -> None:
    """Each prompt once as a whole answer and once streamed."""
    for ids in prompts:
        for stream in (False, True):
            body = {"input_ids": ids, "sampling_params": PARAMS, "stream": stream}
            resp = requests.post(url + "/generate", json=body, timeout=120)
            assert resp.status_code == 200, resp.text


def assert_dashboard_series(url: str, model: str, requests_sent: int) -> dict[str, object]:
    got = scrape(url)
    for name in DASHBOARD_SAMPLES:
        found = sample_values(got, name)
        assert found, f"{name} missing from the router's /metrics"
        assert all(labels.get(DASHBOARD_LABEL) == model for labels, _ in found), (name, found)
    for name, kind in SGLANG_EXPORTED.items():
        assert got[name].type == kind, name
    for name, bounds in SGLANG_BUCKETS.items():
        les = [labels["le"] for labels, _ in sample_values(got, name + "_bucket")]
        assert les == [str(float(b)) for b in bounds] + ["+Inf"], name

    def one(name: str) -> float:
        ((_, value),) = sample_values(got, name)
        return value

    assert one("sglang:num_requests_total") == requests_sent
    assert one("sglang:e2e_request_latency_seconds_count") == requests_sent
    assert one("sglang:time_to_first_token_seconds_count") == requests_sent
    assert one("sglang:generation_tokens_total") == requests_sent * PARAMS["max_new_tokens"]
    assert 0.0 <= one("sglang:cache_hit_rate") <= 1.0
    return got


def assert_sglang_server_info(url: str, roles: dict[str, int]) -> dict:
    """/get_server_info (and /server_info) as SGLang's tools read it: `version`, one
    `internal_states` entry per serving worker with the scheduler state SGLang reports, and, in P/D
    mode, top-level `prefill` and `decode` lists (`roles`: how many of each there should be)."""
    info = requests.get(url + "/get_server_info", timeout=10).json()
    assert requests.get(url + "/server_info", timeout=10).json().keys() == info.keys()
    assert isinstance(info["version"], str) and info["version"]
    states = info["internal_states"]
    assert len(states) == roles.get("decode", roles.get("mixed", 0))
    for state in states:
        assert "avg_spec_accept_length" in state  # None: no speculative decoding
        assert state["last_gen_throughput"] >= 0.0
        memory = state["memory_usage"]
        # GB with two decimals, as SGLang rounds them: a tiny model's weights and pool show as 0.0
        assert all(isinstance(memory[k], float) for k in ("weight", "kvcache", "graph"))
        assert memory["token_capacity"] == 4096
    for role in ("prefill", "decode"):
        if role in roles:
            assert len(info[role]) == roles[role], info.get(role)
            assert all("worker_id" in w for w in info[role])
        else:
            assert role not in info
    return info


def counter_reaches(url: str, name: str, want: float, timeout_s: float = 20.0) -> dict[str, object]:
    """A worker's /metrics once its `name` sample reached `want` (or the time is up): a worker
    serves its engine loop's last snapshot, which under load trails the answers clients got."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = scrape(url)
        values = [v for _, v in sample_values(got, name)]
        if (values and values[0] >= want) or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def wait_idle(url: str, timeout_s: float = 20.0) -> None:
    """Until the workers' load reports (polled by the router) show nothing running."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = scrape(url)
        if [v for _, v in sample_values(got, "sglang:num_running_reqs")] == [0.0]:
            return
        assert time.monotonic() < deadline, sample_values(got, "sglang:num_running_reqs")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def mixed(worker_launcher, tiny_llama_dir):
    return worker_launcher("--model-path", tiny_llama_dir, *COMMON)


@pytest.fixture(scope="module")
def pd_pair(worker_launcher, tiny_llama_dir):
    flags = ["--model-path", tiny_llama_dir, *COMMON, *PD]
    return worker_launcher(*flags, "--role", "prefill"), worker_launcher(*flags, "--role", "decode")


def test_mixed_router_serves_the_dashboard_series(router_launcher, mixed, tiny_llama_dir):
    url = router_launcher("--worker-addr", mixed.zmq_address).url
    prompts = [prompt(12, seed=1), prompt(40, seed=2)]
    traffic(url, prompts)
    got = assert_dashboard_series(url, tiny_llama_dir, requests_sent=4)
    assert_sglang_server_info(url, {"mixed": 1})
    ((_, prompt_total),) = sample_values(got, "sglang:prompt_tokens_total")
    assert prompt_total == 2 * (12 + 40)
    wait_idle(url)
    ((_, usage),) = sample_values(scrape(url), "sglang:token_usage")
    assert 0.0 <= usage < 1.0


def test_a_worker_serves_its_own_sglang_series(router_launcher, mixed, tiny_llama_dir):
    # its own traffic: the module is untimed, so xdist may run this test without the one before
    traffic(router_launcher("--worker-addr", mixed.zmq_address).url, [prompt(12, seed=3), prompt(40, seed=4)])
    got = counter_reaches(mixed.http_url, "sglang:time_to_first_token_seconds_count", 4)
    for name in SGLANG_EXPORTED:
        assert got[name].samples, name
        assert all(s.labels["model_name"] == tiny_llama_dir for s in got[name].samples), name
    ((labels, _),) = sample_values(got, "sglang:num_running_reqs")
    assert labels["engine_type"] == "unified"
    ((_, generated),) = sample_values(got, "sglang:generation_tokens_total")
    ((_, ttft_count),) = sample_values(got, "sglang:time_to_first_token_seconds_count")
    assert generated >= 4 * PARAMS["max_new_tokens"] and ttft_count >= 4  # the warm-up is not counted


def test_pd_router_serves_the_dashboard_series_and_prefill_worker_is_up(
    router_launcher, pd_pair, tiny_llama_dir
):
    p, d = pd_pair
    url = router_launcher("--worker-addr", p.zmq_address, "--worker-addr", d.zmq_address).url
    deadline = time.monotonic() + 30
    while True:  # /health needs only the decode worker: wait until the router lists both
        live = requests.get(url + "/get_server_info", timeout=10).json()["live_workers"]
        if live.get("prefill") and live.get("decode"):
            break
        assert time.monotonic() < deadline, live
        time.sleep(0.1)
    traffic(url, [prompt(LONG, seed=3), prompt(LONG, seed=4)])
    got = assert_dashboard_series(url, tiny_llama_dir, requests_sent=4)
    assert_sglang_server_info(url, {"prefill": 1, "decode": 1})
    up = sample_values(got, "pdserve_router_worker_up")
    assert len(up) == 2 and all(value == 1 for _, value in up), up

    prefill = counter_reaches(p.http_url, "sglang:prompt_tokens_total", 4 * LONG)
    ((labels, prompt_tokens),) = sample_values(prefill, "sglang:prompt_tokens_total")
    assert labels["model_name"] == tiny_llama_dir and prompt_tokens == 4 * LONG  # P prefilled them all
    ((labels, _),) = sample_values(prefill, "sglang:num_running_reqs")
    assert labels["engine_type"] == "prefill"
    decode = counter_reaches(d.http_url, "sglang:generation_tokens_total", 4 * PARAMS["max_new_tokens"])
    ((_, generated),) = sample_values(decode, "sglang:generation_tokens_total")
    assert generated == 4 * PARAMS["max_new_tokens"]
    ((labels, _),) = sample_values(decode, "sglang:num_running_reqs")
    assert labels["engine_type"] == "decode"


def test_router_processes_sum_the_sglang_series(router_launcher, mixed, tiny_llama_dir):
    # --ready-when-serving: the parent's ready line waits for both processes to serve (/health 200
    # from one of them says nothing of the other)
    url = router_launcher("--worker-addr", mixed.zmq_address, "--processes", "2", "--ready-when-serving").url
    # new connections, so the kernel spreads them over both processes; the scrape sums them
    traffic(url, [prompt(10, seed=s) for s in range(5, 9)])
    assert_dashboard_series(url, tiny_llama_dir, requests_sent=8)
