"""The router's own cost, measured against the stand-in engine (no model): added latency and the
streamed tokens/s one router process sustains.

    python -m pdserve.bench.bench_router                         # both phases, ~2 minutes
    python -m pdserve.bench.bench_router --phase latency --streams 1,100 --output-file r.jsonl

Processes: one stand-in engine (bench/standin_engine.py), one real router (`router --worker-addr`),
the HTTP floor (bench/http_floor.py: aiohttp streaming the same SSE with no routing), the relay
floor (bench/zmq_relay.py: HTTP in, the router's ZMQ connection to the stand-in, SSE out), and this
process as the only client (asyncio on uvloop; one aiohttp session, one DEALER socket). They share
the machine's cores, so every measurement reports the CPU each used, and what the rest of the
machine used meanwhile ("others"), in percent of one core: a client near 100% would mean the
client, not the router, is measured; large "others" means the numbers are contended.

Phase `latency` (goal: < 1 ms added at p50 with 100 concurrent streams): for each `--streams`
count, closed-loop streams of `--output-len` tokens at one step every `--step-ms`, sent straight to
the stand-in over ZMQ (prompt as token ids), through the router over HTTP (the same prompt as text,
so the router tokenizes, dispatches, detokenizes and streams SSE), to the HTTP floor and through
the relay floor (prompt as ids); in turn, `--rounds` times, samples pooled. The stand-in sends a request's first token as soon as the
request arrives (`--first-token-now`), so TTFT is transit plus queueing, without the 0..step wait
for the next step; later tokens follow the step clock. Added latency = router minus direct at p50
and p99 of TTFT and of E2E (the p99 difference is of distributions, not of paired requests);
floor minus direct is what HTTP through aiohttp costs by itself; relay minus direct is the least
any router of this design (one more process, reached over ZMQ) adds, so router minus relay is the
router's own work.

`--router-processes N` runs `router --processes N` (N processes on one port, router/supervisor.py);
the router's CPU is then the sum over its processes, in % of one core (so up to N x 100).

Phase `throughput` (goal: >= 20,000 streamed tokens/s per router process): for each `--tp-streams`
value S, S closed-loop streams through the router with a fast step; offered load = S / step tokens/s.
Delivered tokens/s are counted at the client over the measuring window; where delivered falls
below offered while the router's CPU nears 100%, the router is saturated. `--profile DIR` records
the router with py-spy (when installed) during the highest load and prints its hottest frames.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from contextlib import suppress
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from pdserve.bench.bench_procs import (
    CpuWindow,
    start_http_floor,
    start_router,
    start_standin,
    start_zmq_relay,
)
from pdserve.bench.router_load import DirectClient, HttpClient, LoadResult, TokenMeter, run_streams

PROMPT_SEED_TEXT = (
    "You are a helpful assistant. Summarize the following passage about the history of the printing "
    "press in Europe and its influence on literacy, science and religion in a few sentences. "
)
TOKEN_TEXT = " The quick brown fox jumps over the lazy dog while the band plays a slow song."


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000.0 if values else float("nan")


def summarize(res: LoadResult) -> dict[str, Any]:
    return {
        "completed": res.completed,
        "failed": res.failed,
        "first_error": res.first_error,
        "ttft_p50_ms": pct(res.ttfts, 50),
        "ttft_p99_ms": pct(res.ttfts, 99),
        "e2e_p50_ms": pct(res.e2es, 50),
        "e2e_p99_ms": pct(res.e2es, 99),
    }


async def latency_phase(
    ns: argparse.Namespace, prompt: str, prompt_ids: list[int], token_ids: list[int], logs: Path
) -> list[dict[str, Any]]:
    """For each `--streams` count: the direct, router, HTTP-floor and relay paths, `--rounds` times in
    turn (samples pooled per path). One stand-in, router, floor and relay serve every count."""
    standin, addr = start_standin(
        ns.tokenizer_dir, ns.model, ns.step_ms, token_ids, first_now=True, logs=logs
    )
    router, url = start_router(addr, ns.router_arg, logs)
    floor, floor_url = start_http_floor(ns.step_ms, logs)
    relay, relay_url = start_zmq_relay(addr, logs)
    results = []
    try:
        meter = TokenMeter()
        direct = DirectClient(addr, meter)
        http = HttpClient(url, meter)
        http_floor = HttpClient(floor_url, meter)
        http_relay = HttpClient(relay_url, meter)
        paths = {
            "direct": (lambda: direct.generate(prompt_ids, ns.output_len), {"standin": standin}),
            "router": (lambda: http.generate(prompt, ns.output_len), {"server": router, "standin": standin}),
            "floor": (lambda: http_floor.generate(prompt, ns.output_len), {"server": floor}),
            "relay": (
                lambda: http_relay.generate(prompt_ids, ns.output_len),
                {"server": relay, "standin": standin},
            ),
        }
        for fn, _ in paths.values():
            await run_streams(fn, 4, 1.0, 0.0, ns.output_len, ns.step_ms / 1000.0, 0.0)  # warm every path
        for streams in ns.streams:
            out = await measure_paths(ns, paths, streams)
            out["prompt_tokens"] = len(prompt_ids)
            print(json.dumps(out), flush=True)
            results.append(out)
        for client in (direct, http, http_floor, http_relay):
            await client.close()
    finally:
        for proc in (relay, floor, router, standin):
            proc.stop()
    return results


async def measure_paths(ns: argparse.Namespace, paths: dict[str, Any], streams: int) -> dict[str, Any]:
    think = ns.step_ms / 1000.0
    stagger = ns.output_len * ns.step_ms / 1000.0
    pooled = {name: LoadResult() for name in paths}
    cpus: dict[str, list[dict[str, float]]] = {name: [] for name in paths}
    for round_ in range(ns.rounds):
        for name, (fn, procs) in paths.items():
            with CpuWindow(procs) as cpu:
                res = await run_streams(
                    fn, streams, ns.duration, ns.warmup, ns.output_len, think, stagger, seed=round_
                )
            pooled[name].merge(res)
            cpus[name].append(cpu.cpu)
    out: dict[str, Any] = {
        "streams": streams,
        "step_ms": ns.step_ms,
        "output_len": ns.output_len,
        "duration_s": ns.duration,
        "rounds": ns.rounds,
    }
    for name in paths:
        out[name] = summarize(pooled[name]) | {"cpu_pct": mean_dicts(cpus[name])}
    for key in ("ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms", "e2e_p99_ms"):
        out[f"added_{key}"] = out["router"][key] - out["direct"][key]
        out[f"floor_added_{key}"] = out["floor"][key] - out["direct"][key]
        out[f"relay_added_{key}"] = out["relay"][key] - out["direct"][key]
    return out


def mean_dicts(dicts: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(d.get(k, 0.0) for d in dicts) / len(dicts) for k in dicts[0]} if dicts else {}


def start_profile(
    pid: int, seconds: float, path: Path, subprocesses: bool = False
) -> subprocess.Popen | None:
    exe = shutil.which("py-spy")
    if exe is None:
        print("py-spy is not installed: no profile (pip install py-spy)", file=sys.stderr)
        return None
    cmd = [
        exe,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(int(seconds)),
        "--rate",
        "100",
        "--format",
        "raw",
        "--output",
        str(path),
        "--nonblocking",
        *(["--subprocesses"] if subprocesses else []),  # `--processes N`: the parent only supervises
    ]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def hot_frames(raw_path: Path, top: int = 20) -> list[tuple[str, float]]:
    """(frame, % of samples) of the frames where the router spent its time (self time), hottest first."""
    own: Counter[str] = Counter()
    total = 0
    for line in raw_path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        total += int(count)
        own[stack.split(";")[-1]] += int(count)
    return [(frame, 100.0 * n / total) for frame, n in own.most_common(top)] if total else []


async def throughput_phase(
    ns: argparse.Namespace, prompt: str, token_ids: list[int], logs: Path
) -> dict[str, Any]:
    standin, addr = start_standin(
        ns.tokenizer_dir, ns.model, ns.tp_step_ms, token_ids, first_now=False, logs=logs
    )
    router, url = start_router(addr, ns.router_arg, logs)
    points = []
    out: dict[str, Any] = {"step_ms": ns.tp_step_ms, "output_len": ns.tp_output_len, "window_s": ns.tp_window}
    try:
        meter = TokenMeter()
        http = HttpClient(url, meter)
        think = ns.tp_step_ms / 1000.0
        stagger = ns.tp_output_len * ns.tp_step_ms / 1000.0
        for i, streams in enumerate(ns.tp_streams):
            profile = None
            if ns.profile and i == len(ns.tp_streams) - 1:
                Path(ns.profile).mkdir(parents=True, exist_ok=True)
                raw = Path(ns.profile) / f"router-{streams}-streams.txt"
                profile = start_profile(router.popen.pid, ns.tp_window, raw, ns.router_processes > 1)
            task = asyncio.ensure_future(
                run_streams(
                    lambda: http.generate(prompt, ns.tp_output_len),
                    streams,
                    stagger + ns.tp_window + 1.0,
                    0.0,
                    ns.tp_output_len,
                    think,
                    stagger,
                )
            )
            await asyncio.sleep(stagger + 0.5)  # ramp: every stream running
            with CpuWindow({"server": router, "standin": standin}) as cpu:
                t0, n0 = time.perf_counter(), meter.tokens
                await asyncio.sleep(ns.tp_window)
                delivered = (meter.tokens - n0) / (time.perf_counter() - t0)
            res = await task
            point = {
                "streams": streams,
                "offered_tok_s": streams * 1000.0 / ns.tp_step_ms,
                "delivered_tok_s": delivered,
                "cpu_pct": cpu.cpu,
            } | summarize(res)
            points.append(point)
            print(json.dumps(point), flush=True)
            if profile is not None:
                profile.wait(60)
                if raw.exists():
                    out["profile_raw"] = str(raw)
                    out["profile_hot_frames"] = hot_frames(raw)
        await http.close()
    finally:
        router.stop()
        standin.stop()
    out["points"] = points
    out["max_delivered_tok_s"] = max(p["delivered_tok_s"] for p in points)
    return out


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="The router's added latency and streamed tokens/s vs a stand-in engine."
    )
    p.add_argument("--phase", choices=("latency", "throughput", "both"), default="both")
    p.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="reported model")
    p.add_argument("--tokenizer-dir", default=None, help="default: the model's resolved directory")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--streams", type=int_list, default=[1, 100], help="latency: stream counts, e.g. 1,100")
    p.add_argument("--step-ms", type=float, default=20.0)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--duration", type=float, default=25.0, help="seconds of load per path")
    p.add_argument("--rounds", type=int, default=2, help="latency: each path this many times, in turn")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds of each path's load not sampled")
    p.add_argument("--tp-streams", type=int_list, default=[100, 200, 300, 400])
    p.add_argument("--tp-step-ms", type=float, default=10.0)
    p.add_argument("--tp-output-len", type=int, default=64)
    p.add_argument("--tp-window", type=float, default=8.0)
    p.add_argument("--profile", default=None, help="directory for a py-spy profile of the router")
    p.add_argument(
        "--router-arg",
        action="append",
        default=None,
        help="router flag (repeatable; default --log-level warning)",
    )
    p.add_argument(
        "--router-processes",
        type=int,
        default=1,
        help="run the router with --processes N (N > 1: its CPU is the sum over its processes)",
    )
    p.add_argument("--output-file", default=None, help="append the results as one JSON line")
    p.add_argument("--logs", default="/tmp/pdserve-bench-router", help="directory for process logs")
    return p


def _prompt(tokenizer, n: int) -> tuple[str, list[int]]:
    ids = tokenizer.encode(PROMPT_SEED_TEXT * (n // 16 + 1), add_special_tokens=False)[:n]
    text = tokenizer.decode(ids)
    return text, tokenizer.encode(text)


async def run(ns: argparse.Namespace) -> dict[str, Any]:
    from pdserve.shared.models.resolver import resolve_model
    from pdserve.shared.tokenizer import get_tokenizer

    ns.router_arg = ["--log-level=warning"] if ns.router_arg is None else ns.router_arg
    if ns.router_processes > 1:
        ns.router_arg = [*ns.router_arg, f"--processes={ns.router_processes}"]
    ns.tokenizer_dir = ns.tokenizer_dir or str(resolve_model(ns.model).local_dir)
    tokenizer = get_tokenizer(ns.tokenizer_dir)
    prompt, prompt_ids = _prompt(tokenizer, ns.prompt_tokens)
    token_ids = tokenizer.encode(TOKEN_TEXT, add_special_tokens=False)
    logs = Path(ns.logs)
    logs.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "cpus": os.cpu_count(),
        "router_processes": ns.router_processes,
    }
    if ns.phase in ("latency", "both"):
        result["latency"] = await latency_phase(ns, prompt, prompt_ids, token_ids, logs)
    if ns.phase in ("throughput", "both"):
        result["throughput"] = await throughput_phase(ns, prompt, token_ids, logs)
    return result


def _cpu(c: dict[str, float]) -> str:
    return "/".join(f"{c[k]:.0f}" if k in c else "-" for k in ("server", "standin", "client", "others"))


def _failures(r: dict[str, Any]) -> str:
    return f"  FAILED {r['failed']}: {r['first_error']}" if r["failed"] else ""


def report(result: dict[str, Any]) -> str:
    """Plain-text tables of the results. cpu% is server/stand-in/client/others in % of one core (the
    server is the router, or the floor's own process on the floor row)."""
    lines = []
    for lat in result.get("latency", []):
        lines.append(
            f"latency: {lat['streams']} streams x {lat['output_len']} tokens, step {lat['step_ms']} ms"
        )
        head = ("", "TTFT p50", "TTFT p99", "E2E p50", "E2E p99", "n", "cpu%")
        lines.append("{:11} {:>9} {:>9} {:>9} {:>9} {:>6}  {}".format(*head))
        for name in ("direct", "router", "floor", "relay", "added", "floor_added", "relay_added"):
            if name.endswith("added"):
                r = {k[len(name) + 1 :]: v for k, v in lat.items() if k.startswith(name + "_")}
            else:
                r = lat[name]
            values = [r[k] for k in ("ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms", "e2e_p99_ms")]
            row = f"{name:11} " + " ".join(f"{v:9.2f}" for v in values)
            if not name.endswith("added"):
                row += f" {r['completed']:6d}  {_cpu(r['cpu_pct'])}{_failures(r)}"
            lines.append(row)
    tp = result.get("throughput")
    if tp:
        lines.append(f"throughput: step {tp['step_ms']} ms, {tp['output_len']} tokens/request")
        lines.append(f"{'streams':>8} {'offered':>9} {'delivered':>9}  {'cpu%':<12} TTFT p50/p99 ms")
        for p in tp["points"]:
            lines.append(
                f"{p['streams']:8d} {p['offered_tok_s']:9.0f} {p['delivered_tok_s']:9.0f}  "
                f"{_cpu(p['cpu_pct']):<12} {p['ttft_p50_ms']:.1f}/{p['ttft_p99_ms']:.1f}{_failures(p)}"
            )
        for frame, share in tp.get("profile_hot_frames", []):
            lines.append(f"  {share:5.1f}%  {frame}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import uvloop

    ns = build_parser().parse_args(argv)
    result = uvloop.run(run(ns))
    print(report(result))
    if ns.output_file:
        with open(ns.output_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(result) + "\n")
    paths = ("direct", "router", "floor", "relay")
    failed = sum(lat[k]["failed"] for lat in result.get("latency", []) for k in paths)
    failed += sum(p["failed"] for p in result.get("throughput", {}).get("points", []))
    return 1 if failed else 0


if __name__ == "__main__":
    with suppress(KeyboardInterrupt):
        sys.exit(main())
