"""`bench_router` end to end at a tiny scale: the stand-in engine, a real router, the HTTP floor and
the relay floor as processes; every request of every path completes with the asked number of tokens and the
results line holds the latency and throughput numbers. (A smoke run: the numbers are not checked
for speed here; bench/RESULTS.md holds the measured ones.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdserve.bench.bench_router import main as bench_router_main
from tests.helpers.tiny_models import make_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.untimed]


def test_bench_router_smoke(tmp_path, capsys):
    model_dir = str(make_tiny_model("llama", tmp_path / "tiny"))
    out_file = tmp_path / "router.jsonl"
    argv = [
        "--model", model_dir, "--tokenizer-dir", model_dir, "--prompt-tokens", "32",
        "--streams", "8", "--output-len", "8", "--duration", "1.5", "--warmup", "0.3", "--rounds", "1",
        "--tp-streams", "20", "--tp-output-len", "16", "--tp-window", "1",
        "--logs", str(tmp_path / "logs"), "--output-file", str(out_file),
    ]  # fmt: skip
    assert bench_router_main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads(Path(out_file).read_text().splitlines()[-1])
    (lat,) = result["latency"]
    for path in ("direct", "router", "floor", "relay"):
        assert lat[path]["failed"] == 0 and lat[path]["completed"] >= 8, (path, lat[path])
        assert 0 < lat[path]["ttft_p50_ms"] <= lat[path]["ttft_p99_ms"] < lat[path]["e2e_p50_ms"]
        # 8 tokens: the first at once, 7 more on a 20 ms step clock
        assert 7 * 20 - 20 < lat[path]["e2e_p50_ms"] < 7 * 20 + 200
    assert lat["added_ttft_p50_ms"] == pytest.approx(
        lat["router"]["ttft_p50_ms"] - lat["direct"]["ttft_p50_ms"]
    )
    point = result["throughput"]["points"][0]
    assert point["failed"] == 0 and point["completed"] > 0
    assert point["offered_tok_s"] == 2000.0 and 0 < point["delivered_tok_s"] < 1.2 * point["offered_tok_s"]
    assert point["cpu_pct"]["server"] > 0 and point["cpu_pct"]["client"] > 0
    assert lat["relay_added_ttft_p50_ms"] == pytest.approx(
        lat["relay"]["ttft_p50_ms"] - lat["direct"]["ttft_p50_ms"]
    )
    assert "latency: 8 streams x 8 tokens, step 20.0 ms" in printed and "floor_added" in printed
    assert "relay_added" in printed
