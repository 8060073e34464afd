"""A host of a tensor-parallel worker other than rank 0's: `worker --tp N --nnodes K --node-rank R`
with R > 0 runs this instead of a worker.

It starts ranks R*N/K .. (R+1)*N/K-1 (tp_follower_main.py, as its children) and supervises them in
the foreground. It binds no port, registers nowhere and prints nothing on stdout: the worker is
node 0's process, whose ready line a launcher waits for. Logs go to stderr.

Life:
  1. the model must shard over N ranks (tp_ranks.check_shards): else an error before anything starts;
  2. the ranks start; the launcher connects to the store rank 0 hosts at --dist-init-addr, retrying
     while rank 0 is not up (the ranks' rendezvous waits as long, tp_ranks.COLLECTIVE_TIMEOUT);
  3. every BEAT_S it beats (tp_node_watch.py) and checks, in order:
     - one of its ranks exited: it reports it in the store (rank 0 exits on it), stops the other
       ranks and exits 1 (they cannot serve without it);
     - rank 0 announced a clean close: it acknowledges it, stops the ranks and exits 0;
     - rank 0 is gone (the store does not answer, or its beat is stale): it stops the ranks, exits 1;
  4. SIGTERM or SIGINT: it reports its ranks as gone (the worker cannot run without them), stops
     them and exits 0.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time

from pdserve.shared.args import EngineArgs
from pdserve.shared.launch.tp_node_watch import (
    BEAT_S,
    CLOSED_KEY,
    CLOSING_KEY,
    DOWN_KEY,
    STORE_ERRORS,
    BeatWatch,
    beat_key,
    connect_store,
    down_value,
    store_error,
)
from pdserve.shared.launch.tp_ranks import (
    COLLECTIVE_TIMEOUT,
    check_shards,
    follower_command,
    init_method_of,
    stop_processes,
)

logger = logging.getLogger("pdserve.tp_node")

CONNECT_TRY_S = 2.0
SIGNAL_STATUS = -int(signal.SIGTERM)


class NodeLauncher:
    """Node `args.node_rank`'s ranks and their supervision (see the module docstring)."""

    def __init__(self, args: EngineArgs):
        check_shards(args)
        self.args = args
        self.node = args.node_rank
        per_node = args.tp_ranks_per_node
        init_method = init_method_of(args)
        ranks = range(self.node * per_node, (self.node + 1) * per_node)
        self.ranks = {r: subprocess.Popen(follower_command(args, init_method, r)) for r in ranks}
        logger.info("node %d of %d: tensor-parallel ranks %s started", self.node, args.nnodes, list(ranks))
        self.stop = threading.Event()

    def _dead_rank(self) -> tuple[int, int] | None:
        for rank, proc in self.ranks.items():
            status = proc.poll()
            if status is not None:
                return rank, status
        return None

    def _connect(self):
        """The store client, or None when a rank died or a signal came first (or the wait ran out)."""
        assert self.args.dist_init_addr is not None
        deadline = time.monotonic() + COLLECTIVE_TIMEOUT.total_seconds()
        while not self.stop.is_set() and self._dead_rank() is None and time.monotonic() < deadline:
            try:
                return connect_store(self.args.dist_init_addr, CONNECT_TRY_S)
            except STORE_ERRORS:
                continue
        return None

    def run(self) -> int:
        try:
            store = self._connect()
            if store is None and not self.stop.is_set() and self._dead_rank() is None:
                logger.error("node %d: no store answers at %s", self.node, self.args.dist_init_addr)
                return 1
            return self._supervise(store) if store is not None else self._finish(None)
        finally:
            stop_processes(self.ranks.values())

    def _supervise(self, store) -> int:
        rank0 = BeatWatch(time.monotonic(), strict=False)
        while not self.stop.wait(BEAT_S):
            if self._dead_rank() is not None:
                return self._finish(store)
            try:
                store.add(beat_key(self.node), 1)
                if store.check([CLOSING_KEY]):
                    logger.info("node %d: the worker closes; stopping its ranks", self.node)
                    store.add(CLOSED_KEY, 1)
                    return 0
                now = time.monotonic()
                rank0.observe(store.add(beat_key(0), 0), now)
                if rank0.stale(now):
                    logger.error("node %d: rank 0 stopped beating; stopping its ranks", self.node)
                    return 1
            except STORE_ERRORS as exc:
                logger.error(
                    "node %d: rank 0's store stopped answering (%s); stopping its ranks",
                    self.node,
                    store_error(exc),
                )
                return 1
        return self._finish(store)

    def _finish(self, store) -> int:
        """A rank died (exit 1) or a signal came (exit 0): rank 0 learns it through the store."""
        dead = self._dead_rank()
        if dead is not None:
            logger.error("node %d: tensor-parallel rank %d exited with status %d", self.node, *dead)
        rank, status = dead if dead is not None else (min(self.ranks), SIGNAL_STATUS)
        if store is not None:
            try:
                store.set(DOWN_KEY, down_value(rank, status))
            except STORE_ERRORS:
                pass  # rank 0 is gone already
        return 1 if dead is not None else 0


def run_node(args: EngineArgs) -> int:
    """`worker --node-rank R` (R > 0): this host's ranks until they or rank 0 end; the exit status."""
    try:
        launcher = NodeLauncher(args)
    except (ValueError, FileNotFoundError) as exc:  # a model that does not shard, a wrong --model-path
        logger.error("%s", exc)
        return 1

    def on_signal(signum: int, _frame) -> None:
        logger.info("node %d: %s: stopping its ranks", launcher.node, signal.Signals(signum).name)
        launcher.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return launcher.run()
