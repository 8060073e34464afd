"""One worker process's life, from binding its ports to the drain after a signal, and which engine
and loop each role gets (`build_engine`, `worker_class`). The `worker` command (worker_cli.py) parses and
checks the flags, then calls `run_worker`.

Start-up order (so probes and clients see sensible states at every moment):
  1. SIGTERM/SIGINT handlers (a signal during loading ends the process cleanly after the load);
  2. the HTTP port (`/health` answers 503 while loading) and the ZMQ ROUTER socket (clients may
     connect and queue requests early);
  3. with `--tp N`, ranks 1..N-1 (tp_ranks.py); the engine (model + KV pool; prefill/decode: and
     the KV transfer manager over that pool), one warm-up forward of one token (mixed: through
     generate, then a cache flush);
  4. `/health` turns 200 and one line goes to stdout:
     `pdserve worker ready role=mixed zmq=tcp://H:P http=http://H:Q` (prefill/decode add
     `kv=<endpoint>`, the address peers' KV managers dial; it is also `kv_addr` in Redis);
     with `--redis-url`, the Redis heartbeat (shared/cluster/membership.py) writes its first beat just before
     that line: routers see the worker only once it is ready, and a clean exit deletes its key;
     mixed and prefill workers also publish their radix cache's KV events (shared/cluster/kv_events.py)
     for the routers' prefix index, started just before the heartbeat and withdrawn after it;
  5. the loop (mixed.py, or the role's worker.py) until a signal; then it drains: it leaves the
     cluster, intake stops, and live requests get `--drain-timeout` seconds to finish; those left
     are aborted (their clients get abort outputs; their transfers are aborted), the KV manager and
     the sockets close, exit status 0. A second signal exits at once with status 1.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time

import zmq

from pdserve.shared.args import EngineArgs
from pdserve.shared.cluster.membership import WorkerRegistration, advertise_host, default_worker_id
from pdserve.shared.cluster.worker_info import WorkerInfo
from pdserve.shared.engine.startup_log import slow_step
from pdserve.shared.launch.worker_gpu import use_worker_gpu
from pdserve.shared.worker.http_server import HealthMetricsServer, HealthState
from pdserve.shared.worker.metrics import WorkerMetrics
from pdserve.shared.worker.zmq_io import RouterSocket, tcp_address

logger = logging.getLogger("pdserve.worker")


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
    if engine.embedding is not None:  # it generates nothing: a forward outside the scheduler
        engine.warm_up()
        return
    engine.generate([[0]], {"max_new_tokens": 1, "temperature": 0.0})
    engine.flush_cache()


class StartupError(RuntimeError):
    """A start-up failure the operator can fix (an address the KV backend cannot bind): logged, exit 1."""


def start_tp_ranks(engine_args: EngineArgs):
    """`--tp N` > 1: ranks 1..N-1 started and joined with this process as rank 0 (tp_ranks.py);
    a rank that dies later ends the worker. None for one rank: nothing starts."""
    if engine_args.tp_size == 1:
        return None
    from pdserve.shared.launch.tp_ranks import TensorParallelRanks, exit_worker

    try:
        with slow_step(f"starting {engine_args.tp_size - 1} tensor-parallel ranks"):
            return TensorParallelRanks(engine_args, exit_worker)
    except ValueError as exc:  # the model does not shard over N ranks
        raise StartupError(str(exc)) from exc


def kv_event_publisher(ns: argparse.Namespace, engine_args: EngineArgs, worker_id: str):
    """The KV event publisher of a mixed or prefill worker in a cluster (not started), else None:
    routers choose those roles by cached prefix."""
    if not ns.redis_url or ns.role not in ("mixed", "prefill"):
        return None
    from pdserve.shared.cluster.kv_events import KVEventPublisher

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
    from pdserve.kvtransfer.base import KVTransferConfig, KVTransferError
    from pdserve.shared.engine.tp_kv_transfer import open_worker_kv

    config = KVTransferConfig()
    if ns.kv_transfer_timeout is not None:
        config = KVTransferConfig(transfer_timeout_s=ns.kv_transfer_timeout)
    kv_host = ns.advertise_host or advertise_host(ns.host)

    def make_kv(pool):
        try:
            with slow_step(f"starting the {ns.kv_transfer_backend} KV transfer backend"):
                # every rank's managers (shared/engine/tp_kv_transfer.py); followers join below
                return open_worker_kv(
                    ns.kv_transfer_backend, pool, worker_id, kv_host, config, kv_manager_options(ns)
                )
        except KVTransferError as exc:
            raise StartupError(
                f"cannot start the {ns.kv_transfer_backend} KV transfer backend: {exc}"
            ) from exc

    if ns.role == "prefill":
        from pdserve.prefill.prefill_engine import PrefillEngine

        return open_follower_kv(PrefillEngine(engine_args, make_kv, kv_listener), ns, kv_host)
    from pdserve.decode.decode_engine import DecodeEngine

    return open_follower_kv(DecodeEngine(engine_args, make_kv, ns.num_reserved_decode_tokens), ns, kv_host)


def open_follower_kv(engine, ns: argparse.Namespace, kv_host: str):
    """With `--tp N`: the followers' KV managers join rank 0's (shared/engine/tp_kv_transfer.py)."""
    from pdserve.kvtransfer.base import KVTransferError

    sender = engine.runner.step_sender
    if sender is None:
        return engine
    try:
        with slow_step("starting the KV transfer backend of the tensor-parallel ranks"):
            engine.kv_manager.open_followers(
                sender.send_control, engine.args.tp_size - 1, kv_host, kv_manager_options(ns)
            )
    except KVTransferError as exc:
        engine.kv_manager.close()
        raise StartupError(f"cannot start the KV transfer backend of every rank: {exc}") from exc
    return engine


def worker_class(role: str):
    """The loop of the role (they share mixed.py's)."""
    if role == "prefill":
        from pdserve.prefill.prefill_worker import PrefillWorker

        return PrefillWorker
    if role == "decode":
        from pdserve.decode.decode_worker import DecodeWorker

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
    tp_ranks = None
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
        use_worker_gpu(engine_args.device)
        try:
            tp_ranks = start_tp_ranks(engine_args)
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
        if tp_ranks is not None:
            tp_ranks.close()
    logger.info("worker stopped")
    return 0
