"""`serve`: Redis, workers and the router on this machine, in one command.

    serve                                   # SmolLM2-135M-Instruct on the CPU, http://127.0.0.1:30000
    serve --model-path Qwen/Qwen2.5-0.5B-Instruct --device cuda --port 8000
    serve --workers 2 --redis-url redis://redis:6379 --policy least_load
    serve --dp 2 --tp 2 --device cuda          # 2 workers (data parallel) of 2 GPUs each: cuda:0-1, cuda:2-3
    serve --prefill 1 --decode 1 --kv-transfer-backend zmq   # disaggregated: the router pairs them

What it runs (launcher.py): an embedded Redis unless `--redis-url` is given, one mixed worker per
device (or `--workers N` / `--dp N`, spread over the devices, each of `--tp M` GPUs; or `--prefill N --decode M` prefill and
decode workers, plan.py), and the router on `--host`/`--port`. Every router and worker flag that
`serve` does not set itself is accepted and passed on (passthrough.py). When the router's /health
is 200 and it lists every worker as live, one line goes to stdout:
`pdserve serving <model> at http://<host>:<port>`. Children's output goes to stderr, each line
prefixed with the child's name.

While serving, a child that exits on its own (a worker, the router, the embedded Redis) is started
again with the same command, after 1 s, 2 s, 4 s ... up to 30 s (back to 1 s once it stayed up a
minute); the others keep serving meanwhile (supervisor.py, restart_policy.py).

Exit status: 0 after Ctrl-C or SIGTERM (everything drains: the router stops listening and lets its
streams end while the workers finish what they run within --drain-timeout; then Redis stops; a
second signal kills what is left at once); 1 when a child fails to start, or when its restarts keep
failing (`--max-failed-restarts` exits before ready in a row, or more than 10 restarts in 10
minutes; the message names it and shows the end of its output; everything else is stopped);
2 for bad flags.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from pdserve.shared.args import add_engine_args, engine_args_from
from pdserve.shared.cluster.redis_server import RedisServerError
from pdserve.shared.launch.serve import passthrough
from pdserve.shared.launch.serve.launcher import Cluster, StartupError
from pdserve.shared.launch.serve.plan import (
    PlanError,
    WorkerSpec,
    cpu_threads_env,
    parse_devices,
    plan_data_parallel,
    plan_disaggregated,
    router_command,
    worker_command,
)
from pdserve.shared.launch.serve.restart_policy import RestartRules
from pdserve.shared.launch.serve.supervisor import ChildGaveUp
from pdserve.shared.process_exit import exit_process

logger = logging.getLogger("pdserve.serve")

EXIT_FAILURE = 1
EXIT_USAGE = 2
DEFAULT_STARTUP_TIMEOUT_S = 600.0  # the first run converts SmolLM2 from its GGUF; GPUs load big models


def build_parser(flags: passthrough.PassThrough | None = None) -> argparse.ArgumentParser:
    """serve's own flags, then the router's and the workers' (flags: derived when None)."""
    flags = flags or passthrough.derive()
    parser = argparse.ArgumentParser(prog="serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="the router's address (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=30000, help="the router's port")
    parser.add_argument(
        "--workers",
        "--dp",
        "--dp-size",
        "--data-parallel-size",
        dest="workers",
        type=int,
        default=None,
        help="mixed workers, each of --tp ranks (SGLang's --dp; default: one per device, or per --tp GPUs)",
    )
    parser.add_argument("--prefill", type=int, default=None, help="prefill workers (disaggregated mode)")
    parser.add_argument("--decode", type=int, default=None, help="decode workers (disaggregated mode)")
    parser.add_argument("--redis-url", default=None, help="use this Redis instead of starting one")
    parser.add_argument(
        "--startup-timeout",
        type=float,
        default=DEFAULT_STARTUP_TIMEOUT_S,
        help="seconds to become ready (the cluster, and each restarted child)",
    )
    parser.add_argument(
        "--max-failed-restarts",
        type=int,
        default=RestartRules.max_failed_starts,
        help="restarts of one child in a row that exit before it is ready, before serve gives up",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    passthrough.add_to_parser(
        parser.add_argument_group("router (passed to the router when not its default)"), flags.router_actions
    )
    passthrough.add_to_parser(
        parser.add_argument_group("worker (passed to every worker when not its default)"),
        flags.worker_actions,
    )
    # --model-path, --tokenizer-path, --served-model-name: engine flags that the router gets too;
    # --device: one device or a comma list (cpu | cuda | cuda:N), see plan.py
    add_engine_args(parser.add_argument_group("engine (passed to every worker)"))
    return parser


def _plan(ns: argparse.Namespace) -> list[WorkerSpec]:
    devices = parse_devices(ns.device)
    if ns.nnodes > 1:
        raise PlanError(
            "--nnodes: serve runs on one host; run `worker --nnodes K --node-rank R` on each host"
        )
    if ns.prefill is None and ns.decode is None:
        return plan_data_parallel(devices, ns.workers, ns.tp_size)
    if ns.workers is not None:
        raise PlanError("--workers (mixed) and --prefill/--decode (disaggregated) exclude each other")
    return plan_disaggregated(devices, ns.prefill or 0, ns.decode or 1, ns.mem_fraction_static, ns.tp_size)


def _client_host(host: str) -> str:
    """Where to reach the router from this machine (a wildcard bind answers on loopback)."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


def _install_signal_handlers(stop: threading.Event, cluster: Cluster) -> None:
    def on_signal(signum: int, _frame) -> None:
        if stop.is_set():
            logger.warning("second %s: killing every child now", signal.Signals(signum).name)
            cluster.kill_all()
            return
        logger.info("%s: stopping the router, the workers, then Redis", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def run(ns: argparse.Namespace, flags: passthrough.PassThrough) -> int:
    try:
        engine_args_from(ns)  # bad engine flags fail here, not in N workers at once
        specs = _plan(ns)
        rules = RestartRules(max_failed_starts=ns.max_failed_restarts)
        rules.validate()
    except ValueError as exc:  # PlanError included
        print(f"serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    stop = threading.Event()
    cluster = Cluster()
    _install_signal_handlers(stop, cluster)
    status = 0
    try:
        redis_url = ns.redis_url or cluster.start_redis()
        env = cpu_threads_env(specs)
        for spec in specs:
            if spec.wait_for is not None:  # it shares a GPU: it sizes its pool after the one before
                cluster.wait_worker_ready(spec.wait_for, ns.startup_timeout, stop)
            cluster.start_worker(
                spec.name,
                worker_command(spec, ns, redis_url, flags),
                env if spec.device == "cpu" else {},
                after=spec.wait_for,
            )
        cluster.start_router(router_command(ns, redis_url, flags))
        url = f"http://{_client_host(ns.host)}:{ns.port}"
        if cluster.wait_ready(url, ns.startup_timeout, stop, ns.api_key):
            print(f"pdserve serving {ns.served_model_name or ns.model_path} at {url}", flush=True)
            cluster.watch(stop, rules, ns.startup_timeout)
    except (StartupError, ChildGaveUp) as exc:
        print(f"serve: {exc}", file=sys.stderr, flush=True)
        status = EXIT_FAILURE
    except (RedisServerError, OSError) as exc:  # no redis-server, a binary that does not run
        print(f"serve: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        status = EXIT_FAILURE
    finally:
        cluster.stop_all(ns.drain_timeout)
    logger.info("stopped")
    return status


def main(argv: list[str] | None = None) -> int:
    flags = passthrough.derive()
    ns = build_parser(flags).parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=ns.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    exit_process(run(ns, flags))


if __name__ == "__main__":
    sys.exit(main())
