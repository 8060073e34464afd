"""`serve --prefill 1 --decode 1` on GPUs (tiny random Llama, float32), driven as a client drives it,
and the mixed engine's greedy tokens it is checked against."""

from __future__ import annotations

import random
import time
from pathlib import Path

import psutil
import requests
import torch

from tests.helpers.tiny_models import make_tiny_model

GREEDY = {"temperature": 0.0, "max_new_tokens": 12, "ignore_eos": True}
ENGINE = {"dtype": "float32", "max_total_tokens": 2048, "chunked_prefill_size": 64}


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 256) for _ in range(n)]


def start_pd_serve(tmp_path: Path, backend: str, device: str, *flags: str):
    """(serve, its URL, the model dir) once the router lists both workers as live; prompts of 16
    tokens or more go through the prefill worker."""
    from tests.e2e.test_serve import Serve

    model_dir = str(make_tiny_model("llama", tmp_path))
    serve = Serve(
        tmp_path / "serve.log", "--prefill", "1", "--decode", "1", "--kv-transfer-backend", backend,
        "--model-path", model_dir, "--local-prefill-threshold", "16", "--chunked-prefill-size", "64",
        "--dtype", "float32", "--device", device, "--max-total-tokens", "2048", "--log-level", "warning", *flags,
    )  # fmt: skip
    line = serve.first_line(240)
    if line is None or not line.startswith("pdserve serving"):
        serve.close()
        raise AssertionError(serve.log()[-3000:])
    base = f"http://127.0.0.1:{serve.port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        live = requests.get(base + "/get_server_info", timeout=10).json()["live_workers"]
        if live["prefill"] and live["decode"]:
            break
        time.sleep(0.2)
    return serve, base, model_dir


def generate(base: str, input_ids: list[int], params: dict = GREEDY) -> list[int]:
    resp = requests.post(
        base + "/generate", json={"input_ids": input_ids, "sampling_params": params}, timeout=120
    )
    assert resp.status_code == 200, resp.text
    return resp.json()["output_ids"]


def mixed_greedy(
    model_dir: str, prompts: list[list[int]], params: dict = GREEDY, device: str = "cuda"
) -> list[list[int]]:
    """The mixed engine's tokens, one prompt at a time (decode batches of one, as serve's were)."""
    from pdserve.shared.args import EngineArgs
    from pdserve.shared.engine.engine import Engine

    torch.backends.cuda.matmul.allow_tf32 = False
    mixed = Engine(EngineArgs(model_path=model_dir, device=device, **ENGINE))
    return [mixed.generate([p], params)[0]["output_ids"] for p in prompts]


def worker_process(serve, role: str) -> psutil.Process:
    """The serve child running `worker --role <role>`."""
    for proc in serve.descendants():
        cmd = proc.cmdline()
        if "--role" in cmd and cmd[cmd.index("--role") + 1] == role:
            return proc
    raise AssertionError(f"no {role} worker among serve's children")
