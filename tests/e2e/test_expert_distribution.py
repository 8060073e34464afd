"""Expert-distribution recording end to end: a real router and a mixed worker serving a tiny random
Qwen2-MoE (4 layers, only layer 1 sparse: decoder_sparse_step 2, mlp_only_layers [3]; top 2 of 8)
with `--expert-distribution-recorder-mode stat`, driven by the seeds' flow with a plain HTTP client:
start, generate, stop, dump. The dumped file is SGLang's stat-mode record and holds exactly the
routed tokens the generation implies: (prompt + completion - 1) tokens through the model, each
counted top-k times in the MoE layer and nowhere else. A worker without the mode answers 400.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
import torch

from tests.helpers.router_http import assert_error
from tests.helpers.tiny_models import make_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.untimed]

FLAGS = ["--dtype", "float32", "--device", "cpu", "--max-total-tokens", "4096", "--log-level", "warning"]
TOP_K, NUM_EXPERTS, NUM_LAYERS, MOE_LAYER = 2, 8, 4, 1
ROUTES = ("start", "stop", "dump")


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory) -> str:
    return str(make_tiny_model("qwen2_moe_sparse", tmp_path_factory.mktemp("tiny-qwen2-moe")))


@pytest.fixture(scope="module")
def record_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("expert-records")


@pytest.fixture(scope="module")
def recording(worker_launcher, router_launcher, moe_dir, record_dir) -> str:
    worker = worker_launcher(
        "--model-path", moe_dir, *FLAGS, "--expert-distribution-recorder-mode", "stat",
        env={"SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR": str(record_dir)},
    )  # fmt: skip
    return router_launcher("--worker-addr", worker.zmq_address).url


def _route(url: str, action: str) -> requests.Response:
    return requests.post(f"{url}/{action}_expert_distribution_record", timeout=60)


def _generate(url: str, text: str) -> dict:
    response = requests.post(f"{url}/generate", json={"text": text}, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()


def test_seeds_flow_dumps_exact_counts(recording: str, record_dir: Path):
    start = _route(recording, "start")
    assert (start.status_code, start.text) == (200, "Start recording the expert distribution.\n")
    out = _generate(recording, "What is the capital of France?")
    stop = _route(recording, "stop")
    assert (stop.status_code, stop.text) == (200, "Stop recording the expert distribution.\n")
    _generate(recording, "Tokens run after the stop are not counted.")
    dump = _route(recording, "dump")
    assert dump.status_code == 200, dump.text
    first, *files = dump.text.splitlines()
    assert first == "Dump expert distribution record." and len(files) == 1
    path = Path(files[0])
    assert path.parent == record_dir and path.name.startswith("expert_distribution_recorder_")
    assert path.suffix == ".pt"

    record = torch.load(path)
    assert set(record) == {"rank", "logical_count", "average_utilization_rate_over_window"}
    counts = record["logical_count"]
    assert counts.dtype == torch.int32 and counts.shape == (1000, NUM_LAYERS, NUM_EXPERTS)
    meta = out["meta_info"]
    tokens = meta["prompt_tokens"] + meta["completion_tokens"] - 1  # the last token is never fed back
    per_layer = counts.sum(dim=0)
    assert per_layer[MOE_LAYER].sum().item() == tokens * TOP_K
    assert per_layer.sum().item() == tokens * TOP_K  # dense layers count nothing
    assert (per_layer[MOE_LAYER] > 0).sum().item() >= 2  # spread over experts, not all on one
    # one buffer row per forward pass: a prefill, then one decode step per further token
    passes = counts.sum(dim=(1, 2))
    assert (passes > 0).sum().item() == meta["completion_tokens"]
    assert passes[0].item() == meta["prompt_tokens"] * TOP_K and passes[1].item() == TOP_K


def test_dump_resets_the_record(recording: str):
    dump = _route(recording, "dump")
    assert dump.status_code == 200
    record = torch.load(dump.text.splitlines()[1])
    assert record["logical_count"].sum().item() == 0


def test_get_works_as_post(recording: str):
    response = requests.get(f"{recording}/stop_expert_distribution_record", timeout=60)
    assert (response.status_code, response.text) == (200, "Stop recording the expert distribution.\n")


def test_mode_off_is_a_400_on_every_route(worker_launcher, router_launcher, moe_dir):
    worker = worker_launcher("--model-path", moe_dir, *FLAGS)
    url = router_launcher("--worker-addr", worker.zmq_address).url
    for action in ROUTES:
        assert_error(_route(url, action), 400, "--expert-distribution-recorder-mode stat", action)
