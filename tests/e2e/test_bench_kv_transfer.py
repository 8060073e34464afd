"""bench/bench_kv_transfer.py runs as documented on the dev box: zmq and cuda_ipc (over CPU shared
memory) between two real processes, one row per size with the baseline of the same run and the
receiver's view, and the page-move kernel timed for cuda_ipc."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.untimed]


@pytest.mark.parametrize("backend", ["zmq", "cuda_ipc"])
def test_bench_kv_transfer_rows(tmp_path, backend):
    out = tmp_path / "rows.jsonl"
    argv = ["--backend", backend, "--tokens", "16,64", "--repeats", "2", "--output-file", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "pdserve.bench.bench_kv_transfer", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["backend"], r["device"], r["tokens"]) for r in rows] == [
        (backend, "cpu->cpu", 16),
        (backend, "cpu->cpu", 64),
    ]
    for row in rows:
        # both sides poll their handle (0.1 ms sleeps), so either may see Success first
        assert 0 < row["delivered_ms"] < 60_000 and row["gbps"] > 0 and row["baseline_gbps"] > 0
        assert ("kernel_ms" in row) == (backend == "cuda_ipc")
    assert proc.stdout.count(f"| {backend} | cpu->cpu |") == 2
