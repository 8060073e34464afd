"""Fault drill: a steady load through `serve --prefill 2 --decode 2` while a random worker is
SIGKILLed every few seconds; reports what the clients saw and what the cluster leaked.

    python -m pdserve.bench.fault_drill --duration 180 --kill-every 20 --concurrency 8

What it does:
1. starts `serve` (its own process group) with the given workers and model, waits for its
   "pdserve serving" line;
2. `--concurrency` clients stream greedy /generate requests back to back: prompts drawn from a
   fixed pool (short ones prefill at the decode worker, long ones go through a pair), so every
   answer to one prompt must be the same text;
3. every `--kill-every` seconds a random prefill or decode worker gets SIGKILL; detection is the
   time until the router lists one live worker fewer of that role, recovery the time until `serve`
   restarted it and the router lists it again;
4. after `--duration`, the load stops, the workers go idle, and pages not free or cached on any
   worker are counted as leaked.
Printed last: requests sent, completed, failed, 5xx, retried and migrated (router counters),
p50/p99 TTFT of all requests and of those in flight at a kill, detection and recovery per kill,
leaked pages, and outputs that differ from the first answer to the same prompt.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from pdserve.bench.bench_procs import free_port


@dataclass
class Outcome:
    prompt: int
    started: float
    ttft_s: float | None = None
    ended: float = 0.0
    status: int = 0
    finish: str = ""
    output_ids: list[int] = field(default_factory=list)
    error: str = ""


@dataclass
class Kill:
    role: str
    pid: int
    at: float
    detected_s: float | None = None
    recovered_s: float | None = None


def worker_pids(serve_pid: int) -> dict[int, str]:
    """pid -> role of the `worker` processes under serve (from /proc)."""
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if ppid == serve_pid and b"pdserve.shared.launch.worker_cli" in cmd and b"--role" in cmd:
            found[int(entry)] = cmd[cmd.index(b"--role") + 1].decode()
    return found


async def live_count(session: aiohttp.ClientSession, url: str, role: str) -> int:
    async with session.get(url + "/get_server_info") as resp:
        return len((await resp.json())["live_workers"].get(role, []))


async def metric(session: aiohttp.ClientSession, url: str, name: str) -> float:
    async with session.get(url + "/metrics") as resp:
        text = await resp.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


async def client(
    session, url: str, prompts: list[list[int]], params: dict, stop: asyncio.Event, out: list
) -> None:
    rng = random.Random(len(out))
    while not stop.is_set():
        i = rng.randrange(len(prompts))
        rec = Outcome(prompt=i, started=time.monotonic())
        out.append(rec)
        body = {"input_ids": prompts[i], "sampling_params": params, "stream": True}
        try:
            async with session.post(url + "/generate", json=body) as resp:
                rec.status = resp.status
                if resp.status != 200:
                    rec.error = (await resp.text())[:200]
                async for raw in resp.content:
                    if not raw.startswith(b"data: {"):
                        continue
                    event = json.loads(raw[6:])
                    if rec.ttft_s is None and event.get("output_ids"):
                        rec.ttft_s = time.monotonic() - rec.started
                    rec.output_ids = event.get("output_ids", rec.output_ids)
                    rec.finish = (event["meta_info"].get("finish_reason") or {}).get("type", "")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            rec.error = f"{type(exc).__name__}: {exc}"
        rec.ended = time.monotonic()


async def killer(session, url: str, serve_pid: int, every_s: float, stop: asyncio.Event, kills: list) -> None:
    rng = random.Random(1)
    while not stop.is_set():
        await asyncio.sleep(every_s)
        if stop.is_set():
            return
        pids = worker_pids(serve_pid)
        if not pids:
            continue
        pid = rng.choice(sorted(pids))
        role = pids[pid]
        before = await live_count(session, url, role)
        kill = Kill(role, pid, time.monotonic())
        kills.append(kill)
        os.kill(pid, signal.SIGKILL)
        while time.monotonic() - kill.at < 30 and kill.detected_s is None:
            if await live_count(session, url, role) < before:
                kill.detected_s = time.monotonic() - kill.at
            await asyncio.sleep(0.05)
        while time.monotonic() - kill.at < 120 and kill.recovered_s is None:
            if await live_count(session, url, role) >= before:
                kill.recovered_s = time.monotonic() - kill.at
            await asyncio.sleep(0.2)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


async def drill(ns: argparse.Namespace, url: str, serve_pid: int) -> dict:
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 2000) for _ in range(rng.choice((12, 200)))] for _ in range(ns.prompts)]
    params = {"temperature": 0.0, "max_new_tokens": ns.max_new_tokens, "ignore_eos": True}
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        stop = asyncio.Event()
        outcomes: list[Outcome] = []
        kills: list[Kill] = []
        tasks = [
            asyncio.create_task(client(session, url, prompts, params, stop, outcomes))
            for _ in range(ns.concurrency)
        ]
        tasks.append(asyncio.create_task(killer(session, url, serve_pid, ns.kill_every, stop, kills)))
        await asyncio.sleep(ns.duration)
        stop.set()
        await asyncio.gather(*tasks)
        deadline = time.monotonic() + 60
        leaked = -1
        while time.monotonic() < deadline:
            async with session.get(url + "/get_load") as resp:
                rows = await resp.json()
            if all(r["num_reqs"] == 0 for r in rows if r["num_reqs"] is not None):
                leaked = sum(
                    r["num_total_pages"] - r["num_free_pages"] - r["num_evictable_pages"]
                    for r in rows
                    if r["num_total_pages"] is not None
                )
                if leaked == 0:
                    break
            await asyncio.sleep(0.5)
        retries = await metric(session, url, "pdserve_router_retries_total")
        migrations = await metric(session, url, "pdserve_router_migrations_total")
    first: dict[int, list[int]] = {}
    differ = 0
    for rec in outcomes:
        if rec.finish == "length" and first.setdefault(rec.prompt, rec.output_ids) != rec.output_ids:
            differ += 1
    windows = [(k.at, k.at + (k.detected_s or 5.0) + 1.0) for k in kills]
    affected = [r for r in outcomes if any(r.started < end and r.ended > at for at, end in windows)]
    ttfts = [r.ttft_s for r in outcomes if r.ttft_s is not None]
    affected_ttfts = [r.ttft_s for r in affected if r.ttft_s is not None]
    failed = [r for r in outcomes if r.finish != "length"]
    return {
        "sent": len(outcomes),
        "completed": len(outcomes) - len(failed),
        "failed": len(failed),
        "http_5xx": sum(r.status >= 500 for r in outcomes),
        "failures": [f"{r.status} {r.finish} {r.error}" for r in failed][:5],
        "retried": retries,
        "migrated": migrations,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "in_flight_at_a_kill": len(affected),
        "their_ttft_p99_s": percentile(affected_ttfts, 99),
        "kills": [vars(k) for k in kills],
        "leaked_pages": leaked,
        "outputs_differing": differ,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fault_drill", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=180.0, help="seconds of load")
    p.add_argument("--kill-every", type=float, default=20.0, help="seconds between kills")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--prompts", type=int, default=8, help="size of the prompt pool")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--prefill", type=int, default=2)
    p.add_argument("--decode", type=int, default=2)
    p.add_argument("--out", default=None, help="write the results as JSON here too")
    p.add_argument("serve_args", nargs=argparse.REMAINDER, help="after --: more flags for serve")
    ns = p.parse_args(argv)
    port = free_port()
    extra = [a for a in ns.serve_args if a != "--"]
    cmd = [
        sys.executable, "-m", "pdserve.shared.launch.serve.cli", "--port", str(port),
        "--prefill", str(ns.prefill), "--decode", str(ns.decode), "--log-level", "warning", *extra,
    ]  # fmt: skip
    log = open("fault_drill_serve.log", "w")  # noqa: SIM115 (closed below)
    serve = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
    try:
        assert serve.stdout is not None
        line = serve.stdout.readline()
        if not line.startswith("pdserve serving"):
            print(f"serve did not start (see fault_drill_serve.log): {line!r}", file=sys.stderr)
            return 1
        result = asyncio.run(drill(ns, f"http://127.0.0.1:{port}", serve.pid))
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
        log.close()
    if ns.out:
        Path(ns.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "kills"}, indent=2))
    print("| kill | role | detected (s) | back in the router (s) |")
    print("| ---: | --- | ---: | ---: |")
    for i, k in enumerate(result["kills"], 1):
        print(f"| {i} | {k['role']} | {k['detected_s']} | {k['recovered_s']} |")
    return 0 if result["failed"] == 0 and result["leaked_pages"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
