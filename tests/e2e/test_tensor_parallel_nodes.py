"""`worker --tp 2 --nnodes 2` on the CPU (gloo): two "hosts" on loopback, real processes.

Node 1 (`--node-rank 1`) starts rank 1 and supervises it; node 0 is the worker (rank 0), registered
in a real Redis, behind a real router.

- The worker serves a TP=1 engine's and transformers' greedy tokens (logprobs within 1e-5 of
  transformers'); only node 0 registers; node 1 prints nothing on stdout.
- Node 1 killed: the worker exits 1 and the router stops listing it, within seconds (node 1's beat
  goes stale); node 1's rank goes with it.
- Two fresh pairs: node 1's rank killed in one (its node reports it: both nodes exit 1), node 0
  killed in the other (node 1 exits 1 and its rank with it), within seconds.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator

import psutil
import pytest

from pdserve.shared.cluster.redis_server import free_port
from tests.helpers import zygote
from tests.helpers.cluster_waits import live_workers, wait_until
from tests.helpers.engine_tokens import tp1_greedy_tokens
from tests.helpers.hf_reference import hf_greedy
from tests.helpers.router_http import greedy_generate

pytestmark = pytest.mark.slow

FLAGS = ["--dtype", "float32", "--device", "cpu", "--max-total-tokens", "4096", "--log-level", "warning"]
MAX_NEW = 8
LOGPROB_TOL = 1e-5
EXIT_WITHIN_S = 15.0  # a stale beat (5 s) plus process exit on a loaded machine


@pytest.fixture(scope="module")
def start_node(tiny_llama_dir, tmp_path_factory) -> Iterator[Callable[[int, int], subprocess.Popen]]:
    """start_node(node_rank > 0, store_port): `worker --node-rank R` as a plain process (it has no
    ready line); killed at teardown if still running."""
    logs = tmp_path_factory.mktemp("node-logs")
    started: list[subprocess.Popen] = []

    def start(node_rank: int, port: int) -> subprocess.Popen:
        cmd = [
            sys.executable, "-m", "pdserve.shared.launch.worker_cli", "--model-path", tiny_llama_dir,
            *node_flags(node_rank, port),
        ]  # fmt: skip
        log = open(logs / f"node-{len(started)}.log", "w")  # noqa: SIM115 (the child holds it)
        proc = zygote.popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
        log.close()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def node_flags(node_rank: int, port: int) -> list[str]:
    return [
        "--tp", "2", "--nnodes", "2", "--node-rank", str(node_rank),
        "--dist-init-addr", f"127.0.0.1:{port}", *FLAGS,
    ]  # fmt: skip


def start_pairs(count: int, start_node, worker_launcher, tiny_llama_dir, *worker_flags: str) -> list:
    """`count` workers of two nodes, every node 1 started first: [(node 1's process, its rank's
    pid, node 0's WorkerProcess)], each node 0 ready."""
    ports = [free_port() for _ in range(count)]
    nodes1 = [start_node(1, port) for port in ports]
    pairs = []
    for port, node1 in zip(ports, nodes1):
        node0 = worker_launcher("--model-path", tiny_llama_dir, *node_flags(0, port), *worker_flags)
        (rank1,) = psutil.Process(node1.pid).children()
        assert not psutil.Process(node0.pid).children()  # its one rank on this node is itself
        pairs.append((node1, rank1.pid, node0))
    return pairs


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_two_nodes_serve_tp1_tokens_and_a_dead_node_takes_the_worker_down(
    start_node, worker_launcher, router_launcher, redis_url, tiny_llama_dir
):
    ((node1, rank1, node0),) = start_pairs(
        1, start_node, worker_launcher, tiny_llama_dir, "--redis-url", redis_url
    )
    url = router_launcher("--redis-url", redis_url).url
    wait_until(lambda: len(live_workers(url)) == 1, 20.0, "the worker")
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 256) for _ in range(n)] for n in (3, 21)]
    single = tp1_greedy_tokens(tiny_llama_dir, prompts, {"temperature": 0.0, "max_new_tokens": MAX_NEW})
    for prompt, tp1_ids, (hf_ids, hf_lps) in zip(
        prompts, single, hf_greedy(tiny_llama_dir, prompts, MAX_NEW)
    ):
        got_ids, got_lps = greedy_generate(url, prompt, MAX_NEW)
        assert got_ids == tp1_ids == hf_ids
        assert got_lps == pytest.approx(hf_lps, abs=LOGPROB_TOL)
    assert live_workers(url) == [f"mixed@{str(node0.zmq_address).removeprefix('tcp://')}"]  # node 0 only

    node1.send_signal(signal.SIGKILL)
    assert node0.proc.wait(EXIT_WITHIN_S) == 1
    wait_until(lambda: not live_workers(url), 10.0, "the router to see the worker leave")
    wait_until(lambda: gone(rank1), 5.0, "node 1's rank to exit")
    assert node1.stdout is not None and node1.stdout.read() == ""  # no line a launcher takes for ready


def test_a_dead_rank_of_node_1_or_a_dead_rank_0_ends_both_nodes(start_node, worker_launcher, tiny_llama_dir):
    (node1, rank1, node0), (other1, other_rank1, other0) = start_pairs(
        2, start_node, worker_launcher, tiny_llama_dir
    )
    os.kill(rank1, signal.SIGKILL)  # node 1 reports it through the store
    other0.proc.send_signal(signal.SIGKILL)  # the other node 1 loses rank 0's store
    assert node0.proc.wait(EXIT_WITHIN_S) == 1
    assert node1.wait(EXIT_WITHIN_S) == 1
    assert other1.wait(EXIT_WITHIN_S) == 1
    wait_until(lambda: gone(other_rank1), 5.0, "the other node 1's rank to exit")
