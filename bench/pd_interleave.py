"""How two workers' GPU work interleaves on one GPU, from their `/start_profile` traces.

    python -m pdserve.bench.pd_interleave /tmp/traces/<id>-prefill-*.trace.json.gz /tmp/traces/<id>-decode-*.trace.json.gz

Reads the Chrome traces the workers wrote for one profile id (router/native/profile.py), takes
their GPU activity (kernels, copies, memsets) on one clock, and over the window both traces cover
reports:
- how the GPU's time splits: one worker's kernels only, the other's only, both in flight, idle.
  Without MPS two processes' kernels do not run at the same moment: "both in flight" is time a
  kernel of one waited, started, behind the other's (time-slicing), which shows as longer kernels;
- per worker, how much longer its kernels ran while the other's were in flight than the same
  kernels' median alone (grouped by name, largest extra first): the price one worker pays for
  sharing the GPU, in ms per second of trace and in its share of that worker's GPU time.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
TRACE_NAME = re.compile(r"^[0-9._]+-(?P<label>.+?)\.trace\.json(\.gz)?$")


@dataclass(frozen=True, order=True)
class Activity:
    start: float  # µs on the host's clock
    end: float
    name: str


def worker_label(path: Path) -> str:
    match = TRACE_NAME.match(path.name)
    return match.group("label") if match else path.name


def load_gpu_activity(path: Path) -> list[Activity]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    # Newer kineto writes ts relative to baseTimeNanoseconds (for float precision): put every
    # trace back on the host clock so that two processes' traces line up.
    base_us = trace.get("baseTimeNanoseconds", 0) / 1000.0
    return sorted(
        Activity(base_us + ev["ts"], base_us + ev["ts"] + ev.get("dur", 0), ev.get("name", "?"))
        for ev in trace.get("traceEvents", [])
        if ev.get("ph") == "X" and ev.get("cat") in GPU_CATEGORIES
    )


def merge(activities: list[Activity], lo: float, hi: float) -> list[tuple[float, float]]:
    """The union of the activities, clipped to [lo, hi]."""
    out: list[tuple[float, float]] = []
    for a in activities:
        start, end = max(a.start, lo), min(a.end, hi)
        if end <= start:
            continue
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def length(intervals: list[tuple[float, float]]) -> float:
    return sum(end - start for start, end in intervals)


def intersect(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def overlaps(activity: Activity, merged: list[tuple[float, float]], starts: list[float]) -> bool:
    """Whether the activity meets any of the merged (sorted, disjoint) intervals; starts = their starts."""
    i = bisect.bisect_left(starts, activity.end) - 1  # the last interval starting before it ends
    return i >= 0 and merged[i][1] > activity.start


def slowdown(mine: list[Activity], other: list[tuple[float, float]], lo: float, hi: float) -> dict:
    """Extra µs of `mine`'s kernels that ran while `other` had work in flight, against each
    kernel name's median duration when alone."""
    alone: dict[str, list[float]] = defaultdict(list)
    shared: dict[str, list[float]] = defaultdict(list)
    starts = [start for start, _ in other]
    for a in mine:
        if lo <= a.start and a.end <= hi:
            (shared if overlaps(a, other, starts) else alone)[a.name].append(a.end - a.start)
    extra: dict[str, float] = {}
    for name, durations in shared.items():
        if alone.get(name):
            typical = statistics.median(alone[name])
            extra[name] = sum(d - typical for d in durations)
    gpu_us = sum(sum(v) for v in alone.values()) + sum(sum(v) for v in shared.values())
    return {
        "kernels": sum(len(v) for v in alone.values()) + sum(len(v) for v in shared.values()),
        "kernels_beside_other": sum(len(v) for v in shared.values()),
        "gpu_ms": gpu_us / 1000.0,
        "extra_ms": sum(extra.values()) / 1000.0,
        "top_extra": sorted(
            ((name, e / 1000.0, len(shared[name])) for name, e in extra.items()), key=lambda t: -t[1]
        )[:8],
    }


def analyse(paths: list[Path]) -> dict:
    if len(paths) != 2:
        raise SystemExit("give the two workers' traces of one profile")
    labels = [worker_label(p) for p in paths]
    acts = [load_gpu_activity(p) for p in paths]
    if not all(acts):
        raise SystemExit("a trace holds no GPU activity (was it taken on a CUDA worker with GPU activities?)")
    lo = max(a[0].start for a in acts)
    hi = min(max(x.end for x in a) for a in acts)
    if hi <= lo:
        raise SystemExit("the two traces do not cover a common window")
    merged = [merge(a, lo, hi) for a in acts]
    both = length(intersect(merged[0], merged[1]))
    busy = [length(m) for m in merged]
    window = hi - lo
    return {
        "window_ms": window / 1000.0,
        "workers": labels,
        "share": {
            f"{labels[0]} only": (busy[0] - both) / window,
            f"{labels[1]} only": (busy[1] - both) / window,
            "both in flight": both / window,
            "idle": (window - busy[0] - busy[1] + both) / window,
        },
        "slowdown": {
            labels[0]: slowdown(acts[0], merged[1], lo, hi),
            labels[1]: slowdown(acts[1], merged[0], lo, hi),
        },
    }


def report(result: dict) -> str:
    window = result["window_ms"]
    lines = [f"common window: {window:.1f} ms", "", "| GPU time | share |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.1%} |" for k, v in result["share"].items()]
    lines += [
        "",
        "| worker | kernels | beside the other's | GPU ms | extra ms beside the other's | extra / GPU time | extra ms per s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, s in result["slowdown"].items():
        share = s["extra_ms"] / s["gpu_ms"] if s["gpu_ms"] else 0.0
        lines.append(
            f"| {label} | {s['kernels']} | {s['kernels_beside_other']} | {s['gpu_ms']:.1f} | "
            f"{s['extra_ms']:.1f} | {share:.1%} | {s['extra_ms'] / window * 1000:.1f} |"
        )
    for label, s in result["slowdown"].items():
        lines += ["", f"{label}: kernels that ran longest beside the other's (extra ms, count)"]
        lines += [f"  {extra:8.2f} ms  x{count:<5d} {name[:100]}" for name, extra, count in s["top_extra"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("traces", nargs=2, type=Path)
    p.add_argument("--json-out", default=None)
    ns = p.parse_args(argv)
    result = analyse(ns.traces)
    print(report(result))
    if ns.json_out:
        Path(ns.json_out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
