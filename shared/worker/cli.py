"""`worker`: one worker process. `--role mixed` serves prefill and decode in one engine;
`--role prefill` and `--role decode` are the two halves of disaggregated serving.

    worker --role mixed --model-path HuggingFaceTB/SmolLM2-135M-Instruct --port 30001
    worker --role prefill --port 30011 --kv-transfer-backend zmq     # prefill/engine.py, prefill/worker.py
    worker --role decode --port 30021 --kv-transfer-backend zmq      # decode/engine.py, decode/worker.py

Start-up order (so probes and clients see sensible states at every moment):
  1. SIGTERM/SIGINT handlers (a signal during loading ends the process cleanly after the load);
  2. the HTTP port (`/health` answers 503 while loading) and the ZMQ ROUTER socket (clients may
     connect and queue requests early);
  3. the engine (model + KV pool; prefill/decode: and the KV transfer manager over that pool), one
     warm-up forward of one token (mixed: through generate, then a cache flush);
  4. `/health` turns 200 and one line goes to stdout:
     `pdserve worker ready role=mixed zmq=tcp://H:P http=http://H:Q` (prefill/decode add
     `kv=<endpoint>`, the address peers' KV managers dial; it is also `kv_addr` in Redis);
     with `--redis-url`, the Redis heartbeat (shared/cluster.py) writes its first beat just before
     that line: routers see the worker only once it is ready, and a clean exit deletes its key;
     mixed and prefill workers also publish their radix cache's KV events (shared/kv_events.py)
     for the routers' prefix index, started just before the heartbeat and withdrawn after it;
  5. the loop (mixed.py, or the role's worker.py) until a signal; then it drains: it leaves the
     cluster, intake stops, and live requests get `--drain-timeout` seconds to finish; those left
     are aborted (their clients get abort outputs; their transfers are aborted), the KV manager and
     the sockets close, exit status 0. A second signal exits at once with status 1.

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
`--num-reserved-decode-tokens` output tokens besides (decode/scheduler.py).
Logs go to stderr; stdout carries only the ready line. The worker starts no child processes.
Start-up steps that take more than a second (importing torch, resolving or converting the model,
loading weights, capturing CUDA graphs, starting the KV backend, the warm-up) each log a line as
they run and one when done (shared/engine/startup_log.py). While serving, the engine logs SGLang's
batch lines: one per prefill batch, one every `--decode-log-interval` decode steps (default 40;
0: none; shared/engine/batch_log.py).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time

import zmq

from pdserve.decode.scheduler import DEFAULT_NUM_RESERVED_DECODE_TOKENS
from pdserve.shared.args import EngineArgs, add_engine_args, engine_args_from
from pdserve.shared.cluster import WorkerRegistration, advertise_host, default_worker_id
from pdserve.shared.cluster_types import WorkerInfo
from pdserve.shared.engine.batch_log import DEFAULT_DECODE_LOG_INTERVAL
from pdserve.shared.engine.startup_log import slow_step
from pdserve.shared.worker.http_server import HealthMetricsServer, HealthState
from pdserve.shared.worker.metrics import WorkerMetrics
from pdserve.shared.worker.mixed import DEFAULT_SHUTDOWN_DRAIN_S
from pdserve.shared.worker.weight_updates import DEFAULT_DRAIN_TIMEOUT_S
from pdserve.shared.worker.zmq_io import RouterSocket, tcp_address

logger = logging.getLogger("pdserve.worker")

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


def _http_port(ns: argparse.Namespace) -> int | None:
    """The port to bind HTTP to (0 = any free one), or None when HTTP is off."""
    if ns.http_port is None:
        return ns.port + 1 if ns.port else 0
    return ns.http_port or None


def _install_signal_handlers(stop: threading.Event) -> None:
    def on_signal(signum: int, _frame) -> None:
        if stop.is_set():
            logger.warning("second %s: exiting now", signal.Signals(signum).name)
            raise SystemExit(1)
        logger.info("%s: shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def _port_of(address: str) -> int:
    """The port of `tcp://h:p` or `http://h:p`."""
    return int(address.rsplit(":", 1)[1])


def worker_flags(
    ns: argparse.Namespace, zmq_port: int, http_port: int | None, worker_id: str, kv_addr: str = ""
) -> dict:
    """The worker's own flags (not EngineArgs), as bound, for ServerInfo.args."""
    return {
        "role": ns.role,
        "host": ns.host,
        "port": zmq_port,
        "http_port": http_port or 0,
        "redis_url": ns.redis_url,
        "worker_id": worker_id,
        "advertise_host": ns.advertise_host,
        "update_weights_drain_timeout": ns.update_weights_drain_timeout,
        "drain_timeout": ns.drain_timeout,
        "decode_log_interval": ns.decode_log_interval,
        **(
            {
                "kv_transfer_backend": ns.kv_transfer_backend,
                "kv_transfer_timeout": ns.kv_transfer_timeout,
                "kv_addr": kv_addr,
            }
            if ns.role != "mixed"
            else {}
        ),
        **({"num_reserved_decode_tokens": ns.num_reserved_decode_tokens} if ns.role == "decode" else {}),
    }


def registration_for(
    ns: argparse.Namespace, engine, worker_id: str, zmq_port: int, http_port: int | None, kv_addr: str = ""
):
    """The Redis heartbeat of this worker (not started yet)."""
    host = ns.advertise_host or advertise_host(ns.host)
    info = WorkerInfo(
        worker_id=worker_id,
        role=ns.role,
        zmq_addr=tcp_address(host, zmq_port),
        http_addr=f"http://{host}:{http_port}" if http_port else "",
        kv_addr=kv_addr,
        model_path=engine.model_path,
        served_model_name=engine.served_model_name,
        max_total_num_tokens=engine.max_total_num_tokens,
        context_length=engine.context_length,
        page_size=engine.args.page_size,
        num_free_pages=engine.kv.available_pages,  # free + evictable, as every later beat
        num_total_pages=engine.kv.num_total_pages,
        started_at=time.time(),
    )
    return WorkerRegistration(ns.redis_url, info)


def warm_up(engine) -> None:
    """One forward of one token, so /health turns 200 only when the first real request is fast;
    then flush, so the warm-up leaves nothing in the cache."""
    engine.generate([[0]], {"max_new_tokens": 1, "temperature": 0.0})
    engine.flush_cache()


class StartupError(RuntimeError):
    """A start-up failure the operator can fix (an address the KV backend cannot bind): logged, exit 1."""


def kv_event_publisher(ns: argparse.Namespace, engine_args: EngineArgs, worker_id: str):
    """The KV event publisher of a mixed or prefill worker in a cluster (not started), else None:
    routers choose those roles by cached prefix."""
    if not ns.redis_url or ns.role not in ("mixed", "prefill"):
        return None
    from pdserve.shared.kv_events import KVEventPublisher

    return KVEventPublisher(ns.redis_url, worker_id, engine_args.page_size)


def kv_manager_options(ns: argparse.Namespace) -> dict[str, str]:
    """The backend options the worker's flags set (auto: its fallback plane)."""
    return {"fallback": ns.kv_transfer_fallback} if ns.kv_transfer_backend == "auto" else {}


def build_engine(ns: argparse.Namespace, engine_args: EngineArgs, worker_id: str, kv_listener=None):
    """The role's engine; prefill and decode engines get a KV manager over their own KV pool.
    kv_listener (mixed, prefill): hears the radix cache's page changes."""
    if ns.role == "mixed":
        from pdserve.shared.engine.engine import Engine  # torch import: after the ports answer

        return Engine(engine_args, kv_listener)
    from pdserve.kvtransfer import make_kv_manager
    from pdserve.kvtransfer.base import KVTransferConfig, KVTransferError

    config = KVTransferConfig()
    if ns.kv_transfer_timeout is not None:
        config = KVTransferConfig(transfer_timeout_s=ns.kv_transfer_timeout)
    kv_host = ns.advertise_host or advertise_host(ns.host)

    def make_kv(pool):
        try:
            with slow_step(f"starting the {ns.kv_transfer_backend} KV transfer backend"):
                return make_kv_manager(
                    ns.kv_transfer_backend, pool, worker_id, kv_host, config, **kv_manager_options(ns)
                )
        except KVTransferError as exc:
            raise StartupError(
                f"cannot start the {ns.kv_transfer_backend} KV transfer backend: {exc}"
            ) from exc

    if ns.role == "prefill":
        from pdserve.prefill.engine import PrefillEngine

        return PrefillEngine(engine_args, make_kv, kv_listener)
    from pdserve.decode.engine import DecodeEngine

    return DecodeEngine(engine_args, make_kv, ns.num_reserved_decode_tokens)


def worker_class(role: str):
    """The loop of the role (they share mixed.py's)."""
    if role == "prefill":
        from pdserve.prefill.worker import PrefillWorker

        return PrefillWorker
    if role == "decode":
        from pdserve.decode.worker import DecodeWorker

        return DecodeWorker
    from pdserve.shared.worker.mixed import MixedWorker

    return MixedWorker


def run_worker(ns: argparse.Namespace, engine_args: EngineArgs) -> int:
    stop = threading.Event()
    _install_signal_handlers(stop)
    state = HealthState()
    metrics = WorkerMetrics(role=ns.role, model=engine_args.served_model_name or engine_args.model_path)
    http = None
    registration: WorkerRegistration | None = None
    kv_events = None
    engine = None
    http_port = _http_port(ns)
    ctx = zmq.Context()
    try:
        if http_port is not None:
            http = HealthMetricsServer(ns.host, http_port, state, metrics)
        sock = RouterSocket(ctx, tcp_address(ns.host, ns.port))
    except (OSError, zmq.ZMQError) as exc:
        logger.error("cannot bind %s (zmq port %d, http port %s): %s", ns.host, ns.port, http_port, exc)
        ctx.term()
        return 1
    if http is not None:
        http.start()
    try:
        zmq_port = _port_of(sock.address)
        bound_http_port = _port_of(http.url) if http else None
        worker_id = ns.worker_id or default_worker_id(
            ns.role, ns.advertise_host or advertise_host(ns.host), zmq_port
        )
        kv_events = kv_event_publisher(ns, engine_args, worker_id)
        with slow_step("importing torch"):
            import torch  # noqa: F401 (the slowest import of the engine; nothing when already loaded)
        try:
            engine = build_engine(ns, engine_args, worker_id, kv_events)
        except FileNotFoundError as exc:  # ModelNotFoundError: a wrong --model-path is not a crash
            logger.error("cannot load the model: %s", exc)
            return 1
        except StartupError as exc:
            logger.error("%s", exc)
            return 1
        engine.batch_log.decode_log_interval = ns.decode_log_interval
        kv_addr = engine.kv_manager.endpoint if ns.role != "mixed" else ""
        if not stop.is_set():  # a signal during loading: skip readiness, refuse what queued up, exit
            with slow_step("warming up"):
                if ns.role == "mixed":
                    warm_up(engine)
                else:
                    engine.warm_up()
            state.set_ready()
            if kv_events is not None:  # before membership: an index that sees the worker finds its snapshot
                kv_events.start()
            if ns.redis_url:  # before the ready line: whoever waits for it finds the worker registered
                registration = registration_for(ns, engine, worker_id, zmq_port, bound_http_port, kv_addr)
                registration.start()
            kv_field = f" kv={kv_addr}" if kv_addr else ""
            print(
                f"pdserve worker ready role={ns.role} zmq={sock.address} http={http.url if http else 'off'}"
                + kv_field,
                flush=True,
            )
        worker_class(ns.role)(
            engine,
            sock,
            metrics,
            stop,
            worker_id=worker_id,
            worker_flags=worker_flags(ns, zmq_port, bound_http_port, worker_id, kv_addr),
            registration=registration,
            drain_timeout_s=ns.update_weights_drain_timeout,
            shutdown_drain_s=ns.drain_timeout,
        ).serve()
    finally:
        if registration is not None:  # first: routers stop sending before the sockets close
            registration.close()
        if kv_events is not None and kv_events.started:
            kv_events.close()
        state.set_stopping()
        if engine is not None and ns.role != "mixed":
            engine.kv_manager.close()
        sock.close()
        ctx.term()
        if http is not None:
            http.close()
    logger.info("worker stopped")
    return 0


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
    return run_worker(ns, engine_args)


if __name__ == "__main__":
    sys.exit(main())
