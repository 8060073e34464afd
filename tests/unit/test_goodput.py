"""bench/goodput.py on synthetic bench_serving output files (the lines `--output-details` writes):
exact throughputs, percentiles, SLO attainment, goodput and the goals' verdicts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdserve.bench.goodput import Slo, main, read_runs, run_stats, setup_goodput

SLO = Slo()


def _line(rate, duration, ttfts, itls, errors=None, output_lens=None):
    n = len(ttfts)
    return {
        "backend": "sglang",
        "request_rate": rate,
        "duration": duration,
        "completed": n,
        "ttfts": ttfts,
        "itls": itls,
        "errors": errors or [""] * n,
        "output_lens": output_lens or [len(gaps) + 1 for gaps in itls],
        "generated_texts": [""] * n,
    }


def _write(path: Path, *lines: dict) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _files(tmp_path: Path) -> tuple[Path, Path]:
    # the split: every request within the SLO at 1 and 2 req/s
    pd = _write(
        tmp_path / "pd.jsonl",
        _line(1, 4.0, [0.1, 0.2, 0.3, 0.4], [[0.01, 0.02]] * 4),
        _line(2, 4.0, [0.1] * 8, [[0.01, 0.02]] * 8),
    )
    # the mixed pair: twice the ITL at 1 req/s; at 2 req/s two requests fail and two miss the TTFT
    mixed = _write(
        tmp_path / "mixed.jsonl",
        _line(1, 4.0, [0.1, 0.2, 0.3, 0.4], [[0.01, 0.04]] * 4),
        _line(
            2,
            4.0,
            [0.1, 0.1, 0.1, 0.1, 1.5, 1.5, 0.0, 0.0],
            [[0.01, 0.02]] * 6 + [[], []],
            errors=[""] * 6 + ["boom", "boom"],
            output_lens=[3] * 6 + [0, 0],
        ),
    )
    return pd, mixed


def test_run_stats_are_exact(tmp_path):
    pd, mixed = _files(tmp_path)
    one = read_runs(pd, SLO)[1.0]
    assert (one.request_throughput, one.output_throughput) == (1.0, 3.0)
    assert one.ttft_p50_ms == pytest.approx(250.0) and one.ttft_p99_ms == pytest.approx(397.0)
    assert one.itl_p50_ms == pytest.approx(15.0) and one.itl_p99_ms == pytest.approx(20.0)
    assert (one.attainment, one.goodput) == (1.0, 1.0)
    busy = read_runs(mixed, SLO)[2.0]
    # 6 of 8 succeeded (the failed ones count in the attainment, not in throughput or latencies)
    assert (busy.request_throughput, busy.output_throughput) == (1.5, 4.5)
    assert busy.ttft_p50_ms == pytest.approx(100.0) and busy.ttft_p99_ms == pytest.approx(1500.0)
    assert (busy.attainment, busy.goodput) == (0.5, 1.0)
    assert setup_goodput(read_runs(pd, SLO), SLO) == 2.0
    assert setup_goodput(read_runs(mixed, SLO), SLO) == 1.0


def test_a_request_meets_the_slo_by_its_own_p99_gap():
    # p99 of [0.01, 0.2] is 0.1981 s > 50 ms; a one-token request has no gap: its TTFT alone counts
    stats = run_stats(_line(1, 1.0, [0.1, 0.1, 0.9, 1.1], [[0.01, 0.2], [0.01, 0.04], [], []]), SLO)
    assert stats.attainment == 0.5
    assert run_stats(_line(1, 1.0, [0.1], [[0.01, 0.2]]), Slo(itl_s=0.2)).attainment == 1.0
    with pytest.raises(ValueError, match="--output-details"):
        run_stats({"request_rate": 1, "duration": 1.0, "completed": 1}, SLO)


def test_split_table_and_goals(tmp_path, capsys):
    pd, mixed = _files(tmp_path)
    assert main(["--mix", "prefill-heavy", "--setup", "1P1D", str(pd), "--setup", "2 mixed", str(mixed)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "| prefill-heavy | 1 | 1P1D | 1.00 | 3 | 250 | 397 | 15.0 | 20.0 | 100% | 1.00 |" in out
    assert "| prefill-heavy | 2 | 2 mixed | 1.50 | 4 | 100 | 1500 | 15.0 | 20.0 | 50% | 1.00 |" in out
    assert "- goodput of 1P1D: 2 req/s" in out and "- goodput of 2 mixed: 1 req/s" in out
    # only 1 req/s has equal throughput (2.0 against 1.5 req/s is not): 20 / 40 ms = 0.5x holds
    assert "- p99 ITL <= 0.5x at equal throughput: holds (1 req/s: 0.50x)" in out
    assert "- goodput >= 1.5x: holds (2.00x)" in out
    # the other way round both fail
    main(["--mix", "m", "--setup", "2 mixed", str(mixed), "--setup", "1P1D", str(pd)])
    out = capsys.readouterr().out.splitlines()
    assert "- p99 ITL <= 0.5x at equal throughput: fails (1 req/s: 2.00x)" in out
    assert "- goodput >= 1.5x: fails (0.50x)" in out


def test_conditional_goals_and_a_missing_run(tmp_path, capsys):
    pd, mixed = _files(tmp_path)
    # conditional disaggregation as good as the split at 1 req/s, worse at 2 (75% against 100%)
    cond = _write(
        tmp_path / "cond.jsonl",
        _line(1, 4.0, [0.1] * 4, [[0.01]] * 4),
        _line(2, 4.0, [0.1] * 6 + [2.0, 2.0], [[0.01]] * 8),
    )
    argv = ["--goals", "conditional", "--mix", "m", "--setup", "cond", str(cond)]
    main([*argv, "--setup", "1P1D", str(pd), "--setup", "2 mixed", str(mixed)])
    out = capsys.readouterr().out.splitlines()
    assert "- goodput >= the better pure setup's: fails (1 vs 2 req/s)" in out
    assert "- SLO attainment never worse at any rate: fails at 2" in out
    main([*argv, "--setup", "2 mixed", str(mixed)])
    out = capsys.readouterr().out.splitlines()
    assert "- goodput >= the better pure setup's: holds (1 vs 1 req/s)" in out
    assert "- SLO attainment never worse at any rate: holds" in out
    # a setup whose run never wrote its file: the table of the rest, no verdict
    assert main(["--mix", "m", "--setup", "1P1D", str(pd), "--setup", "2 mixed", str(tmp_path / "none")]) == 0
    captured = capsys.readouterr()
    assert "no file" in captured.err and "goodput >=" not in captured.out
    assert "- goodput of 1P1D: 2 req/s" in captured.out
