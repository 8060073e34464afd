"""`worker`: one worker process. `--role mixed` serves prefill and decode in one engine;
`--role prefill` and `--role decode` are the two halves of disaggregated serving.

    worker --role mixed --model-path HuggingFaceTB/SmolLM2-135M-Instruct --port 30001
    worker --role prefill --port 30011 --kv-transfer-backend zmq     # prefill/prefill_engine.py, prefill/prefill_worker.py
    worker --role decode --port 30021 --kv-transfer-backend zmq      # decode/decode_engine.py, decode/decode_worker.py

Start-up order, readiness and the drain on SIGTERM: lifecycle.py.

Ports: `--port` is the ZMQ port (0: a free one). `--http-port` defaults to port + 1 (a free one
when `--port 0`); `--http-port 0` disables HTTP. The ready line prints the ports actually bound.
Cluster: `--redis-url` registers the worker under `--worker-id` (default `<role>@<host>:<zmq port>`)
with addresses on `--advertise-host` (default: `--host`, or this machine's address when binding a
wildcard). Without `--redis-url` the worker serves whoever dials its ZMQ port, as before.
KV transfer (prefill/decode): `--kv-transfer-backend auto|cuda_ipc|zmq|nccl|fake` (kvtransfer/;
auto's backend for pairs cuda_ipc cannot serve: `--kv-transfer-fallback zmq|nccl`);
`auto` (the default) is cuda_ipc for peers on this host that can reach each other's GPU and zmq for
the others, chosen per pair; CPU workers run zmq. Transfers that do not finish within
`--kv-transfer-timeout` seconds fail; a decode worker pre-allocates a prompt only with room for
`--num-reserved-decode-tokens` output tokens besides (decode/decode_role.py).
Ranks on several hosts: `--tp N --nnodes K --dist-init-addr HOST:PORT` (node 0's address) with
`--node-rank 0` on node 0 (the worker) and `--node-rank R` on host R, which starts its N/K ranks and
supervises them, serving nothing itself (tp_node.py).
Logs go to stderr; stdout carries only the ready line. The worker starts no child processes but
its tensor-parallel ranks (`--tp N`: N-1 followers, one per rank, tp_ranks.py).
Start-up steps that take more than a second (importing torch, resolving or converting the model,
loading weights, capturing CUDA graphs, starting the KV backend, the warm-up) each log a line as
they run and one when done (shared/engine/startup_log.py). While serving, the engine logs SGLang's
batch lines: one per prefill batch, one every `--decode-log-interval` decode steps (default 40;
0: none; shared/engine/batch_log.py).
"""

from __future__ import annotations

import argparse
import logging
import sys

from pdserve.decode.decode_role import DEFAULT_NUM_RESERVED_DECODE_TOKENS
from pdserve.shared.args import add_engine_args, engine_args_from
from pdserve.shared.engine.batch_log import DEFAULT_DECODE_LOG_INTERVAL
from pdserve.shared.launch.worker_lifecycle import run_worker
from pdserve.shared.process_exit import exit_process
from pdserve.shared.worker.mixed import DEFAULT_SHUTDOWN_DRAIN_S
from pdserve.shared.worker.update_queue import DEFAULT_DRAIN_TIMEOUT_S

ROLES = ("mixed", "prefill", "decode")
KV_TRANSFER_BACKENDS = ("auto", "cuda_ipc", "zmq", "nccl", "fake")
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="worker", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--role", choices=ROLES, default="mixed", help="what this worker does (default mixed)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind ZMQ and HTTP to")
    parser.add_argument("--port", type=int, default=30001, help="ZMQ ROUTER port (0: pick a free one)")
    parser.add_argument(
        "--http-port",
        type=int,
        default=None,
        help="/health and /metrics port; default port+1 (a free one with --port 0); 0 disables HTTP",
    )
    parser.add_argument("--redis-url", default=None, help="register in this Redis (redis://host:port)")
    parser.add_argument("--worker-id", default=None, help="id in the cluster (default role@host:port)")
    parser.add_argument(
        "--advertise-host", default=None, help="host routers dial (default --host; a wildcard: this host)"
    )
    parser.add_argument(
        "--update-weights-drain-timeout",
        type=float,
        default=DEFAULT_DRAIN_TIMEOUT_S,
        help="seconds a weights update waits for running requests before aborting them",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=DEFAULT_SHUTDOWN_DRAIN_S,
        help="on SIGTERM: seconds running requests get to finish (after leaving the cluster) before "
        "they are aborted (a router moves them to another worker)",
    )
    parser.add_argument(
        "--kv-transfer-backend",
        choices=KV_TRANSFER_BACKENDS,
        default="auto",
        help="how prefill workers push KV pages to decode workers (prefill/decode roles). auto: "
        "cuda_ipc between workers of this host that reach each other's GPU, else zmq, per pair; "
        "zmq on CPU",
    )
    parser.add_argument(
        "--kv-transfer-fallback",
        choices=("zmq", "nccl"),
        default="zmq",
        help="auto: the backend of a pair that cuda_ipc cannot serve (another host, another container, "
        "GPUs without peer access); every worker of the cluster must name the same",
    )
    parser.add_argument(
        "--kv-transfer-timeout",
        type=float,
        default=None,
        help="seconds a KV transfer may take before it fails (default: the backend's, 60)",
    )
    parser.add_argument(
        "--num-reserved-decode-tokens",
        type=int,
        default=DEFAULT_NUM_RESERVED_DECODE_TOKENS,
        help="decode role: output tokens of room each request keeps beside its prompt when pre-allocating",
    )
    parser.add_argument(
        "--decode-log-interval",
        type=int,
        default=DEFAULT_DECODE_LOG_INTERVAL,
        help="log a 'Decode batch.' line every this many decode steps (0: never); every prefill "
        "batch logs a 'Prefill batch.' line",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_engine_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=ns.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if ns.num_reserved_decode_tokens < 0:
        print("worker: --num-reserved-decode-tokens must be >= 0", file=sys.stderr)
        return EXIT_USAGE
    if ns.drain_timeout < 0:
        print("worker: --drain-timeout must be >= 0 seconds", file=sys.stderr)
        return EXIT_USAGE
    if ns.kv_transfer_timeout is not None and ns.kv_transfer_timeout <= 0:
        print("worker: --kv-transfer-timeout must be > 0 seconds", file=sys.stderr)
        return EXIT_USAGE
    if ns.decode_log_interval < 0:
        print("worker: --decode-log-interval must be >= 0", file=sys.stderr)
        return EXIT_USAGE
    try:
        engine_args = engine_args_from(ns)
    except ValueError as exc:  # EngineArgs.validate names the flag
        print(f"worker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if engine_args.nnodes > 1 and ns.role != "mixed":
        print(f"worker: --nnodes {engine_args.nnodes} serves --role mixed only", file=sys.stderr)
        return EXIT_USAGE
    if engine_args.node_rank > 0:  # another host's ranks of node 0's worker: no worker here
        from pdserve.shared.launch.tp_node import run_node

        return run_node(engine_args)
    exit_process(run_worker(ns, engine_args))


if __name__ == "__main__":
    sys.exit(main())
