"""Where disaggregation wins: serving setups compared at each request rate, from bench_serving's
output files (one JSON line per rate, written with `--output-details`: SGLang's bench_serving.py
and pdserve's write the same `duration`, `request_rate`, `ttfts`, `itls`, `output_lens`, `errors`).

    python -m pdserve.bench.goodput --mix prefill-heavy --setup 1P1D pd.jsonl --setup "2 mixed" mixed.jsonl
    python -m pdserve.bench.goodput --goals conditional --mix short+long \
        --setup "1P1D threshold 512" t512.jsonl --setup 1P1D pd.jsonl --setup "2 mixed" mixed.jsonl

Definitions (latencies from the per-request lists, seconds in the files, ms in the table):
- a request meets the SLO when it succeeded (no error), its TTFT <= --ttft-slo (1 s) and the p99 of
  its own inter-token gaps <= --itl-slo (50 ms) (a request of one token has no gap: TTFT alone);
- SLO attainment of a run = requests meeting the SLO / requests sent; run goodput (req/s) = requests
  meeting the SLO / the run's duration;
- goodput of a setup (DistServe's): the highest request rate swept at which at least --attainment
  (90%) of the requests meet the SLO; 0 when no rate does;
- throughput = successful requests (and their output tokens) / duration; TTFT percentiles over the
  successful requests, ITL percentiles over every gap of them pooled (numpy's, as bench_serving's).

Goals (`--goals split`, the first setup against the second):
- p99 ITL <= 0.5x at equal throughput: at every rate where the two request throughputs are within
  10% of each other (at least one such rate);
- goodput >= 1.5x.
`--goals conditional` (the first setup is the router's conditional disaggregation): never worse than
the better of the others: its goodput >= theirs, and at every rate its attainment >= the best of
theirs minus 0.05 (the noise of one short run).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdserve.bench.serving_metrics import percentile

EQUAL_THROUGHPUT = 0.10  # two throughputs within 10% of the larger count as equal
HEADER = (
    "| mix | req/s sent | setup | req/s | out tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms"
    " | SLO met | goodput req/s |"
)
ITL_GOAL, GOODPUT_GOAL, ATTAINMENT_SLACK = 0.5, 1.5, 0.05


@dataclass(frozen=True)
class Slo:
    ttft_s: float = 1.0
    itl_s: float = 0.050
    attainment: float = 0.90


@dataclass(frozen=True)
class RunStats:
    """One bench_serving run (one request rate) of one setup."""

    rate: float
    request_throughput: float
    output_throughput: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    attainment: float
    goodput: float  # requests meeting the SLO per second


def meets_slo(ttft: float, itl: list[float], error: str, slo: Slo) -> bool:
    if error:
        return False
    return ttft <= slo.ttft_s and (not itl or percentile(itl, 99) <= slo.itl_s)


def run_stats(line: dict[str, Any], slo: Slo) -> RunStats:
    """The stats of one output line (it must hold the --output-details lists)."""
    missing = [k for k in ("ttfts", "itls", "errors", "output_lens") if k not in line]
    if missing:
        raise ValueError(f"the line lacks {missing}: run bench_serving with --output-details")
    errors = [e or "" for e in line["errors"]]
    ok = [i for i, e in enumerate(errors) if not e]
    duration = float(line["duration"])
    ttfts = [line["ttfts"][i] for i in ok]
    gaps = [g for i in ok for g in line["itls"][i]]
    good = sum(meets_slo(t, itl, e, slo) for t, itl, e in zip(line["ttfts"], line["itls"], errors))
    return RunStats(
        rate=float(line["request_rate"]),
        request_throughput=len(ok) / duration,
        output_throughput=sum(line["output_lens"][i] for i in ok) / duration,
        ttft_p50_ms=percentile(ttfts, 50) * 1000,
        ttft_p99_ms=percentile(ttfts, 99) * 1000,
        itl_p50_ms=percentile(gaps, 50) * 1000,
        itl_p99_ms=percentile(gaps, 99) * 1000,
        attainment=good / len(errors) if errors else 0.0,
        goodput=good / duration,
    )


def read_runs(path: Path, slo: Slo) -> dict[float, RunStats]:
    """Every line of a file, by request rate (a later line of the same rate replaces an earlier one)."""
    runs = {}
    for text in path.read_text().splitlines():
        if text.strip():
            stats = run_stats(json.loads(text), slo)
            runs[stats.rate] = stats
    return runs


def setup_goodput(runs: dict[float, RunStats], slo: Slo) -> float:
    """DistServe's goodput: the highest rate whose attainment reaches the target (0: none)."""
    return max(
        (r for r, s in runs.items() if s.attainment >= slo.attainment and math.isfinite(r)), default=0.0
    )


def ratio(a: float, b: float) -> float:
    if b == 0:
        return math.inf if a > 0 else math.nan
    return a / b


def split_goals(first: dict[float, RunStats], second: dict[float, RunStats], slo: Slo) -> list[str]:
    lines = []
    equal = [
        r
        for r in sorted(first.keys() & second.keys())
        if abs(first[r].request_throughput - second[r].request_throughput)
        <= EQUAL_THROUGHPUT * max(first[r].request_throughput, second[r].request_throughput)
    ]
    itl = {r: ratio(first[r].itl_p99_ms, second[r].itl_p99_ms) for r in equal}
    held = bool(equal) and all(v <= ITL_GOAL for v in itl.values())
    detail = ", ".join(f"{r:g} req/s: {v:.2f}x" for r, v in itl.items()) or "no rate of equal throughput"
    lines.append(f"- p99 ITL <= {ITL_GOAL}x at equal throughput: {'holds' if held else 'fails'} ({detail})")
    g = ratio(setup_goodput(first, slo), setup_goodput(second, slo))
    lines.append(f"- goodput >= {GOODPUT_GOAL}x: {'holds' if g >= GOODPUT_GOAL else 'fails'} ({g:.2f}x)")
    return lines


def conditional_goals(
    first: dict[float, RunStats], others: list[dict[float, RunStats]], slo: Slo
) -> list[str]:
    best = max(setup_goodput(o, slo) for o in others)
    mine = setup_goodput(first, slo)
    lines = [
        f"- goodput >= the better pure setup's: {'holds' if mine >= best else 'fails'} ({mine:g} vs {best:g} req/s)"
    ]
    worse = []
    for r in sorted(first):
        theirs = [o[r].attainment for o in others if r in o]
        if theirs and first[r].attainment < max(theirs) - ATTAINMENT_SLACK:
            worse.append(r)
    rates = ", ".join(f"{r:g}" for r in worse)
    lines.append(f"- SLO attainment never worse at any rate: {'fails at ' + rates if worse else 'holds'}")
    return lines


def table(mix: str, setups: list[tuple[str, dict[float, RunStats]]], slo: Slo) -> list[str]:
    lines = [
        HEADER,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for rate in sorted({r for _, runs in setups for r in runs}):
        for name, runs in setups:
            if rate in runs:
                s = runs[rate]
                lines.append(
                    f"| {mix} | {rate:g} | {name} | {s.request_throughput:.2f} | {s.output_throughput:.0f} "
                    f"| {s.ttft_p50_ms:.0f} | {s.ttft_p99_ms:.0f} | {s.itl_p50_ms:.1f} | {s.itl_p99_ms:.1f} "
                    f"| {s.attainment:.0%} | {s.goodput:.2f} |"
                )
    lines.append("")
    for name, runs in setups:
        lines.append(f"- goodput of {name}: {setup_goodput(runs, slo):g} req/s")
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mix", required=True, help="the workload's name in the table")
    p.add_argument("--setup", nargs=2, action="append", metavar=("NAME", "FILE"), required=True)
    p.add_argument("--goals", choices=("split", "conditional", "none"), default="split")
    p.add_argument("--ttft-slo", type=float, default=Slo.ttft_s, help="seconds")
    p.add_argument("--itl-slo", type=float, default=Slo.itl_s, help="seconds, per request p99")
    p.add_argument("--attainment", type=float, default=Slo.attainment)
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    slo = Slo(ns.ttft_slo, ns.itl_slo, ns.attainment)
    setups = []
    for name, file in ns.setup:
        path = Path(file)
        if not path.is_file():
            print(f"goodput: {name}: no file {file} (that run did not finish)", file=sys.stderr)
            continue
        setups.append((name, read_runs(path, slo)))
    lines = table(ns.mix, setups, slo)
    if len(setups) < 2 or len(setups) != len(ns.setup):
        ns.goals = "none"
    if ns.goals == "split":
        lines += split_goals(setups[0][1], setups[1][1], slo)
    elif ns.goals == "conditional":
        lines += conditional_goals(setups[0][1], [runs for _, runs in setups[1:]], slo)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
