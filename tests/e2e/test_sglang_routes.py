"""SGLang's control routes through the router, checked on the workers' real behaviour (the weight
and pause routes are in test_sglang_routes_weights.py).

Two real tiny-Llama workers behind one router (round robin, an admin key;
tests/helpers/sglang_routes_stack.py), in order:
1. `/start_profile` / `/stop_profile` write a Chrome trace per worker into `output_dir`
   (and `num_steps` stops by itself); `/freeze_gc` reports frozen objects per process;
2. `/configure_logging` switches the router's request log (its `Finish:` lines) on and off;
3. refused routes answer 400 in the OpenAI shape with a reason, PUT where SGLang takes it, and the
   control routes need the admin key; SageMaker's `/ping` and `/invocations` serve.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import requests

from tests.helpers.cluster_waits import wait_until
from tests.helpers.router_http import assert_error

# the fixtures come from the helper module: test arguments that name them are not redefinitions
# ruff: noqa: F811
from tests.helpers.sglang_routes_stack import (  # noqa: F401 (fixtures)
    ADMIN,
    GREEDY,
    PROMPT,
    admin,
    generate,
    model_dir,
    on_both,
    router,
    workers,
)

pytestmark = [pytest.mark.slow, pytest.mark.untimed]


# ---------------------------------------------------------------------- 1. profiler, gc


def _trace_events(path: Path) -> list:
    with gzip.open(path, "rt") as f:
        return json.load(f)["traceEvents"]


def test_start_and_stop_profile_write_a_trace_per_worker(router, tmp_path):
    out = tmp_path / "traces"
    resp = admin(router, "/start_profile", {"output_dir": str(out), "with_stack": False})
    assert (resp.status_code, resp.text) == (200, "Start profiling.\n")
    assert_error(admin(router, "/start_profile", {"output_dir": str(out)}), 400, "already in progress")
    on_both(router)
    resp = admin(router, "/stop_profile", method="GET")
    assert resp.status_code == 200, resp.text
    lines = resp.text.splitlines()
    assert lines[0] == "Stop profiling. Traces saved to:"
    files = sorted(out.glob("*.trace.json.gz"))
    assert sorted(lines[1:]) == [str(f) for f in files] and len(files) == 2
    for f in files:
        names = {e.get("name", "") for e in _trace_events(f)}
        assert any(n.startswith("aten::") for n in names), sorted(names)[:20]  # the model's ops
    assert_error(admin(router, "/stop_profile"), 400, "not in progress")


def test_profile_num_steps_stops_by_itself(router, tmp_path):
    resp = admin(router, "/start_profile", {"output_dir": str(tmp_path), "num_steps": 2, "with_stack": False})
    assert resp.status_code == 200, resp.text
    on_both(router)  # 8 steps on each worker
    wait_until(lambda: len(list(tmp_path.glob("*.trace.json.gz"))) == 2, what="both traces")
    assert_error(admin(router, "/stop_profile"), 400, "not in progress")
    assert_error(admin(router, "/start_profile", {"start_step": 3}), 400, "start_step")
    assert_error(admin(router, "/start_profile", {"activities": ["MEM"]}), 400, "MEM")


def test_freeze_gc_freezes_every_process(router, workers):
    resp = admin(router, "/freeze_gc")
    assert resp.status_code == 200, resp.text
    first, *counts = resp.text.splitlines()
    assert first == "Garbage collection frozen."
    frozen = dict(line.rsplit(": ", 1) for line in counts)
    assert set(frozen) == {"router", *workers}
    assert all(int(v.split()[0]) > 1000 for v in frozen.values()), frozen  # torch alone is thousands


# ---------------------------------------------------------------------- 2-3. logging, refused routes, PUT, SageMaker


REFUSED = [
    ("POST", "/release_memory_occupation", {}, ["cpu", "GPU memory"]),
    ("GET", "/resume_memory_occupation", None, ["cpu"]),
    ("POST", "/open_session", {"capacity_of_str_len": 100}, ["sessions are not supported"]),
    ("POST", "/close_session", {"session_id": "s"}, ["sessions are not supported"]),
    ("POST", "/load_lora_adapter", {"lora_name": "a", "lora_path": "/x"}, ["no LoRA support"]),
    ("POST", "/unload_lora_adapter", {"lora_name": "a"}, ["no LoRA support"]),
    ("POST", "/configure_logging", {"log_requests_level": 2}, ["one level"]),
    ("GET", "/configure_logging", {"dump_requests_folder": "/tmp/d"}, ["no request dumps"]),
    ("POST", "/set_internal_state", {"server_args": {"max_micro_batch_size": 8}}, ["pipeline parallelism"]),
    ("PUT", "/set_internal_state", {"server_args": {"max_running_requests": 8}}, ["max_running_requests"]),
    ("POST", "/update_weights_from_distributed", {}, ["torch.distributed"]),
    ("POST", "/init_weights_update_group", {}, ["torch.distributed"]),
    ("GET", "/slow_down", None, ["not supported"]),
    ("GET", "/clear_hicache_storage_backend", None, ["hierarchical cache"]),
    ("POST", "/v1/embeddings", {"input": "hi", "model": "m"}, ["generation model", "embedding model"]),
    ("POST", "/v1/responses", {"input": "hi", "model": "m"}, ["Responses API"]),
    ("GET", "/v1/responses/resp_1", None, ["Responses API"]),
    ("PUT", "/classify", {"text": "x"}, ["reward"]),
    ("PUT", "/v1/rerank", {"query": "q", "documents": ["d"]}, ["rerank"]),
    ("PUT", "/encode", {"text": "x"}, ["embedding model"]),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "words"), REFUSED, ids=[f"{m} {p}" for m, p, _, _ in REFUSED]
)
def test_refused_routes_answer_400_with_the_reason(router, method, path, body, words):
    resp = requests.request(method, router + path, json=body, headers=ADMIN, timeout=30)
    assert_error(resp, 400, path if not path.startswith("/v1/responses/") else "/v1/responses", *words)


def test_configure_logging_switches_the_request_log(router, tmp_path_factory):
    logs = sorted(tmp_path_factory.getbasetemp().glob("router-logs*/router-*.log"))

    def logged(rid: str) -> bool:
        return any(f"Finish: rid={rid}," in path.read_text() for path in logs)

    resp = admin(router, "/configure_logging", {"log_requests": True, "log_requests_level": 0})
    assert (resp.status_code, resp.text) == (200, "")
    generate(router, rid="logged-request")
    wait_until(lambda: logged("logged-request"), what="the Finish line")
    assert admin(router, "/configure_logging", {"log_requests": False}).status_code == 200
    generate(router, rid="quiet-request")
    generate(router, rid="after-quiet")  # the quiet one has ended well before this one's answer
    assert not logged("quiet-request")


def test_set_internal_state_with_nothing_to_change_answers_the_arguments(router):
    resp = admin(router, "/set_internal_state", {"server_args": {}}, method="PUT")
    assert resp.status_code == 200 and resp.json()["updated"] is True
    assert resp.json()["server_args"]["admin_api_key"] == "<set>"


def test_put_generate_and_sagemaker_routes(router):
    resp = requests.put(
        router + "/generate", json={"input_ids": PROMPT, "sampling_params": GREEDY}, timeout=60
    )
    assert resp.status_code == 200 and len(resp.json()["output_ids"]) == GREEDY["max_new_tokens"]
    assert requests.get(router + "/ping", timeout=10).status_code == 200
    resp = requests.post(
        router + "/invocations",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "ignore_eos": True},
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] == 4
