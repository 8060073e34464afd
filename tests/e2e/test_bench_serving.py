"""`bench_serving` against a real server: `serve` with a tiny random Llama on CPU (real processes).

Checked, for the native and both OpenAI backends: every request succeeds, the JSON line of
`--output-file` holds the metrics, and with `ignore_eos` every output has exactly the length the
dataset asked (the dataset is rebuilt here from the same seed). A run whose requests the server
refuses exits 1 and prints the first error.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pdserve.bench import serving_datasets as ds
from pdserve.bench.bench_procs import free_port
from pdserve.bench.bench_serving import main as bench_serving_main
from pdserve.shared.launch.worker_process import http_status
from pdserve.shared.tokenizer import get_tokenizer
from tests.helpers.tiny_models import make_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.untimed]

NUM_PROMPTS = 8
INPUT_LEN = 32
OUTPUT_LEN = 8
SEED = 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(make_tiny_model("llama", Path(tmp_path_factory.mktemp("tiny-llama"))))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory) -> Iterator[str]:
    """The URL of `serve --model-path <tiny llama> --device cpu` on a free port."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve-logs") / "serve.log"
    cmd = ["serve", "--model-path", model_dir, "--port", str(port), "--device", "cpu", "--dtype", "float32"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while http_status(url + "/health") != 200:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"serve did not become healthy:\n{log_path.read_text()[-4000:]}")
                time.sleep(0.25)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _run(server: str, tmp_path: Path, *flags: str) -> tuple[int, dict, str]:
    out_file = tmp_path / "runs.jsonl"
    argv = [
        "--base-url", server, "--num-prompts", str(NUM_PROMPTS), "--random-input-len", str(INPUT_LEN),
        "--random-output-len", str(OUTPUT_LEN), "--seed", str(SEED), "--disable-tqdm",
        "--output-file", str(out_file), "--output-details", *flags,
    ]  # fmt: skip
    rc = bench_serving_main(argv)
    lines = out_file.read_text().splitlines()
    assert len(lines) == 1
    return rc, json.loads(lines[0]), out_file.read_text()


def _asked_output_lens(model_dir: str, dataset: str) -> list[int]:
    tok = get_tokenizer(model_dir)
    rows = ds.random_rows(
        tok,
        NUM_PROMPTS,
        INPUT_LEN,
        OUTPUT_LEN,
        0.0,
        np.random.default_rng(SEED),
        as_ids=False,  # the output lengths are drawn before the ids: the same either way
    )
    return [r.output_len for r in rows]


@pytest.mark.parametrize(
    ("backend", "dataset", "flags"),
    [
        ("sglang", "random-ids", ["--tokenize-prompt", "--flush-cache"]),  # ids as input_ids
        ("sglang-oai", "random-ids", ["--tokenize-prompt"]),  # ids as an OpenAI token-list prompt
        ("sglang-oai-chat", "random-ids", []),  # text, as SGLang's client sends it
        ("vllm", "random", []),
    ],
)
def test_every_request_succeeds_with_exact_lengths(
    server, model_dir, tmp_path, capsys, backend, dataset, flags
):
    rc, line, _ = _run(server, tmp_path, "--backend", backend, "--dataset-name", dataset, *flags)
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "============ Serving Benchmark Result ============" in printed
    assert (line["completed"], line["failed"], line["backend"]) == (NUM_PROMPTS, 0, backend)
    asked = _asked_output_lens(model_dir, dataset)
    assert line["output_lens"] == asked
    assert line["total_output_tokens"] == sum(asked)
    assert line["tokenizer"] == model_dir or Path(line["tokenizer"]).resolve() == Path(model_dir).resolve()
    for key in ("request_throughput", "output_throughput", "median_ttft_ms", "p99_ttft_ms",
                "median_e2e_latency_ms", "p99_e2e_latency_ms", "concurrency", "max_output_tokens_per_s"):  # fmt: skip
        assert line[key] > 0, key
    # a stream whose router fell behind folds its backlog into one event, so a loaded box may see 8
    # tokens arrive at once and no inter-token gap at all; any gap measured is positive
    assert line["mean_itl_ms"] > 0 or not any(line["itls"]), line["itls"]
    assert all(len(itl) <= n - 1 for itl, n in zip(line["itls"], asked))
    assert all(0 < t < lat for t, lat in zip(line["ttfts"], line["latencies"]))


def test_refused_requests_fail_the_run(server, tmp_path, capsys):
    bad = json.dumps({"sampling_params": {"temperature": -1.0}})
    rc, line, _ = _run(server, tmp_path, "--warmup-requests", "0", "--extra-request-body", bad)
    printed = capsys.readouterr().out
    assert rc == 1
    assert (line["completed"], line["failed"]) == (0, NUM_PROMPTS)
    assert line["first_error"].startswith("HTTP 400") and "temperature" in line["first_error"]
    assert "request(s) failed; first error: HTTP 400" in printed


def test_sglangs_own_bench_serving_completes_with_every_backend(server, model_dir, tmp_path):
    """SGLang 0.5.3's bench_serving.py, unmodified (tests/e2e/test_sglang_bench_serving.py says
    what it checks), against this module's `serve` with each of its backends."""
    from tests.e2e.test_sglang_bench_serving import BACKENDS, check_results, runs
    from tests.helpers.sglang_bench import bench_serving_script, run_bench_serving

    out_file = tmp_path / "sglang-results.jsonl"
    printed = run_bench_serving(bench_serving_script(), runs(server, model_dir, out_file, BACKENDS), tmp_path)
    check_results(printed, out_file, BACKENDS)
