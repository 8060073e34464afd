"""`--quantization fp8` on a MoE model served for real: a mixed worker with the tiny Mixtral (fp8
linears and fp8 experts) behind a router, with expert-distribution recording on. Greedy tokens equal
the float32 model with fake-quantized linears and experts (tests/helpers/fp8_reference.py; the
in-process bound is argued in tests/e2e/test_fp8_weights.py), and the recorder still counts every
routed token: (prompt + completion - 1) tokens, top-k times in each of the MoE layers.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import requests
import torch

from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.engine import Engine
from tests.helpers.cluster_waits import live_workers, wait_until
from tests.helpers.fp8_reference import fake_quantize_experts, fake_quantize_linears
from tests.helpers.tiny_models import make_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.untimed]

GREEDY = {"temperature": 0.0, "max_new_tokens": 12, "ignore_eos": True}
TOP_K, NUM_EXPERTS, NUM_LAYERS = 2, 8, 2  # tiny mixtral: every layer sparse


def _route(url: str, action: str) -> requests.Response:
    response = requests.post(f"{url}/{action}_expert_distribution_record", timeout=60)
    assert response.status_code == 200, response.text
    return response


def test_a_worker_serves_fp8_experts_and_records_their_routing(worker_launcher, router_launcher, tmp_path):
    model_dir = str(make_tiny_model("mixtral", tmp_path / "mixtral"))
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    worker = worker_launcher(
        "--model-path", model_dir, "--dtype", "float32", "--device", "cpu", "--quantization", "fp8",
        "--max-total-tokens", "4096", "--log-level", "warning",
        "--expert-distribution-recorder-mode", "stat",
        env={"SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR": str(record_dir)},
    )  # fmt: skip
    url = router_launcher("--worker-addr", worker.zmq_address).url
    wait_until(lambda: len(live_workers(url)) == 1, 20.0, "the worker")

    rng = random.Random(5)
    prompts = [[rng.randrange(3, 256) for _ in range(n)] for n in (6, 19)]
    reference = Engine(EngineArgs(model_path=model_dir, device="cpu", dtype="float32"))
    assert fake_quantize_linears(reference.runner.model) > 0
    assert fake_quantize_experts(reference.runner.model) == NUM_LAYERS
    want = reference.generate(prompts, GREEDY)

    _route(url, "start")
    routed = 0
    for prompt, w in zip(prompts, want, strict=True):
        resp = requests.post(
            url + "/generate", json={"input_ids": prompt, "sampling_params": GREEDY}, timeout=120
        )
        assert resp.status_code == 200, resp.text
        out = resp.json()
        assert out["output_ids"] == w["output_ids"]
        meta = out["meta_info"]
        routed += meta["prompt_tokens"] + meta["completion_tokens"] - 1  # the last token is never fed back
    _route(url, "stop")
    files = _route(url, "dump").text.splitlines()[1:]
    assert len(files) == 1
    counts = torch.load(Path(files[0]))["logical_count"].sum(dim=0)
    assert counts.shape == (NUM_LAYERS, NUM_EXPERTS)
    assert counts.sum(dim=1).tolist() == [routed * TOP_K] * NUM_LAYERS
    assert (counts > 0).sum().item() >= 4  # spread over experts, not all on one
