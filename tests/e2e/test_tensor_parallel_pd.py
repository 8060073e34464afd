"""Prefill and decode workers of `--tp 2` on the CPU (gloo, zmq KV transfer), behind real routers.

Workers P2 (prefill, TP=2), D2 (decode, TP=2), P1 (prefill, TP=1) and D1 (decode, TP=1) serve a
tiny random Llama (GQA 4/2: one KV head per rank at TP=2) in float32. Three routers pair them as
P2 -> D2 (rank i to rank i), P2 -> D1 and P1 -> D2 (KV head slices between widths), every
prompt prefilled at P (`--local-prefill-threshold 0`). Each pair's greedy tokens equal a TP=1
mixed engine's and transformers' (logprobs within 1e-5), its prefill worker's cache grew, and
every worker ends idle with every page free or cached. Then a follower rank of D2 is killed
mid-stream: the worker exits and its stream finishes at D1 with the same tokens.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading

import psutil
import pytest
import requests

from tests.helpers.cluster_waits import all_pages_back, live_workers, run_in_thread, wait_until
from tests.helpers.hf_reference import hf_greedy
from tests.helpers.router_http import greedy_generate

pytestmark = pytest.mark.slow

COMMON = ["--dtype", "float32", "--device", "cpu", "--max-total-tokens", "4096", "--log-level", "warning"]
KV = ["--kv-transfer-backend", "zmq", "--kv-transfer-timeout", "20"]
MAX_NEW = 8
LOGPROB_TOL = 1e-5


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 256) for _ in range(n)]


PAIRS = [("P2", "D2"), ("P2", "D1"), ("P1", "D2")]
# each pair its own prompts, so that its prefill worker's cache must grow
PROMPTS = {
    pair: [_prompt(5, 10 * i), _prompt(40, 10 * i + 1), _prompt(90, 10 * i + 2)]
    for i, pair in enumerate(PAIRS)
}


@pytest.fixture(scope="module")
def workers(worker_launcher, tiny_llama_dir):
    flags = ["--model-path", tiny_llama_dir, *COMMON, *KV]
    prefill = ["--role", "prefill", "--chunked-prefill-size", "32"]
    roles = {
        "P2": [*prefill, "--tp", "2"],
        "D2": ["--role", "decode", "--tp", "2"],
        "P1": prefill,
        "D1": ["--role", "decode"],
    }
    started: dict = {}
    threads = [run_in_thread(lambda r=r: worker_launcher(*flags, *r), started, n) for n, r in roles.items()]
    for thread in threads:  # started together: their start-ups overlap
        thread.join()
    failed = {name: w for name, w in started.items() if isinstance(w, BaseException)}
    assert not failed, f"workers that did not start: {failed}"
    return started


@pytest.fixture(scope="module")
def references(tiny_llama_dir):
    """Per pair, per prompt: (transformers' (ids, logprobs), a TP=1 mixed engine's ids)."""
    from pdserve.shared.args import EngineArgs
    from pdserve.shared.engine.engine import Engine

    engine = Engine(EngineArgs(model_path=tiny_llama_dir, device="cpu", dtype="float32"))
    prompts = [p for pair in PAIRS for p in PROMPTS[pair]]
    mixed = engine.generate(prompts, {"temperature": 0.0, "max_new_tokens": MAX_NEW})
    rows = list(zip(hf_greedy(tiny_llama_dir, prompts, MAX_NEW), [m["output_ids"] for m in mixed]))
    return {pair: rows[3 * i : 3 * i + 3] for i, pair in enumerate(PAIRS)}


def _prefill_cached(url: str) -> int:
    (row,) = [r for r in requests.get(url + "/get_load", timeout=10).json() if r["role"] == "prefill"]
    return row["num_evictable_pages"]


@pytest.mark.parametrize("pair", PAIRS)
def test_a_pair_of_any_widths_serves_the_greedy_tokens_of_tp1(pair, workers, references, router_launcher):
    p, d = (workers[name] for name in pair)
    url = router_launcher(
        "--worker-addr", p.zmq_address, "--worker-addr", d.zmq_address, "--local-prefill-threshold", "0"
    ).url
    wait_until(lambda: live_workers(url, "prefill") and live_workers(url, "decode"), 30.0, "both workers")
    cached_before = _prefill_cached(url)
    for prompt, ((want_ids, want_lps), mixed_ids) in zip(PROMPTS[pair], references[pair]):
        got_ids, got_lps = greedy_generate(url, prompt, MAX_NEW)
        assert got_ids == want_ids == mixed_ids, (pair, len(prompt))
        assert got_lps == pytest.approx(want_lps, abs=LOGPROB_TOL)
    assert _prefill_cached(url) > cached_before  # the prompts were prefilled at P
    wait_until(lambda: all_pages_back(url), 15.0, "every page back")


def test_a_killed_rank_of_a_decode_worker_moves_its_stream_to_another(
    workers, tiny_llama_dir, router_launcher
):
    """Last in the module: it ends D2. Two streams land one on each decode worker (least load);
    D2's follower rank is killed mid-stream: D2 exits 1, the router drops it, and its stream goes on
    at D1 with the tokens so far, so both end with a TP=1 engine's greedy tokens."""
    from pdserve.shared.args import EngineArgs
    from pdserve.shared.engine.engine import Engine

    p1, d2, d1 = workers["P1"], workers["D2"], workers["D1"]
    (follower,) = psutil.Process(d2.pid).children()
    url = router_launcher(
        "--worker-addr", p1.zmq_address, "--worker-addr", d2.zmq_address, "--worker-addr", d1.zmq_address,
        "--local-prefill-threshold", "0",
    ).url  # fmt: skip
    wait_until(lambda: len(live_workers(url, "decode")) == 2, 30.0, "both decode workers")
    prompts = [_prompt(12, 901), _prompt(20, 902)]
    params = {"temperature": 0.0, "max_new_tokens": 300, "ignore_eos": True}
    engine = Engine(EngineArgs(model_path=tiny_llama_dir, device="cpu", dtype="float32"))
    want = [out["output_ids"] for out in engine.generate(prompts, params)]
    started = [threading.Event() for _ in prompts]
    results: dict = {}

    def stream(i: int) -> list[int]:
        body = {"input_ids": prompts[i], "sampling_params": params, "stream": True}
        last: list[int] = []
        with requests.post(url + "/generate", json=body, stream=True, timeout=120) as resp:
            assert resp.status_code == 200, resp.text
            for line in resp.iter_lines():
                if line.startswith(b"data: {"):
                    last = json.loads(line[len(b"data: ") :])["output_ids"]
                    started[i].set()
        return last

    threads = []
    for i in range(len(prompts)):  # the second stream starts once the first holds a decode worker
        threads.append(run_in_thread(lambda i=i: stream(i), results, i))
        assert started[i].wait(60), f"stream {i} streamed nothing"
    os.kill(follower.pid, signal.SIGKILL)
    assert d2.proc.wait(15) == 1
    wait_until(lambda: len(live_workers(url, "decode")) == 1, 10.0, "the router to drop D2")
    for thread in threads:
        thread.join(120)
    assert [results.get(i) for i in range(len(prompts))] == want
    wait_until(lambda: all_pages_back(url, live_only=True), 15.0, "every page of P1 and D1 back")
