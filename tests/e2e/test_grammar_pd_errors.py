"""Grammars through a P/D pair behind the router (real `worker --role prefill|decode` processes, zmq
KV transfer, tiny random Llama, CPU), with `--local-prefill-threshold 0` so every request is
prefilled at P and decoded at D, each compiling the grammar on its own compile thread:
- a grammar xgrammar cannot compile is an HTTP 400 in the OpenAI error shape naming the reason
  (chat completions with the `openai` package, /generate streaming or not), as with a mixed worker;
- a new schema (one request of n=1, sampled) crosses the pair and validates, and so does a
  structural tag; afterwards both workers are idle with every page free or cached.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jsonschema
import openai
import pytest
import requests

from tests.helpers.tiny_models import make_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.untimed]

COMMON = ["--dtype", "float32", "--device", "cpu", "--max-total-tokens", "4096", "--log-level", "warning"]
KV = ["--kv-transfer-backend", "zmq", "--kv-transfer-timeout", "30"]
SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "integer"}, "ok": {"type": "boolean"}},
    "required": ["id", "ok"],
}
PROMPT = "Write the record as JSON: "


@pytest.fixture(scope="module")
def url(worker_launcher, router_launcher, tmp_path_factory) -> str:
    model_dir = str(make_tiny_model("llama", Path(tmp_path_factory.mktemp("tiny-llama"))))
    flags = ["--model-path", model_dir, *COMMON, *KV]
    prefill = worker_launcher(*flags, "--role", "prefill")
    decode = worker_launcher(*flags, "--role", "decode")
    router = router_launcher(
        "--worker-addr", prefill.zmq_address, "--worker-addr", decode.zmq_address,
        "--local-prefill-threshold", "0", "--served-model-name", "tiny",
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not _both_live(router.url):
        assert time.monotonic() < deadline, "the router never saw both workers"
        time.sleep(0.1)
    return router.url


def _both_live(url: str) -> bool:
    live = requests.get(url + "/get_server_info", timeout=10).json()["live_workers"]
    return bool(live["prefill"] and live["decode"])


def _idle(url: str) -> bool:
    rows = requests.get(url + "/get_load", timeout=10).json()
    return all(
        r["num_reqs"] == 0 and r["num_free_pages"] + r["num_evictable_pages"] == r["num_total_pages"]
        for r in rows
    )


@pytest.mark.parametrize("stream", [False, True])
def test_uncompilable_grammar_is_a_400(url, stream):
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError, match="could not be compiled by xgrammar: Unsupported type"):
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=8, stream=stream,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wrong"}}},
        )  # fmt: skip
    body = {"text": PROMPT, "sampling_params": {"regex": "(unclosed"}, "stream": stream}
    resp = requests.post(url + "/generate", json=body, timeout=60)
    assert resp.status_code == 400, resp.text
    error = resp.json()
    assert error["object"] == "error" and "regex could not be compiled by xgrammar" in error["message"]


def test_new_grammars_cross_the_pair(url):
    for seed in range(2):
        params = {
            "temperature": 1.0,
            "sampling_seed": seed,
            "max_new_tokens": 120,
            "json_schema": json.dumps(SCHEMA),
        }
        resp = requests.post(url + "/generate", json={"text": PROMPT, "sampling_params": params}, timeout=120)
        assert resp.status_code == 200, resp.text
        assert resp.json()["meta_info"]["finish_reason"]["type"] == "stop"
        jsonschema.validate(json.loads(resp.json()["text"]), SCHEMA)
    tag = {
        "type": "structural_tag",
        "format": {
            "type": "tag",
            "begin": "<r>",
            "content": {"type": "json_schema", "json_schema": SCHEMA, "max_whitespace_cnt": 1},
            "end": "</r>",
        },
    }
    params = {
        "temperature": 1.0,
        "sampling_seed": 5,
        "max_new_tokens": 120,
        "structural_tag": json.dumps(tag),
    }
    resp = requests.post(url + "/generate", json={"text": PROMPT, "sampling_params": params}, timeout=120)
    assert resp.status_code == 200, resp.text
    text = resp.json()["text"]
    assert text.startswith("<r>") and text.endswith("</r>"), text
    jsonschema.validate(json.loads(text[3:-4]), SCHEMA)
    deadline = time.monotonic() + 20
    while not _idle(url):
        assert time.monotonic() < deadline, requests.get(url + "/get_load", timeout=10).json()
        time.sleep(0.1)
