"""SGLang's control routes on a disaggregated pair: a real prefill worker P and decode worker D.

Router R pairs them (prompts of 64+ tokens are prefilled at P); router L on the same workers
prefills everything at D (`--local-prefill-threshold` above any prompt). In order:
1. `/update_weights_from_tensor` reaches both roles: a long prompt prefilled at P (through R) and
   at D (through L) give the same new greedy output, unlike before the update;
2. pause in place holds a P/D stream (no token while paused) and continue finishes it with an
   undisturbed run's tokens; a pause (abort) holds new requests on both roles until continue;
3. `stream_interval` holds on the decode worker (the first token comes from P, then every N);
4. `/start_profile` / `/stop_profile` write one trace per role.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests
import torch
import torch.multiprocessing

from tests.helpers.cluster_waits import run_in_thread, wait_until
from tests.helpers.router_http import sse_chunks
from tests.helpers.sglang_control import serialize_named_tensors as serialize
from tests.helpers.sglang_control import stream_with_arrivals
from tests.helpers.tiny_models import make_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.untimed]

COMMON = ["--dtype", "float32", "--device", "cpu", "--max-total-tokens", "4096", "--log-level", "warning"]
PREFILL = ["--role", "prefill", "--kv-transfer-backend", "zmq"]
DECODE = ["--role", "decode", "--kv-transfer-backend", "zmq", "--kv-transfer-timeout", "30"]
LONG_PROMPT = [(7 * i + 5) % 250 + 3 for i in range(80)]  # over the 64-token local-prefill threshold
GREEDY = {"temperature": 0.0, "max_new_tokens": 8, "ignore_eos": True}


@pytest.fixture(scope="module")
def cluster(worker_launcher, router_launcher, tmp_path_factory) -> dict[str, str]:
    model = str(make_tiny_model("llama", Path(tmp_path_factory.mktemp("pd-routes"))))
    p = worker_launcher("--model-path", model, *PREFILL, *COMMON).zmq_address
    d = worker_launcher("--model-path", model, *DECODE, *COMMON).zmq_address
    addrs = ["--worker-addr", p, "--worker-addr", d]
    return {
        "r": router_launcher(*addrs).url,
        "local": router_launcher(*addrs, "--local-prefill-threshold", "100000").url,
    }


def generate(url: str, params: dict = GREEDY, prompt: list[int] = LONG_PROMPT, **kw) -> dict:
    resp = requests.post(
        url + "/generate", json={"input_ids": prompt, "sampling_params": params, **kw}, timeout=300
    )
    assert resp.status_code == 200, resp.text
    return resp.json()


def post(url: str, path: str, body=None) -> requests.Response:
    return requests.post(url + path, json=body, timeout=120)


def test_tensor_update_reaches_the_prefill_and_the_decode_worker(cluster):
    via_p, at_d = generate(cluster["r"])["output_ids"], generate(cluster["local"])["output_ids"]
    assert via_p == at_d
    named = [("model.layers.1.mlp.down_proj.weight", torch.full((64, 128), 0.02))]
    resp = post(cluster["r"], "/update_weights_from_tensor", {"serialized_named_tensors": [serialize(named)]})
    assert resp.status_code == 200 and resp.json()["success"], resp.text
    new_via_p, new_at_d = generate(cluster["r"])["output_ids"], generate(cluster["local"])["output_ids"]
    assert new_via_p == new_at_d != via_p  # P's KV and D's decode both use the new weights


def test_pause_in_place_and_abort_on_both_roles(cluster):
    url = cluster["r"]
    params = {"temperature": 0.0, "max_new_tokens": 600, "ignore_eos": True}
    reference = generate(url, params)["output_ids"]
    arrivals: list = []
    results: dict = {}
    stream = run_in_thread(
        lambda: stream_with_arrivals(url, LONG_PROMPT, params, arrivals), results, "stream"
    )
    wait_until(lambda: arrivals and arrivals[-1][1] >= 10, what="the stream to start")
    assert post(url, "/pause_generation", {"mode": "in_place"}).status_code == 200
    paused_at = time.monotonic()
    time.sleep(1.0)
    assert not [n for t, n in arrivals if t > paused_at + 0.3]
    assert post(url, "/continue_generation").status_code == 200
    stream.join(120)
    assert results["stream"]["output_ids"] == reference

    assert post(url, "/pause_generation").status_code == 200
    waiting = run_in_thread(lambda: generate(url), results, "waiting")  # a P/D pair: held on both
    time.sleep(1.0)
    assert waiting.is_alive()
    assert post(url, "/continue_generation").status_code == 200
    waiting.join(60)
    assert results["waiting"]["meta_info"]["completion_tokens"] == GREEDY["max_new_tokens"]


def test_stream_interval_on_the_decode_worker(cluster):
    params = {"temperature": 0.0, "max_new_tokens": 14, "ignore_eos": True, "stream_interval": 5}
    resp = requests.post(
        cluster["r"] + "/generate",
        json={"input_ids": LONG_PROMPT, "sampling_params": params, "stream": True},
        timeout=60,
    )
    counts = [len(c["output_ids"]) for c in sse_chunks(resp)[:-1]]
    assert [b - a for a, b in zip([0, *counts], counts)] == [1, 5, 5, 3], counts


def test_profile_writes_a_trace_per_role(cluster, tmp_path):
    url = cluster["r"]
    assert post(url, "/start_profile", {"output_dir": str(tmp_path), "with_stack": False}).status_code == 200
    generate(url)
    resp = post(url, "/stop_profile")
    assert resp.status_code == 200, resp.text
    files = sorted(p.name for p in tmp_path.glob("*.trace.json.gz"))
    assert len(files) == 2 and any("prefill" in f for f in files) and any("decode" in f for f in files), files
