"""`serve --prefill 1 --decode 1 --device cuda:0,cuda:1` (needs 2 GPUs): the prefill worker on GPU 0,
the decode worker on GPU 1, KV pages moved by nccl or cuda_ipc (peer access). For each backend, one
serve:
1. the workers run where the plan put them, and greedy /generate equals the mixed engine's tokens;
2. SIGKILL of the prefill worker while it holds requests: every request still gets the right answer
   (the router retries them; serve restarts the worker), and the decode worker is idle with every
   page free or cached within 5 s of the last answer;
3. SIGKILL of the decode worker while it streams requests: the prefill worker is idle with every
   page free or cached within 5 s.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import requests
import torch

from tests.helpers.cluster_waits import live_workers, run_in_thread, wait_until
from tests.helpers.pd_serve import generate, mixed_greedy, prompt, start_pd_serve, worker_process

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs: P on cuda:0, D on cuda:1"),
]

LONG = {"temperature": 0.0, "max_new_tokens": 64, "ignore_eos": True}


def _rows(base: str, role: str, skip: set[str] | None = None) -> list[dict]:
    """/get_load's rows of the live workers of `role`, but those in `skip` (killed, not yet expired)."""
    ids = set(live_workers(base, role)) - (skip or set())
    return [r for r in requests.get(base + "/get_load", timeout=10).json() if r["worker_id"] in ids]


def _idle(base: str, role: str, skip: set[str] | None = None) -> bool:
    """Every such worker is idle with every page free or cached."""
    rows = _rows(base, role, skip)
    return bool(rows) and all(
        r["num_reqs"] == 0 and r["num_free_pages"] + r["num_evictable_pages"] == r["num_total_pages"]
        for r in rows
    )


def _busy(base: str, role: str) -> bool:
    return any((r["num_reqs"] or 0) > 0 for r in _rows(base, role))


@pytest.mark.parametrize("backend", ["nccl", "cuda_ipc"])
def test_p_on_gpu0_d_on_gpu1(tmp_path: Path, backend: str):
    short = [prompt(n, seed=80 + n) for n in (20, 70, 300)]
    long = [prompt(900, seed=90 + i) for i in range(6)]
    serve, base, model_dir = start_pd_serve(tmp_path, backend, "cuda:0,cuda:1")
    try:
        for role, device in (("prefill", "cuda:0"), ("decode", "cuda:1")):
            cmd = worker_process(serve, role).cmdline()
            assert cmd[cmd.index("--device") + 1] == device
        got = [generate(base, p) for p in short]

        results: dict[int, object] = {}
        threads = [run_in_thread(lambda p=p: generate(base, p, LONG), results, i) for i, p in enumerate(long)]
        wait_until(lambda: _busy(base, "prefill"), 30.0, "the prefill worker to hold a request")
        killed = set(live_workers(base, "prefill"))
        worker_process(serve, "prefill").send_signal(signal.SIGKILL)
        for thread in threads:
            thread.join(180)
        wait_until(
            lambda: _idle(base, "decode"), 5.0, "the decode worker idle after the prefill worker's death"
        )

        wait_until(
            lambda: bool(set(live_workers(base, "prefill")) - killed), 120.0, "the prefill worker back"
        )
        threads = [run_in_thread(lambda p=p: generate(base, p, LONG), {}, i) for i, p in enumerate(long)]
        wait_until(lambda: _busy(base, "decode"), 30.0, "the decode worker to hold a request")
        worker_process(serve, "decode").send_signal(signal.SIGKILL)
        wait_until(
            lambda: _idle(base, "prefill", killed),
            5.0,
            "the prefill worker idle after the decode worker's death",
        )
        for thread in threads:
            thread.join(180)  # answered or failed: none hangs
            assert not thread.is_alive()
    finally:
        serve.close()
    assert got == mixed_greedy(model_dir, short)
    assert [results[i] for i in range(len(long))] == mixed_greedy(model_dir, long, LONG)
