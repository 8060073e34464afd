"""SGLang's control routes on a CUDA worker (`serve`, one mixed worker: CUDA graphs and overlap
scheduling on), with a trainer-like client in this process:
1. `/update_weights_from_tensor` with CUDA tensors (SGLang's payload: CUDA IPC handles) changes
   the greedy output, and sending the old values back restores it token for token (the captured
   graphs read the parameters updated in place);
2. `/start_profile` with the default activities records CUDA kernels in the trace;
3. a stream paused in place (a decode step may be in flight when the pause lands) resumes with
   the tokens of an undisturbed run; `stream_interval` 4 with overlap sends 1, then 4 at a time.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import threading
import time
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import pytest
import requests
import torch

from tests.helpers.tiny_models import make_tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

FLAGS = ["--dtype", "float32", "--device", "cuda", "--max-total-tokens", "4096", "--log-level", "warning"]
PROMPT = [(5 * i + 11) % 250 + 3 for i in range(12)]
GREEDY = {"temperature": 0.0, "max_new_tokens": 16, "ignore_eos": True}
NORM = "model.norm.weight"


def _generate(base: str, params: dict = GREEDY, stream: bool = False) -> requests.Response:
    body = {"input_ids": PROMPT, "sampling_params": params, "stream": stream}
    return requests.post(base + "/generate", json=body, timeout=120, stream=stream)


def _ids(base: str, params: dict = GREEDY) -> list[int]:
    resp = _generate(base, params)
    assert resp.status_code == 200, resp.text
    return resp.json()["output_ids"]


def _cuda_payload(named: list[tuple[str, torch.Tensor]]) -> str:
    buf = io.BytesIO()
    ForkingPickler(buf).dump(named)  # CUDA tensors travel as CUDA IPC handles
    return base64.b64encode(buf.getvalue()).decode()


def test_control_routes_on_a_cuda_worker(tmp_path: Path):
    from tests.e2e.test_serve import Serve

    model_dir = str(make_tiny_model("llama", tmp_path / "model"))
    serve = Serve(tmp_path / "serve.log", "--model-path", model_dir, *FLAGS)
    try:
        line = serve.first_line(240)
        assert line is not None and line.startswith("pdserve serving"), serve.log()[-3000:]
        base = f"http://127.0.0.1:{serve.port}"
        before = _ids(base)

        # 1. CUDA IPC tensors in, and back
        old = torch.tensor(
            requests.post(base + "/get_weights_by_name", json={"name": NORM}, timeout=30).json()
        )
        new = torch.linspace(-1.0, 1.0, old.numel(), device="cuda")
        resp = requests.post(
            base + "/update_weights_from_tensor",
            json={"serialized_named_tensors": [_cuda_payload([(NORM, new)])]},
            timeout=120,
        )
        assert resp.status_code == 200 and resp.json()["success"], resp.text
        got = requests.post(base + "/get_weights_by_name", json={"name": NORM}, timeout=30).json()
        torch.testing.assert_close(torch.tensor(got), new.cpu())
        changed = _ids(base)
        assert changed != before
        restore = old.to("cuda")
        resp = requests.post(
            base + "/update_weights_from_tensor",
            json={"serialized_named_tensors": [_cuda_payload([(NORM, restore)])]},
            timeout=120,
        )
        assert resp.status_code == 200 and resp.json()["success"], resp.text
        assert _ids(base) == before

        # 2. the profiler sees the GPU
        out = tmp_path / "traces"
        resp = requests.post(
            base + "/start_profile", json={"output_dir": str(out), "with_stack": False}, timeout=30
        )
        assert resp.status_code == 200, resp.text
        _ids(base)
        assert requests.post(base + "/stop_profile", timeout=300).status_code == 200
        (trace,) = out.glob("*.trace.json.gz")
        with gzip.open(trace, "rt") as f:
            events = json.load(f)["traceEvents"]
        assert any(e.get("cat") == "kernel" for e in events)

        # 3. pause in place with overlap, and stream_interval
        params = {"temperature": 0.0, "max_new_tokens": 900, "ignore_eos": True}
        reference = _ids(base, params)
        seen: list[int] = []
        result: dict = {}

        def stream() -> None:
            with _generate(base, params, stream=True) as resp:
                for raw in resp.iter_lines():
                    if raw.startswith(b"data: {"):
                        chunk = json.loads(raw[len(b"data: ") :])
                        seen.append(len(chunk["output_ids"]))
                        result["last"] = chunk

        thread = threading.Thread(target=stream, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while not seen or seen[-1] < 20:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert (
            requests.post(base + "/pause_generation", json={"mode": "in_place"}, timeout=30).status_code
            == 200
        )
        time.sleep(0.3)
        held = len(seen)
        time.sleep(1.0)
        assert len(seen) == held and seen[-1] < params["max_new_tokens"]
        assert requests.post(base + "/continue_generation", timeout=30).status_code == 200
        thread.join(120)
        assert result["last"]["output_ids"] == reference

        chunks = []
        with _generate(base, {**GREEDY, "max_new_tokens": 13, "stream_interval": 4}, stream=True) as resp:
            for raw in resp.iter_lines():
                if raw.startswith(b"data: {"):
                    chunks.append(len(json.loads(raw[len(b"data: ") :])["output_ids"]))
        assert [b - a for a, b in zip([0, *chunks], chunks)] == [1, 4, 4, 4], chunks
    finally:
        serve.close()
