"""A tensor-parallel worker's ranks (`--tp N`): rank 0 is the worker process; it starts ranks
1..N-1 (tp_follower_main.py), joins the process group with them and watches them.

Rules:
- Before any process starts, the model must shard over N ranks (shared.models.tensor_parallel):
  a refused architecture or shape is a ValueError naming it.
- One process group per worker, its store on a free loopback port of rank 0: gloo on the CPU,
  nccl on CUDA (rank r on the r-th device from the worker's); every collective has a timeout.
  On the CPU each rank gets an equal share of the worker's threads (all cores, or serve's
  OMP_NUM_THREADS share when several workers run), so N ranks do not oversubscribe them.
- A follower that exits while the ranks are not closing is a dead rank: the watcher thread kills
  the other followers (useless without it) and runs `on_rank_exit(rank, status)`. A worker cannot
  serve without it (rank 0's next pass would wait on it): the worker's callback
  (`exit_worker`) exits at once.
- Followers die with rank 0: PR_SET_PDEATHSIG where Linux offers it (for rank 0's own children),
  and their loop checks between passes that rank 0 still runs (its pidfd, whoever started the
  follower; without pidfds, that rank 0 is still their parent).
- `close()` stops the followers (SIGTERM, SIGKILL after a grace) and leaves the process group.
- Ranks on several hosts (`--nnodes K`): this process starts only node 0's ranks 1..N/K-1; the
  store is at --dist-init-addr, and node launchers (tp_node.py) start the others. Across hosts the
  ranks are watched through that store (tp_node_watch.py): a node that reports a dead rank, or whose
  beat stops, is a dead rank as above; `close()` first tells the nodes that the worker closes.
- `--tp 1` starts nothing: the worker calls none of this.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from datetime import timedelta

import torch
import torch.distributed as dist

from pdserve.shared.args import EngineArgs
from pdserve.shared.cluster.redis_server import free_port
from pdserve.shared.launch.tp_node_watch import NodeWatch
from pdserve.shared.models.config import ModelConfig
from pdserve.shared.models.resolver import resolve_model
from pdserve.shared.models.tensor_parallel import check_tensor_parallel

logger = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT = timedelta(seconds=300)  # a hung pass fails; death is seen sooner, by the watcher
STOP_GRACE_S = 5.0


def rank_device(device: str, rank: int) -> str:
    """Rank r's device: the CPU for every rank, else the r-th GPU from the worker's first (r: the
    rank's place on its host)."""
    if not device.startswith("cuda"):
        return device
    first = int(device.split(":", 1)[1]) if ":" in device else 0
    return f"cuda:{first + rank}"


def join_process_group(
    device: str, rank: int, world_size: int, init_method: str, local_ranks: int | None = None
) -> None:
    """This process as `rank` of the worker's group (see the module rules); `local_ranks`: how
    many of the ranks share this host (default all)."""
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    else:
        # the worker's share of the cores (serve's OMP_NUM_THREADS under --dp), split over its ranks
        torch.set_num_threads(max(1, torch.get_num_threads() // (local_ranks or world_size)))
    dist.init_process_group(
        backend="nccl" if device.startswith("cuda") else "gloo",
        init_method=init_method,
        world_size=world_size,
        rank=rank,
        timeout=COLLECTIVE_TIMEOUT,
    )


def init_method_of(args: EngineArgs) -> str:
    """The rendezvous: --dist-init-addr when the ranks span hosts, else a free loopback port."""
    if args.nnodes > 1 and args.dist_init_addr is not None:
        return f"tcp://{args.dist_init_addr}"
    return f"tcp://127.0.0.1:{free_port()}"


def follower_command(args: EngineArgs, init_method: str, rank: int) -> list[str]:
    """The command line of follower `rank` (tp_follower_main.py), a child of this process."""
    return [
        sys.executable, "-m", "pdserve.shared.launch.tp_follower_main",
        "--world-size", str(args.tp_size), "--init-method", init_method, "--rank", str(rank),
        "--parent-pid", str(os.getpid()), "--engine-args", json.dumps(dataclasses.asdict(args)),
    ]  # fmt: skip


def stop_processes(procs: Iterable[subprocess.Popen]) -> None:
    """SIGTERM to those still running, SIGKILL to those alive STOP_GRACE_S later; reaps them all."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def check_shards(args: EngineArgs) -> None:
    """ValueError unless the model of `args` shards over `args.tp_size` ranks."""
    if args.is_embedding:
        raise ValueError(f"--tp {args.tp_size}: embedding models have no tensor-parallel support yet")
    local_dir = resolve_model(args.model_path).local_dir
    config = ModelConfig.from_path(
        local_dir, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code
    )
    check_tensor_parallel(config, args.tp_size, args.quantization)


class TensorParallelRanks:
    """Rank 0's side of the ranks (see the module rules)."""

    def __init__(
        self,
        args: EngineArgs,
        on_rank_exit: Callable[[int, int], None],
        popen: Callable[..., subprocess.Popen] = subprocess.Popen,
    ):
        """`popen` starts each follower (subprocess.Popen, or a launcher with its interface)."""
        check_shards(args)
        self.size = args.tp_size
        self.on_rank_exit = on_rank_exit
        self._closing = threading.Event()
        init_method = init_method_of(args)
        self.followers = {
            r: popen(follower_command(args, init_method, r)) for r in range(1, args.tp_ranks_per_node)
        }
        self._watcher = threading.Thread(target=self._watch, name="tp-ranks", daemon=True)
        self._watcher.start()
        self._threads = torch.get_num_threads()
        self.nodes: NodeWatch | None = None
        try:
            join_process_group(rank_device(args.device, 0), 0, self.size, init_method, args.tp_ranks_per_node)
            if args.nnodes > 1:
                self.nodes = NodeWatch(args, self._on_node_exit)
        except BaseException:
            self.close()
            raise
        logger.info("tensor parallel: %d ranks joined (followers %s)", self.size, self.pids)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.followers.values()]

    def _watch(self) -> None:
        while not self._closing.wait(0.2):
            for rank, proc in self.followers.items():
                status = proc.poll()
                if status is not None and not self._closing.is_set():
                    logger.error("tensor-parallel rank %d exited with status %d", rank, status)
                    self._kill_followers()
                    self.on_rank_exit(rank, status)
                    return

    def _kill_followers(self) -> None:
        for proc in self.followers.values():
            if proc.poll() is None:
                proc.kill()

    def _on_node_exit(self, rank: int, status: int) -> None:
        """A rank of another host is gone: as a local follower's death (see the module rules)."""
        if not self._closing.is_set():
            self._closing.set()
            self._kill_followers()
            self.on_rank_exit(rank, status)

    def close(self) -> None:
        self._closing.set()
        if self.nodes is not None:  # before the store goes with the process group
            self.nodes.close()
        stop_processes(self.followers.values())
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(self._threads)


def exit_worker(rank: int, status: int) -> None:
    """The worker's `on_rank_exit`: exit 1 now (a pass in flight, or the next one, would wait on
    the dead rank); routers see the worker's connection drop and move its requests."""
    logger.error("the worker stops: tensor-parallel rank %d is gone (status %d)", rank, status)
    logging.shutdown()
    os._exit(1)
