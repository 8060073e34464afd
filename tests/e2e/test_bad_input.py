"""A table of bad requests against a real router (tiny Llama worker behind it) while a long stream runs.

One worker and one router (`--api-key`, `--max-body-bytes 1000000`). A greedy 300-token stream of
`/generate` runs in a thread while every case of the table is sent: malformed JSON, empty bodies,
JSON that is not an object, wrong field types, out-of-range sampling values, a body over the size
limit, deep nesting, invalid UTF-8, a bearer token of non-ASCII bytes, too many stop strings, a
non-JSON content type, an unknown route and a wrong method. Each case must answer its exact status
quickly, in the OpenAI error shape with a named type; the stream must then finish with all its
tokens, equal to an undisturbed run of the same request.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.helpers.router_http import API_KEY, AUTH, sse_chunks
from tests.helpers.tiny_models import make_tiny_model

pytestmark = pytest.mark.slow

WORKER_FLAGS = [
    "--dtype",
    "float32",
    "--device",
    "cpu",
    "--max-total-tokens",
    "4096",
    "--log-level",
    "warning",
]
MAX_BODY = 1_000_000
LONG = {
    "input_ids": [3, 4, 5],
    "sampling_params": {"temperature": 0.0, "max_new_tokens": 300, "ignore_eos": True},
}
QUICK_S = 2.0
JSON_TYPE = {"Content-Type": "application/json"}


def _j(obj) -> bytes:
    return json.dumps(obj).encode()


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"prompt": "hi", "max_tokens": 2}


def _gen(**sampling) -> bytes:
    return _j({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2, **sampling}})


# (name, method, path, body, extra headers, status)
CASES = [
    ("malformed json", "POST", "/generate", b'{"text": ', {}, 400),
    ("malformed json chat", "POST", "/v1/chat/completions", b'{"messages": [', {}, 400),
    ("empty body", "POST", "/generate", b"", {}, 400),
    ("empty body completions", "POST", "/v1/completions", b"   ", {}, 400),
    ("not an object", "POST", "/generate", b"[1, 2]", {}, 400),
    ("not an object completions", "POST", "/v1/completions", b'"hi"', {}, 400),
    ("text of wrong type", "POST", "/generate", _j({"text": 5}), {}, 400),
    ("stream of wrong type", "POST", "/generate", _j({"text": "a", "stream": "yes"}), {}, 400),
    ("temperature of wrong type", "POST", "/generate", _gen(temperature="hot"), {}, 400),
    ("messages of wrong type", "POST", "/v1/chat/completions", _j({"messages": "hi"}), {}, 400),
    ("max_tokens of wrong type", "POST", "/v1/completions", _j({**COMPLETION, "max_tokens": "ten"}), {}, 400),
    ("temperature < 0", "POST", "/generate", _gen(temperature=-1.0), {}, 400),
    ("top_p > 1", "POST", "/generate", _gen(top_p=1.5), {}, 400),
    ("max_new_tokens < 0", "POST", "/generate", _gen(max_new_tokens=-1), {}, 400),
    ("n = 0", "POST", "/generate", _gen(n=0), {}, 400),
    ("top_k = 0", "POST", "/generate", _gen(top_k=0), {}, 400),
    ("chat temperature < 0", "POST", "/v1/chat/completions", _j({**CHAT, "temperature": -0.5}), {}, 400),
    ("chat top_p > 1", "POST", "/v1/chat/completions", _j({**CHAT, "top_p": 2}), {}, 400),
    ("chat n = 0", "POST", "/v1/chat/completions", _j({**CHAT, "n": 0}), {}, 400),
    ("completions max_tokens < 0", "POST", "/v1/completions", _j({**COMPLETION, "max_tokens": -1}), {}, 400),
    ("body over the limit", "POST", "/generate", _j({"text": "x" * (MAX_BODY + 10)}), {}, 413),
    ("deep nesting", "POST", "/generate", b'{"text": ' + _nested(10_000) + b"}", {}, 400),
    ("deep nesting chat", "POST", "/v1/chat/completions", b'{"messages": ' + _nested(10_000) + b"}", {}, 400),
    ("invalid utf-8", "POST", "/generate", b'{"text": "\xff\xfe"}', {}, 400),
    ("non-ascii bearer", "POST", "/generate", _gen(), {"Authorization": b"Bearer \xff\xfe\xe9"}, 401),
    ("too many stop strings", "POST", "/generate", _gen(stop=["s"] * 300), {}, 400),
    ("too many stop strings chat", "POST", "/v1/chat/completions", _j({**CHAT, "stop": ["s"] * 300}), {}, 400),
    ("too many stop token ids", "POST", "/v1/completions", _j({**COMPLETION, "stop_token_ids": [1] * 2000}), {}, 400),
    ("text/plain", "POST", "/generate", _gen(), {"Content-Type": "text/plain"}, 415),
    ("text/plain chat", "POST", "/v1/chat/completions", _j(CHAT), {"Content-Type": "text/plain"}, 415),
    ("unknown route", "POST", "/v1/no_such_route", _j(CHAT), {}, 404),
    ("wrong method", "GET", "/generate", b"", {}, 405),
    ("wrong method chat", "DELETE", "/v1/chat/completions", b"", {}, 405),
]  # fmt: skip


@pytest.fixture(scope="module")
def router(router_launcher, worker_launcher, tmp_path_factory) -> str:
    model = make_tiny_model("llama", Path(tmp_path_factory.mktemp("tiny-llama")))
    worker = worker_launcher("--model-path", str(model), *WORKER_FLAGS)
    url = router_launcher(
        "--worker-addr", worker.zmq_address, "--api-key", API_KEY, "--max-body-bytes", str(MAX_BODY),
    ).url  # fmt: skip
    deadline = time.monotonic() + 60
    while requests.post(url + "/generate", data=_gen(), headers=AUTH, timeout=30).status_code != 200:
        assert time.monotonic() < deadline, "the router did not learn its worker's model"
        time.sleep(0.1)
    return url


def _stream_long(url: str, first_chunk: threading.Event, out: dict) -> None:
    try:
        resp = requests.post(
            url + "/generate", json={**LONG, "stream": True}, headers=AUTH, stream=True, timeout=120
        )
        text = b""
        for piece in resp.iter_content(chunk_size=None):
            text += piece
            first_chunk.set()
        out["chunks"] = sse_chunks(type("R", (), {"text": text.decode()})())
        out["finished_at"] = time.monotonic()
    finally:
        first_chunk.set()


def test_bad_input_table_while_a_stream_runs(router):
    baseline = requests.post(router + "/generate", json=LONG, headers=AUTH, timeout=120).json()
    assert len(baseline["output_ids"]) == 300

    first_chunk, long_out = threading.Event(), {}
    thread = threading.Thread(target=_stream_long, args=(router, first_chunk, long_out), daemon=True)
    thread.start()
    assert first_chunk.wait(60)
    table_start = time.monotonic()
    failures = []
    for name, method, path, body, headers, status in CASES:
        sent = time.monotonic()
        resp = requests.request(
            method, router + path, data=body, headers={**AUTH, **JSON_TYPE, **headers}, timeout=30
        )
        took = time.monotonic() - sent
        try:
            err = resp.json()
            assert resp.status_code == status, (resp.status_code, err)
            assert err["object"] == "error" and err["code"] == status, err
            assert err["type"] and err["type"] != "Error" and err["type"].endswith("Error"), err
            assert isinstance(err["message"], str) and err["message"], err
            assert took < QUICK_S, f"took {took:.2f} s"
        except (AssertionError, ValueError) as exc:
            failures.append(f"{name}: {exc!r} body={resp.text[:300]!r}")
    assert not failures, "\n".join(failures)

    thread.join(120)
    assert not thread.is_alive()
    chunks = long_out["chunks"]
    assert long_out["finished_at"] > table_start  # the table ran while the stream did
    final = chunks[-2]
    assert final["meta_info"]["completion_tokens"] == 300
    assert final["meta_info"]["finish_reason"]["type"] == "length"
    assert final["output_ids"] == baseline["output_ids"] and final["text"] == baseline["text"]
