"""The router pairing prefill and decode workers: real `worker --role prefill|decode` processes (zmq KV
backend, tiny random Llama, CPU, float32), real routers, a real Redis.

Workers P1, D1 (P with `--chunked-prefill-size 16`) register in Redis; router R1 knows them by
`--worker-addr` (KV endpoints from their ServerInfo), router R2 by Redis. In order:
1. through R1, greedy outputs and logprobs of a batch (a short prompt that prefills at D, a long
   one over many chunks at P, repeated prefixes) equal an in-process mixed engine's, token for
   token and within 1e-5; the long prompts were prefilled at P (its cache grew);
2. a prompt shorter than `--local-prefill-threshold` (default 64) never reaches P;
3. client disconnects (a stream after a few tokens, a request while P still prefills) leave both
   workers idle with every page free or cached;
4. through R2 with a second prefill worker P2 and a second decode worker D2: SIGKILL of P1 while it
   holds some of 16 requests: the router sees it gone within 5 s, every request completes with
   the right answer (on P2, or local prefill), and the survivors end with every page back;
5. SIGKILL of a decode worker streaming 8 of 16 requests: the router sees it gone within 5 s, every
   stream goes on (its requests move, with the tokens they had, to the other decode worker) and
   ends with the greedy output of an undisturbed run; afterwards every page of every survivor is
   free or cached;
6. `serve --prefill 1 --decode 1` answers /generate as the mixed engine does, lists the workers by
   role in /get_server_info, and exits 0 on SIGTERM.
"""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from pathlib import Path

import pytest
import requests
import torch

from tests.helpers.cluster_waits import run_in_thread
from tests.helpers.tiny_models import make_tiny_model

pytestmark = pytest.mark.slow

COMMON = ["--dtype", "float32", "--device", "cpu", "--max-total-tokens", "4096", "--log-level", "warning"]
PREFILL_FLAGS = ["--role", "prefill", "--kv-transfer-backend", "zmq", "--chunked-prefill-size", "16"]
DECODE_FLAGS = ["--role", "decode", "--kv-transfer-backend", "zmq", "--kv-transfer-timeout", "10"]
GREEDY = {"temperature": 0.0, "max_new_tokens": 8, "ignore_eos": True}
LONG_OUTPUT = {"temperature": 0.0, "max_new_tokens": 400, "ignore_eos": True}
MOVED_OUTPUT = {"temperature": 0.0, "max_new_tokens": 160, "ignore_eos": True}  # 16 streams at once


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 256) for _ in range(n)]


def wait_until(cond, timeout_s: float = 20.0, what: str = "a condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def loads(url: str) -> list[dict]:
    return requests.get(url + "/get_load", timeout=10).json()


def role_load(url: str, role: str) -> dict:
    (row,) = [r for r in loads(url) if r["role"] == role and r["responding"]]
    return row


def idle(row: dict) -> bool:
    return (
        row["num_reqs"] == 0
        and row["router_inflight"] == 0
        and row["num_free_pages"] + row["num_evictable_pages"] == row["num_total_pages"]
    )


def all_idle(url: str) -> bool:
    return all(idle(r) for r in loads(url) if r["responding"])


def live(url: str) -> dict[str, list[str]]:
    return requests.get(url + "/get_server_info", timeout=10).json()["live_workers"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(make_tiny_model("llama", Path(tmp_path_factory.mktemp("tiny-llama"))))


@pytest.fixture(scope="module")
def reference(model_dir):
    from pdserve.shared.args import EngineArgs
    from pdserve.shared.engine.engine import Engine

    engine = Engine(EngineArgs(model_path=model_dir, device="cpu", dtype="float32", chunked_prefill_size=16))

    def generate(prompts: list[list[int]], params: dict, **fields) -> list[dict]:
        return engine.generate(prompts, params, **fields)

    return generate


@pytest.fixture(scope="module")
def pair(worker_launcher, model_dir, redis_url):
    flags = ["--model-path", model_dir, *COMMON, "--redis-url", redis_url]
    return worker_launcher(*flags, *PREFILL_FLAGS), worker_launcher(*flags, *DECODE_FLAGS)


@pytest.fixture(scope="module")
def r1(router_launcher, pair) -> str:
    p, d = pair
    url = router_launcher("--worker-addr", p.zmq_address, "--worker-addr", d.zmq_address).url
    wait_until(lambda: live(url)["prefill"] and live(url)["decode"], what="both workers to answer")
    return url


def _generate(url: str, input_ids, params: dict, **fields) -> list[dict] | dict:
    body = {"input_ids": input_ids, "sampling_params": params, **fields}
    resp = requests.post(url + "/generate", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()


def _assert_logprobs_close(got: list, want: list, what: str) -> None:
    assert [e[1] for e in got] == [e[1] for e in want], what
    g = torch.tensor([float("nan") if e[0] is None else e[0] for e in got], dtype=torch.float64)
    w = torch.tensor([float("nan") if e[0] is None else e[0] for e in want], dtype=torch.float64)
    assert torch.allclose(g, w, atol=1e-5, equal_nan=True), what


# ---------------------------------------------------------------------- 1, 2: parity, local prefill


def test_pair_output_and_logprobs_equal_the_mixed_engine(r1, reference):
    shared = _prompt(80, seed=1)
    prompts = [_prompt(5, seed=2), _prompt(300, seed=3), shared + [7, 8], shared, shared + [9]]
    logprobs = {"return_logprob": True, "logprob_start_len": 0}
    want = reference(prompts, GREEDY, **logprobs)
    cached_before = role_load(r1, "prefill")["num_evictable_pages"]
    got = _generate(r1, prompts, GREEDY, **logprobs)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g["output_ids"] == w["output_ids"], f"prompt {i}"
        for key in ("output_token_logprobs", "input_token_logprobs"):
            _assert_logprobs_close(g["meta_info"][key], w["meta_info"][key], f"prompt {i} {key}")
        assert g["meta_info"]["prompt_tokens"] == len(prompts[i])
    # the long prompts went through P: its radix cache holds their pages now
    assert role_load(r1, "prefill")["num_evictable_pages"] >= cached_before + (300 + 80) // 16
    wait_until(lambda: all_idle(r1), what="both workers idle")


def test_a_short_prompt_prefills_at_decode(r1, reference):
    prompt = _prompt(40, seed=11)  # < the default --local-prefill-threshold, 64
    before = {role: role_load(r1, role)["num_evictable_pages"] for role in ("prefill", "decode")}
    out = _generate(r1, prompt, GREEDY)
    assert out["output_ids"] == reference([prompt], GREEDY)[0]["output_ids"]
    assert role_load(r1, "prefill")["num_evictable_pages"] == before["prefill"]  # P never saw it
    assert role_load(r1, "decode")["num_evictable_pages"] >= before["decode"] + 40 // 16  # D cached it


# ---------------------------------------------------------------------- 3: client disconnects


def test_client_disconnects_leave_both_workers_idle(r1):
    body = {"input_ids": _prompt(200, seed=21), "sampling_params": LONG_OUTPUT, "stream": True}
    with requests.post(r1 + "/generate", json=body, stream=True, timeout=60) as resp:
        events = 0
        for line in resp.iter_lines():
            events += line.startswith(b"data: ")
            if events == 3:
                break
    # requests cut off while P still prefills them (1000 tokens each, 16 a chunk: P queues them)
    threads = [
        threading.Thread(target=_cut_off, args=(r1, _prompt(1000, seed=22 + i)), daemon=True)
        for i in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    wait_until(lambda: all_idle(r1), 20.0, "both workers idle with every page free or cached")


def _cut_off(url: str, prompt: list[int]) -> None:
    """A client that gives up after 50 ms (on a fast machine the request may finish first)."""
    body = {"input_ids": prompt, "sampling_params": {**LONG_OUTPUT, "max_new_tokens": 8}}
    try:
        requests.post(url + "/generate", json=body, timeout=(5, 0.05))
    except requests.exceptions.ReadTimeout:
        pass


# ---------------------------------------------------------------------- 4, 5: SIGKILL (router over Redis)


@pytest.fixture(scope="module")
def second_pair(worker_launcher, model_dir, redis_url):
    flags = ["--model-path", model_dir, *COMMON, "--redis-url", redis_url]
    return worker_launcher(*flags, *PREFILL_FLAGS), worker_launcher(*flags, *DECODE_FLAGS)


@pytest.fixture(scope="module")
def r2(router_launcher, pair, second_pair, redis_url) -> str:
    url = router_launcher("--redis-url", redis_url, "--load-poll-interval", "0.2").url
    wait_until(lambda: len(live(url)["prefill"]) == 2 and len(live(url)["decode"]) == 2, what="4 workers")
    return url


def _metric(url: str, name: str) -> float:
    lines = requests.get(url + "/metrics", timeout=10).text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name + " "))


def _id_of(url: str, role: str, worker) -> str:
    """The worker's id in the router (Redis: role@host:port, by its ZMQ port)."""
    port = worker.zmq_address.rsplit(":", 1)[1]
    return next(w for w in live(url)[role] if w.endswith(":" + port))


def test_sigkill_of_a_prefill_worker_mid_transfer_still_answers_right(r2, pair, reference):
    p1 = pair[0]
    prompts = [_prompt(700, seed=30 + i) for i in range(16)]
    want = reference(prompts, GREEDY)
    results: dict[int, object] = {}
    threads = [run_in_thread(lambda p=p: _generate(r2, p, GREEDY), results, i) for i, p in enumerate(prompts)]
    p1_id = _id_of(r2, "prefill", p1)
    wait_until(
        lambda: any(r["worker_id"] == p1_id and (r["num_reqs"] or 0) > 0 for r in loads(r2)),
        30.0,
        "P1 to hold a request",
    )
    killed_at = time.monotonic()
    p1.proc.send_signal(signal.SIGKILL)
    wait_until(lambda: p1_id not in live(r2)["prefill"], 5.0, "the router to see P1 gone")
    assert time.monotonic() - killed_at <= 5.0
    for thread in threads:
        thread.join(120)
    for i, w in enumerate(want):
        got = results[i]
        assert not isinstance(got, BaseException), f"prompt {i}: {got!r}"
        assert got["output_ids"] == w["output_ids"], f"prompt {i}"
    assert _metric(r2, "pdserve_router_retries_total") >= 1  # P1's requests were retried
    wait_until(lambda: all_idle(r2), 20.0, "the other workers idle with every page free or cached")


def _last_event(url: str, prompt: list[int]) -> dict:
    """Streams /generate; its last event."""
    body = {"input_ids": prompt, "sampling_params": MOVED_OUTPUT, "stream": True}
    with requests.post(url + "/generate", json=body, stream=True, timeout=120) as resp:
        return [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith(b"data: {")][-1]


def test_sigkill_of_a_decode_worker_mid_stream_moves_its_streams(r2, pair, second_pair, reference):
    prompts = [_prompt(120, seed=40 + i) for i in range(16)]
    want = reference(prompts, MOVED_OUTPUT)
    results: dict[int, object] = {}
    decoders = {_id_of(r2, "decode", d): d for d in (pair[1], second_pair[1])}
    before = {r["worker_id"]: r["generated_tokens"] for r in loads(r2) if r["worker_id"] in decoders}
    threads = [run_in_thread(lambda p=p: _last_event(r2, p), results, i) for i, p in enumerate(prompts)]
    wait_until(
        lambda: all(
            r["generated_tokens"] - before[r["worker_id"]] > 24 for r in loads(r2) if r["worker_id"] in before
        ),
        60.0,
        "both decode workers streaming",
    )
    victim_id = max(
        decoders, key=lambda w: next(r["router_inflight"] for r in loads(r2) if r["worker_id"] == w)
    )
    killed_at = time.monotonic()
    decoders[victim_id].proc.send_signal(signal.SIGKILL)
    wait_until(lambda: victim_id not in live(r2)["decode"], 5.0, "the router to see the decode worker gone")
    assert time.monotonic() - killed_at <= 5.0
    for thread in threads:
        thread.join(120)
    for i, w in enumerate(want):
        got = results[i]
        assert not isinstance(got, BaseException), f"stream {i}: {got!r}"
        assert got["meta_info"]["finish_reason"]["type"] == "length", (i, got["meta_info"])
        assert got["output_ids"] == w["output_ids"], f"stream {i}"
    assert _metric(r2, "pdserve_router_migrations_total") >= 1
    wait_until(lambda: all_idle(r2), 20.0, "the survivors idle with every page free or cached")


# ---------------------------------------------------------------------- 6: serve --prefill 1 --decode 1


def test_serve_prefill_and_decode(tmp_path, model_dir, reference):
    from tests.e2e.test_serve import Serve

    serve = Serve(
        tmp_path / "serve.log", "--prefill", "1", "--decode", "1", "--model-path", model_dir,
        "--dtype", "float32", "--max-total-tokens", "1024", "--log-level", "warning",
        "--local-prefill-threshold", "16",
    )  # fmt: skip
    try:
        line = serve.first_line(90)
        assert line is not None and line.startswith("pdserve serving"), serve.log()[-3000:]
        base = f"http://127.0.0.1:{serve.port}"
        wait_until(lambda: live(base)["prefill"] and live(base)["decode"], what="both workers live")
        assert live(base)["mixed"] == []
        prompts = [_prompt(5, seed=50), _prompt(70, seed=51)]
        got = _generate(base, prompts, GREEDY)
        want = reference(prompts, GREEDY)
        assert [g["output_ids"] for g in got] == [w["output_ids"] for w in want]
        children = serve.descendants()
        assert len(children) == 4, [" ".join(p.cmdline()) for p in children]  # redis, P, D, router
        serve.proc.send_signal(signal.SIGTERM)
        assert serve.proc.wait(30) == 0
    finally:
        serve.close()
