"""`serve --dp 2` on the CPU: two mixed workers behind the router, each of `--tp` ranks.

For `--tp 1` and `--tp 2` (gloo), on a tiny random Llama: serve becomes ready, the router lists 2
live workers, `--tp 2` started one follower rank per worker, greedy /generate answers equal a TP=1
engine's output, and SIGTERM exits 0 leaving no process behind.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import requests

from tests.e2e.test_serve import READY_TIMEOUT_S, Serve, _flags, _gone
from tests.helpers.cluster_waits import live_workers
from tests.helpers.engine_tokens import tp1_greedy_tokens
from tests.helpers.tiny_models import make_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.untimed]

PROMPTS = [[5, 17, 33, 2, 90, 41, 7], [11] * 23, [3, 4, 5]]
GREEDY = {"temperature": 0.0, "max_new_tokens": 8, "ignore_eos": True}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(make_tiny_model("llama", Path(tmp_path_factory.mktemp("tiny-llama"))))


@pytest.mark.parametrize("tp", [1, 2])
def test_serve_dp2_lists_two_workers_and_answers_with_tp1_tokens(model_dir, tmp_path, tp):
    want = tp1_greedy_tokens(model_dir, PROMPTS, GREEDY)
    serve = Serve(tmp_path / "serve.log", *_flags(model_dir), "--dp", "2", "--tp", str(tp), "--device", "cpu")
    try:
        line = serve.first_line(READY_TIMEOUT_S)
        assert line is not None and line.startswith("pdserve serving"), serve.log()[-3000:]
        url = f"http://127.0.0.1:{serve.port}"
        assert len(live_workers(url)) == 2
        followers = [p for p in serve.descendants() if "tp_follower_main" in " ".join(p.cmdline())]
        assert len(followers) == (2 if tp == 2 else 0)
        for _ in range(2):  # several requests: whichever worker the router picks must agree
            for prompt, tokens in zip(PROMPTS, want):
                body = {"input_ids": prompt, "sampling_params": GREEDY}
                resp = requests.post(url + "/generate", json=body, timeout=60)
                assert resp.status_code == 200, resp.text
                assert resp.json()["output_ids"] == tokens
        children = serve.descendants()
        serve.proc.send_signal(signal.SIGTERM)
        assert serve.proc.wait(30) == 0, serve.log()[-3000:]
        assert not _gone(children)
    finally:
        serve.close()
