"""bench/pd_interleave.py on two small Chrome traces laid out by hand: the split of GPU time and
each worker's extra kernel time beside the other's, against numbers worked out on paper."""

from __future__ import annotations

import gzip
import json

import pytest

from pdserve.bench.pd_interleave import analyse, main, worker_label


def write_trace(path, base_ns, kernels, extra_events=()):
    events = [{"ph": "X", "cat": "kernel", "name": n, "ts": ts, "dur": dur} for n, ts, dur in kernels]
    events += list(extra_events)
    with gzip.open(path, "wt") as f:
        json.dump({"baseTimeNanoseconds": base_ns, "traceEvents": events}, f)
    return path


@pytest.fixture
def traces(tmp_path):
    # decode: "gemm" 10 µs alone at 0, 20, 40; at 60 it runs 16 µs beside prefill's kernel (60..90)
    decode = write_trace(
        tmp_path / "1712.5-decode-127.0.0.1-30002.trace.json.gz",
        base_ns=1_000_000,  # 1,000 µs: the prefill trace's clock starts 1,000 µs earlier
        kernels=[("gemm", 0, 10), ("gemm", 20, 10), ("gemm", 40, 10), ("gemm", 60, 16), ("attn", 80, 4)],
        extra_events=[{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 100}],
    )
    prefill = write_trace(
        tmp_path / "1712.5-prefill-127.0.0.1-30001.trace.json.gz",
        base_ns=0,
        # one before decode's trace starts, one beside decode's, one past decode's last
        kernels=[("big", 990, 5), ("big", 1060, 30), ("big", 1100, 30)],
    )
    return prefill, decode


def test_the_window_and_the_split_of_gpu_time(traces):
    prefill, decode = traces
    result = analyse([prefill, decode])
    assert result["workers"] == ["prefill-127.0.0.1-30001", "decode-127.0.0.1-30002"]
    # common window: the later first start (decode's 1,000) to the earlier last end (decode's 1,084)
    assert result["window_ms"] == pytest.approx(0.084)
    share = result["share"]
    # prefill 1,060..1,084 (24 µs); decode 0-10, 20-30, 40-50, 60-76, 80-84 (50 µs); both: 60-76, 80-84
    assert share["prefill-127.0.0.1-30001 only"] == pytest.approx(4 / 84)
    assert share["decode-127.0.0.1-30002 only"] == pytest.approx(30 / 84)
    assert share["both in flight"] == pytest.approx(20 / 84)
    assert share["idle"] == pytest.approx(30 / 84)


def test_extra_time_beside_the_other_worker(traces):
    prefill, decode = traces
    slow = analyse([prefill, decode])["slowdown"]["decode-127.0.0.1-30002"]
    assert slow["kernels"] == 5 and slow["kernels_beside_other"] == 2
    assert slow["gpu_ms"] == pytest.approx(0.050)
    # gemm: 16 beside against a median of 10 alone; attn has no lone run to compare with
    assert slow["extra_ms"] == pytest.approx(0.006)
    assert slow["top_extra"] == [("gemm", pytest.approx(0.006), 1)]
    # no prefill kernel lies wholly inside the window: nothing counted for it
    assert analyse([prefill, decode])["slowdown"]["prefill-127.0.0.1-30001"]["kernels"] == 0


def test_the_command_prints_the_tables_and_writes_json(traces, tmp_path, capsys):
    out = tmp_path / "interleave.json"
    assert main([str(traces[0]), str(traces[1]), "--json-out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| both in flight | 23.8% |" in printed
    assert "| decode-127.0.0.1-30002 | 5 | 2 |" in printed
    assert json.loads(out.read_text())["window_ms"] == pytest.approx(0.084)


def test_a_trace_without_gpu_activity_is_refused(tmp_path, traces):
    cpu_only = write_trace(
        tmp_path / "1.0-mixed-x.trace.json.gz", 0, [], [{"ph": "X", "cat": "cpu_op", "ts": 0, "dur": 5}]
    )
    with pytest.raises(SystemExit, match="no GPU activity"):
        analyse([cpu_only, traces[1]])
    assert worker_label(cpu_only) == "mixed-x"
