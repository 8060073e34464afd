"""SGLang's own `bench_serving.py` (sglang 0.5.3, from the wheel on the package registry, unmodified)
against `serve` on random ids, prefill/decode with the native and the chat backends (the mixed run,
with each of its backends, shares test_bench_serving.py's server).

Checked: the script runs to its end (it reads `/get_server_info`'s `internal_states`, and in P/D
mode `decode[0]` first, after the requests: a server without them crashes it) and every request
succeeded, with the output lengths it asked for (`ignore_eos` is set by `--random-*` runs only for
some backends, so the lengths are checked where the script fixes them: `sglang` sets ignore_eos).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.test_serve import Serve
from tests.helpers.sglang_bench import bench_serving_script, run_bench_serving
from tests.helpers.tiny_models import make_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.untimed]

NUM_PROMPTS = 6
INPUT_LEN = 24
OUTPUT_LEN = 6
BACKENDS = ("sglang", "sglang-oai", "sglang-oai-chat", "vllm")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(make_tiny_model("llama", Path(tmp_path_factory.mktemp("tiny-llama"))))


@pytest.fixture(scope="module")
def script() -> Path:
    return bench_serving_script()


def _serve(tmp_path: Path, model_dir: str, *flags: str) -> Serve:
    serve = Serve(
        tmp_path / "serve.log", "--model-path", model_dir, "--device", "cpu", "--dtype", "float32",
        "--max-total-tokens", "2048", "--log-level", "warning", *flags,
    )  # fmt: skip
    line = serve.first_line(120)
    if line is None or not line.startswith("pdserve serving"):
        serve.close()
        raise AssertionError(f"serve did not start:\n{serve.log()[-3000:]}")
    return serve


def runs(base_url: str, model_dir: str, out_file: Path, backends: tuple[str, ...]) -> list[list[str]]:
    common = [
        "--base-url", base_url, "--model", model_dir, "--tokenizer", model_dir, "--dataset-name", "random-ids",
        "--num-prompts", str(NUM_PROMPTS), "--random-input-len", str(INPUT_LEN),
        "--random-output-len", str(OUTPUT_LEN), "--random-range-ratio", "1.0", "--seed", "7",
        "--disable-tqdm", "--output-file", str(out_file),
    ]  # fmt: skip
    return [["--backend", backend, *common] for backend in backends]


def check_results(printed: str, out_file: Path, backends: tuple[str, ...]) -> None:
    assert printed.count("Serving Benchmark Result") == len(backends), printed[-4000:]
    results = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["backend"] for r in results] == list(backends)
    for r in results:
        assert r["completed"] == NUM_PROMPTS, (r["backend"], printed[-4000:])
        assert r["total_input_tokens"] == NUM_PROMPTS * INPUT_LEN, r["backend"]
        assert r["total_output_tokens"] > 0, r["backend"]
        if r["backend"] == "sglang":  # the native backend sends ignore_eos: exact lengths
            assert r["total_output_tokens"] == NUM_PROMPTS * OUTPUT_LEN


def test_sglang_bench_serving_completes_in_prefill_decode_mode(tmp_path, model_dir, script):
    # the native backend (the one that reads `decode[0]`) and the chat one; the OpenAI routes are
    # the same code in both modes. The mixed run, with every backend, is in test_bench_serving.py.
    backends = ("sglang", "sglang-oai-chat")
    serve = _serve(tmp_path, model_dir, "--prefill", "1", "--decode", "1", "--local-prefill-threshold", "8")
    try:
        out_file = tmp_path / "results.jsonl"
        printed = run_bench_serving(
            script, runs(f"http://127.0.0.1:{serve.port}", model_dir, out_file, backends), tmp_path
        )
    finally:
        serve.close()
    check_results(printed, out_file, backends)
