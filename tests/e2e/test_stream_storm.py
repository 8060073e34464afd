"""64 concurrent streams with random client disconnects and aborts: nothing leaks.

A prefill and a decode worker and a mixed worker (tiny Llama, CPU) behind one router, so streams
run through a pair, through local prefill at decode, and through a mixed worker. 64 clients
stream at once; each, by a seeded coin, reads to the end, hangs up after a few events, or has its
rid aborted through /abort_request after a few events. Checked: the streams read to the end equal
the greedy output of an undisturbed run, the aborted ones end with finish_reason abort, and
afterwards every worker is idle with every page free or cached (free + evictable = total).
"""

from __future__ import annotations

import json
import random
import threading

import pytest
import requests

from tests.helpers.cluster_waits import all_pages_back, wait_until

pytestmark = pytest.mark.slow

COMMON = ["--dtype", "float32", "--device", "cpu", "--max-total-tokens", "4096", "--log-level", "warning"]
PARAMS = {"temperature": 0.0, "max_new_tokens": 64, "ignore_eos": True}
STREAMS = 64


@pytest.fixture(scope="module")
def model_dir(tiny_llama_dir) -> str:
    return tiny_llama_dir


def test_random_disconnects_and_aborts_leave_every_page_free(worker_launcher, router_launcher, model_dir):
    from pdserve.shared.args import EngineArgs
    from pdserve.shared.engine.engine import Engine

    flags = ["--model-path", model_dir, *COMMON]
    workers = [
        worker_launcher(*flags, "--role", "prefill", "--chunked-prefill-size", "32"),
        worker_launcher(*flags, "--role", "decode"),
        worker_launcher(*flags),
    ]
    addrs = [flag for w in workers for flag in ("--worker-addr", w.zmq_address)]
    url = router_launcher(*addrs, "--local-prefill-threshold", "48").url
    wait_until(
        lambda: all(
            requests.get(url + "/get_server_info").json()["live_workers"][r] for r in ("prefill", "decode")
        ),
        what="the pair to answer",
    )
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.choice((8, 100)))] for _ in range(STREAMS)]
    fates = [rng.choice(("read", "hang up", "abort")) for _ in range(STREAMS)]
    engine = Engine(EngineArgs(model_path=model_dir, device="cpu", dtype="float32", max_total_tokens=4096))
    want = [r["output_ids"] for r in engine.generate(prompts, PARAMS)]
    results: dict[int, object] = {}

    def stream(i: int) -> None:
        rid = f"storm-{i}"
        body = {"input_ids": prompts[i], "sampling_params": PARAMS, "stream": True, "rid": rid}
        try:
            with requests.post(url + "/generate", json=body, stream=True, timeout=120) as resp:
                events = []
                for line in resp.iter_lines():
                    if not line.startswith(b"data: {"):
                        continue
                    events.append(json.loads(line[6:]))
                    if len(events) == 3 and fates[i] == "hang up":
                        break  # leaving the block closes the connection mid-stream
                    if len(events) == 3 and fates[i] == "abort":
                        requests.post(url + "/abort_request", json={"rid": rid}, timeout=30)
            results[i] = events
        except BaseException as exc:  # noqa: BLE001 (reported by the test)
            results[i] = exc

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(STREAMS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    for i in range(STREAMS):
        events = results[i]
        assert not isinstance(events, BaseException), (i, events)
        last = events[-1]
        if fates[i] == "read":
            assert last["output_ids"] == want[i], i
        elif fates[i] == "abort":
            reason = last["meta_info"]["finish_reason"]
            # a stream may finish before its abort arrives
            assert reason["type"] == "abort" or last["output_ids"] == want[i], (i, reason)
    wait_until(lambda: all_pages_back(url), 30.0, "every worker idle with every page free or cached")
