"""`router`: the HTTP face of a pdserve cluster (SGLang's native API and the OpenAI API).

    router --worker-addr tcp://127.0.0.1:30001 --port 30000
    router --redis-url redis://127.0.0.1:6379 --policy cache_aware --api-key KEY
    router --worker-addr tcp://H:P1 --worker-addr tcp://H:D1 --local-prefill-threshold 64   # P + D

Workers come from `--worker-addr` (repeatable) and/or Redis membership (`--redis-url`), any mix
of roles: with decode workers, each request streams from a decode worker paired with a prefill
worker (router/cluster/pairing.py, `--prefill-policy`, `--decode-policy`), or prefilled at the decode
worker when it is shorter than `--local-prefill-threshold` tokens (default 64: a prompt that
short rides in one decode step, while a longer one stretches every running stream's next token),
has n > 1, or no prefill worker is alive.

Liveness is apart from progress: a worker is alive while its connection answers ZMTP heartbeats,
which its ZMQ I/O thread answers even during a long step, so a busy worker is never taken for a
dead one; a dead, frozen or vanished worker is seen within `--worker-liveness-timeout` and its
requests are retried, or moved with the tokens they streamed (`--disable-migration`). A slow
request ends by its own deadline (`--request-timeout`). router/cluster/worker_pool.py has the rules.

One line goes to stdout: `pdserve router ready url=http://HOST:PORT` (with `--port 0`, the port
actually bound), once the port listens, or with `--ready-when-serving` only once the router can
serve a request (`serve` starts it so). Logs go to stderr: until it can serve, what it waits for
(a worker, the tokenizer), then SGLang's "The server is fired up and ready to roll!". SIGTERM or
SIGINT stops it cleanly: connections to workers close, requests in flight end, exit status 0.
`/health` turns 200 once a worker answered and the tokenizer is loaded.

Metrics (`/metrics`): pdserve's `pdserve_router_*` series and SGLang's `sglang:*` ones
(router/serving/metrics.py). `--log-requests` logs one `Finish:` line per request with its token counts
and latency (router/serving/request_metrics.py).

`--processes N` (N > 1): N such routers serve the one port (SO_REUSEPORT: the kernel spreads the
connections), each with its own event loop and its own connections to every worker, under a parent
that restarts one that exits and prints the ready line once all are ready (router/supervisor.py).
Metrics are summed over them, `/abort_request` reaches the process running the rid, and each admits
its share of the workers' running slots (router/processes.py).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
import time

from aiohttp import web

from pdserve.router.cluster.policies import DECODE_POLICY_NAMES, POLICY_NAMES
from pdserve.router.native.info import PROCESS_ROLE_KEY, refresh_worker_gauges
from pdserve.router.native.sibling_abort import SIBLINGS_KEY, SiblingAborts, start_control
from pdserve.router.processes import ProcessRole
from pdserve.router.serving.generator_api import GenerationError
from pdserve.router.serving.metrics import ClusterOfState
from pdserve.router.serving.request_metrics import RequestLog
from pdserve.router.state import STATE_KEY, RouterArgs, RouterState
from pdserve.shared.process_exit import exit_process

logger = logging.getLogger("pdserve.router")

READY_PREFIX = "pdserve router ready"
EXIT_USAGE = 2
GAUGE_REFRESH_S = 1.0
SERVING_POLL_S = 0.1
WAITING_LOG_S = 10.0  # how often the router repeats what it waits for before it can serve


def build_parser() -> argparse.ArgumentParser:
    d = RouterArgs()
    p = argparse.ArgumentParser(prog="router", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default=d.host, help="address to listen on")
    p.add_argument("--port", type=int, default=d.port, help="HTTP port (0: a free one)")
    p.add_argument(
        "--redis-url", default=None, help="learn workers from Redis membership (redis://host:port)"
    )
    p.add_argument(
        "--worker-addr",
        dest="worker_addrs",
        action="append",
        default=[],
        help="a worker's ZMQ address (tcp://host:port); repeatable",
    )
    p.add_argument("--policy", choices=POLICY_NAMES, default=d.policy, help="mixed worker choice")
    p.add_argument(
        "--prefill-policy",
        choices=POLICY_NAMES,
        default=d.prefill_policy,
        help="prefill worker of a pair (cache_aware: longest cached prefix, from the prefix index, then load)",
    )
    p.add_argument(
        "--decode-policy",
        choices=DECODE_POLICY_NAMES,
        default=d.decode_policy,
        help="decode worker of a pair (least_load: most free KV pages, then fewest requests)",
    )
    p.add_argument(
        "--local-prefill-threshold",
        type=int,
        default=d.local_prefill_threshold,
        help="prompts shorter than this many tokens prefill at the decode worker, without a transfer",
    )
    p.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' (on every route but /health)"
    )
    p.add_argument("--admin-api-key", default=None, help="key for admin routes (flush, weights, abort)")
    p.add_argument(
        "--request-timeout", type=float, default=None, help="seconds a request may take (504 after)"
    )
    p.add_argument(
        "--max-queued-requests",
        type=int,
        default=None,
        help="requests waiting at the router for a running slot of the workers, 429 beyond "
        "(default: no bound, and no router queue without priority scheduling)",
    )
    p.add_argument(
        "--enable-priority-scheduling",
        action="store_true",
        help="order the router's queue by the requests' priority; a full queue evicts lower priorities",
    )
    p.add_argument(
        "--schedule-low-priority-values-first",
        action="store_true",
        help="with priority scheduling, smaller priority values go first (default: larger ones)",
    )
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="larger bodies get 413")
    p.add_argument(
        "--max-batch-size", type=int, default=d.max_batch_size, help="most prompts in one /generate"
    )
    p.add_argument("--model-path", default=None, help="the model's path as reported (default: the workers')")
    p.add_argument("--tokenizer-path", default=None, help="tokenizer to load (default: the workers' model)")
    p.add_argument("--served-model-name", default=None, help="the name in OpenAI responses")
    p.add_argument(
        "--chat-template", default=None, help="a Jinja chat template file (default: the tokenizer's)"
    )
    p.add_argument(
        "--tool-call-parser",
        default=None,
        help="format of the model's tool calls: hermes (qwen25, qwen, qwen3), llama3, mistral or json "
        "(default: the one the chat template writes, else json)",
    )
    p.add_argument(
        "--reasoning-parser",
        default=None,
        help="split <think> reasoning into reasoning_content: qwen3 or deepseek-r1 (default: no split)",
    )
    p.add_argument("--preferred-sampling-params", default=None, help="JSON object of default sampling params")
    p.add_argument("--log-level", default=d.log_level, choices=["debug", "info", "warning", "error"])
    p.add_argument("--max-attempts", type=int, default=d.max_attempts, help="workers tried per request")
    p.add_argument(
        "--disable-migration",
        action="store_true",
        help="a stream whose worker dies after its first token ends with an error event, instead of "
        "moving (prompt + tokens so far) to another worker",
    )
    p.add_argument(
        "--worker-liveness-timeout",
        type=float,
        default=d.worker_liveness_timeout,
        help="seconds without an answer to the connection's heartbeats before a worker counts as gone "
        "(a busy worker still answers them; a slow request ends by --request-timeout)",
    )
    p.add_argument(
        "--load-poll-interval", type=float, default=d.load_poll_interval, help="seconds between load queries"
    )
    p.add_argument(
        "--breaker-failure-threshold",
        type=int,
        default=d.breaker_failure_threshold,
        help="consecutive worker failures that open its circuit",
    )
    p.add_argument(
        "--breaker-cooldown",
        type=float,
        default=d.breaker_cooldown,
        help="seconds before an open circuit is probed",
    )
    p.add_argument(
        "--processes",
        type=int,
        default=d.processes,
        help="router processes serving the one port (SO_REUSEPORT), each with its own connections "
        "to every worker; for more streamed tokens/s than one process (one core) gives",
    )
    p.add_argument(
        "--log-requests",
        action="store_true",
        help="log one line per request when it ends: rid, prompt/completion/cached tokens, latency",
    )
    p.add_argument(
        "--ready-when-serving",
        action="store_true",
        help="print the ready line once a request can be served (a worker and the tokenizer are "
        "there), not as soon as the port listens",
    )
    return p


def args_from(ns: argparse.Namespace) -> RouterArgs:
    args = RouterArgs(**{k: v for k, v in vars(ns).items() if k in RouterArgs.__dataclass_fields__})
    args.validate()
    return args


async def serve(
    args: RouterArgs,
    role: ProcessRole | None = None,
    log_requests: bool = False,
    ready_when_serving: bool = False,
) -> None:
    from pdserve.router.app import build_app

    role = role or ProcessRole()
    app = build_app(args)
    state = app[STATE_KEY]
    state.metrics.attach(ClusterOfState(state))  # the sglang:* series: the served model, the workers
    if log_requests:
        state.generator = RequestLog(state.generator)
    app[PROCESS_ROLE_KEY] = role
    siblings = SiblingAborts(role.sibling_sockets()) if role.is_child else None
    if siblings is not None:
        app[SIBLINGS_KEY] = siblings
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, reuse_port=role.is_child or None)
    try:
        await site.start()
    except OSError as exc:
        # Leaving through the event loop would first wait for start-up work in threads (the
        # tokenizer's load, seconds): a supervisor restarting this router waits for the exit.
        print(f"router: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        exit_process(1)
    control = await start_control(state, role.control_socket(role.index)) if role.is_child else None
    port = runner.addresses[0][1] if runner.addresses else args.port
    url = f"http://{args.host}:{port}"
    ready_line = f"{READY_PREFIX} url={url}"
    if not ready_when_serving:
        print(ready_line, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    background = [
        loop.create_task(_freeze_gc_once_loaded(state)),
        loop.create_task(_announce_serving(state, url, ready_line if ready_when_serving else None)),
    ]
    if role.is_child:
        background.append(loop.create_task(_refresh_worker_gauges_every(state, GAUGE_REFRESH_S)))
    try:
        await stop.wait()
        logger.info("stopping")
    finally:
        for task in background:
            task.cancel()
        if control is not None:
            await control.cleanup()
        if siblings is not None:
            await siblings.close()
        await runner.cleanup()


def serving_problem(state: RouterState) -> str | None:
    """Why a request cannot be served yet (what /health answers with its 503), None once it can."""
    try:
        state.require_ready()
    except GenerationError as exc:
        return exc.message
    return None if state.pool.serving_workers() else state.pool.why_none()


async def _announce_serving(state: RouterState, url: str, ready_line: str | None) -> None:
    """Logs what the router waits for until it can serve (again when that changes, and every
    WAITING_LOG_S), then that it serves; prints `ready_line` then, when given."""
    said, said_at = None, 0.0
    while (problem := serving_problem(state)) is not None:
        now = time.monotonic()
        if problem != said or now - said_at >= WAITING_LOG_S:
            logger.info("listening on %s, not serving yet: %s", url, problem)
            said, said_at = problem, now
        await asyncio.sleep(SERVING_POLL_S)
    logger.info("The server is fired up and ready to roll! Serving %s at %s", state.model_name, url)
    if ready_line is not None:
        print(ready_line, flush=True)


async def _refresh_worker_gauges_every(state: RouterState, interval_s: float) -> None:
    """With several processes a scrape refreshes only the process it reached: each keeps its own
    worker gauges fresh in the shared files instead."""
    refresh = refresh_worker_gauges(state)
    while True:
        refresh(state.metrics)
        await asyncio.sleep(interval_s)


async def _freeze_gc_once_loaded(state: RouterState) -> None:
    """Moves what start-up created out of the cyclic GC's reach, once the tokenizer is loaded.

    Loading it imports transformers (and torch): some 400,000 long-lived objects that every full
    collection would walk again, a pause of about 0.1 s on the dev box, every few seconds under
    load, which every stream in flight would see. Frozen, they are never collected (they live as
    long as the process anyway)."""
    while state.tokenizer is None:
        await asyncio.sleep(0.5)
    gc.collect()
    gc.freeze()
    logger.info("%d start-up objects moved out of the garbage collector's way", gc.get_freeze_count())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ns = build_parser().parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=ns.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        args = args_from(ns)
    except ValueError as exc:
        print(f"router: {exc}", file=sys.stderr)
        return EXIT_USAGE
    role = ProcessRole.from_env(os.environ)
    try:
        import uvloop

        if args.processes > 1 and not role.is_child:
            from pdserve.router.supervisor import supervise

            exit_process(uvloop.run(supervise(argv, args.host, args.port, args.processes, READY_PREFIX)))
        uvloop.run(serve(args, role, ns.log_requests, ns.ready_when_serving))
    except ValueError as exc:  # --chat-template that is neither a file nor a template
        print(f"router: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # a socket or file the router could not open (the port: see serve)
        print(f"router: {exc}", file=sys.stderr)
        return 1
    exit_process(0)


if __name__ == "__main__":
    sys.exit(main())
