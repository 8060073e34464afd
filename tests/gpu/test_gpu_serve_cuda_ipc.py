"""`serve --prefill 1 --decode 1 --kv-transfer-backend cuda_ipc` on one GPU (two worker processes
sharing it; the prefill worker writes into the decode worker's pool through CUDA IPC) answers
/generate with the mixed engine's greedy tokens (tiny random Llama, float32), and `auto`, the
default, does the same."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
import requests
import torch

from tests.helpers.tiny_models import make_tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GREEDY = {"temperature": 0.0, "max_new_tokens": 12, "ignore_eos": True}
FLAGS = ["--dtype", "float32", "--device", "cuda", "--max-total-tokens", "2048", "--log-level", "warning"]


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 256) for _ in range(n)]


@pytest.mark.parametrize("backend", ["cuda_ipc", "auto"])
def test_serve_prefill_decode_over_cuda_ipc_equals_mixed(tmp_path: Path, backend: str):
    from pdserve.shared.args import EngineArgs
    from pdserve.shared.engine.engine import Engine
    from tests.e2e.test_serve import Serve

    torch.backends.cuda.matmul.allow_tf32 = False
    model_dir = str(make_tiny_model("llama", tmp_path))
    prompts = [_prompt(n, seed=60 + n) for n in (20, 70, 300)]  # all above the local-prefill threshold
    serve = Serve(
        tmp_path / "serve.log", "--prefill", "1", "--decode", "1", "--kv-transfer-backend", backend,
        "--model-path", model_dir, "--local-prefill-threshold", "16", "--chunked-prefill-size", "64", *FLAGS,
    )  # fmt: skip
    try:
        line = serve.first_line(240)
        assert line is not None and line.startswith("pdserve serving"), serve.log()[-3000:]
        base = f"http://127.0.0.1:{serve.port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            live = requests.get(base + "/get_server_info", timeout=10).json()["live_workers"]
            if live["prefill"] and live["decode"]:
                break
            time.sleep(0.2)
        got = []
        for prompt in prompts:  # one at a time: decode batches of one, as the reference runs them
            body = {"input_ids": prompt, "sampling_params": GREEDY}
            resp = requests.post(base + "/generate", json=body, timeout=120)
            assert resp.status_code == 200, resp.text
            got.append(resp.json()["output_ids"])
    finally:
        serve.close()
    args = {"device": "cuda", "dtype": "float32", "max_total_tokens": 2048, "chunked_prefill_size": 64}
    mixed = Engine(EngineArgs(model_path=model_dir, **args))
    want = [mixed.generate([p], GREEDY)[0]["output_ids"] for p in prompts]
    assert got == want
