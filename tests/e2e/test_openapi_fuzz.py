"""Schemathesis fuzzes a live router (one CPU worker on a tiny random Llama) from its own
/openapi.json: no request it generates, valid or not, gets a 5xx.

Left out of the fuzzing, because they change the shared worker for the requests that follow
(tested by tests/e2e/test_sglang_routes*.py instead): pausing and continuing generation, weight
updates (from disk, from a tensor, the version label), the profiler (it writes traces), and
set_internal_state. Every other route and method of the document is fuzzed, in positive and
negative modes, with a fixed seed and a bounded number of cases per operation.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests

from tests.helpers.tiny_models import make_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.untimed]

SCHEMATHESIS = shutil.which("schemathesis")
# A short context: a fuzzed request without a token limit generates up to it (at 1,024, ~40k decode
# steps over the run, most of its time), and a 4xx for a longer prompt is what the fuzzing checks too.
FLAGS = [
    "--dtype", "float32", "--device", "cpu", "--max-total-tokens", "4096", "--context-length", "96",
    "--log-level", "warning",
]  # fmt: skip
EXCLUDED_PATH_REGEX = (
    r"^/(pause_generation|continue_generation|update_weights.*|update_weight_version"
    r"|start_profile|stop_profile|set_internal_state)$"
)
MAX_EXAMPLES = 8  # per operation in the fuzzing phase; the coverage phase adds its own cases
FUZZ_TIMEOUT_S = 240  # ~70 s alone on the dev box; the suite runs it beside another process


@pytest.fixture(scope="module")
def router(tmp_path_factory, worker_launcher, router_launcher) -> str:
    model_dir = str(make_tiny_model("llama", Path(tmp_path_factory.mktemp("openapi-fuzz"))))
    worker = worker_launcher("--model-path", model_dir, *FLAGS)
    return router_launcher("--worker-addr", worker.zmq_address).url


@pytest.mark.skipif(SCHEMATHESIS is None, reason="schemathesis is not installed (pip install -e .[test])")
def test_fuzzing_the_document_finds_no_server_error(router, tmp_path):
    document = requests.get(router + "/openapi.json", timeout=10).json()
    assert "/generate" in document["paths"]
    report = tmp_path / "junit.xml"
    cmd = [
        SCHEMATHESIS, "run", router + "/openapi.json",
        "--checks", "not_a_server_error",
        "--mode", "all",
        "--phases", "coverage,fuzzing",
        "--max-examples", str(MAX_EXAMPLES),
        "--seed", "12",
        "--workers", "1",
        "--request-timeout", "60",
        "--exclude-path-regex", EXCLUDED_PATH_REGEX,
        "--no-color",
        "--report", "junit", "--report-junit-path", str(report),
    ]  # fmt: skip
    start = time.monotonic()
    # cwd: schemathesis keeps its example database in ./.schemathesis
    proc = subprocess.run(
        cmd, check=False, capture_output=True, text=True, timeout=FUZZ_TIMEOUT_S, cwd=tmp_path
    )
    elapsed = time.monotonic() - start
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"schemathesis failed after {elapsed:.0f} s:\n{output[-6000:]}"
    generated = re.search(r"(\d+) generated, \1 passed", output)
    assert generated and int(generated.group(1)) > 1000, output[-3000:]  # the fuzzing really ran
    # the router still serves after the fuzzing
    assert requests.get(router + "/health", timeout=10).status_code == 200
