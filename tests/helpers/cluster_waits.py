"""Waiting on a router's view of its cluster, as end-to-end tests do between steps."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import requests


def wait_until(cond: Callable[[], bool], timeout_s: float = 20.0, what: str = "a condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def live_workers(url: str, role: str = "mixed") -> list[str]:
    """The workers of `role` the router lists as live."""
    return requests.get(url + "/get_server_info", timeout=10).json()["live_workers"][role]


def all_pages_back(url: str, live_only: bool = False) -> bool:
    """Every worker the router knows (`live_only`: that still answers) is idle, with every page
    free or cached."""
    rows = requests.get(url + "/get_load", timeout=10).json()
    if live_only:
        rows = [r for r in rows if r["responding"]]
    return all(
        r["num_reqs"] == 0
        and r["router_inflight"] == 0
        and r["num_free_pages"] + r["num_evictable_pages"] == r["num_total_pages"]
        for r in rows
    )


def router_metric(url: str, name: str) -> float:
    """The sum of a metric's samples in the router's /metrics (all label sets)."""
    lines = requests.get(url + "/metrics", timeout=10).text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith((name + " ", name + "{")))


def run_in_thread(call: Callable[[], Any], results: dict, key: Any) -> threading.Thread:
    """Starts call() in a daemon thread; results[key] gets what it returned, or what it raised."""

    def run() -> None:
        try:
            results[key] = call()
        except BaseException as exc:  # noqa: BLE001 (the test reports it)
            results[key] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread
