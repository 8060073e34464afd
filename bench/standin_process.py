"""The stand-in engine's process (bench/standin_engine.py): flags, the bound ROUTER socket, the ready
line and the signals.

    python -m pdserve.bench.standin_process --port 0 --step-ms 20 --tokenizer-path DIR

- Start-up prints the worker's ready line (`pdserve worker ready role=mixed zmq=... http=off`);
  SIGTERM/SIGINT abort what runs ("worker is shutting down"), deliver those outputs and exit 0.
- The socket's send high-water mark is unlimited: a router that falls behind sees its backlog grow
  (as it would behind a real engine), never lost outputs.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import zmq

from pdserve.bench.standin_engine import StandinConfig, StandinEngine
from pdserve.shared.launch.worker_process import READY_PREFIX


def bind_router_socket(ctx: zmq.Context, address: str) -> zmq.Socket:
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.setsockopt(zmq.SNDHWM, 0)  # unlimited: never drop outputs to a slow router
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.bind(address)
    return sock


def parse_token_ids(spec: str) -> tuple[int, ...]:
    """ "97:123" → 97..122; "5,6,7" → (5, 6, 7)."""
    if ":" in spec:
        lo, hi = (int(x) for x in spec.split(":", 1))
        ids = tuple(range(lo, hi))
    else:
        ids = tuple(int(x) for x in spec.split(",") if x.strip())
    if not ids:
        raise argparse.ArgumentTypeError(f"--token-ids {spec!r} names no ids")
    return ids


def model_facts(tokenizer_path: str) -> dict[str, Any]:
    """model_type, architectures and vocab_size from config.json beside the tokenizer, if any."""
    path = Path(tokenizer_path) / "config.json"
    if not tokenizer_path or not path.is_file():
        return {}
    config = json.loads(path.read_text())
    return {
        "model_type": config.get("model_type", ""),
        "architectures": tuple(config.get("architectures") or ()),
        "vocab_size": int(config.get("vocab_size", 0)),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="A stand-in engine: the worker protocol, tokens at a fixed rate.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="ZMQ port (0: a free one, printed on the ready line)")
    p.add_argument("--step-ms", type=float, default=20.0, help="one step (a token per request) every N ms")
    p.add_argument(
        "--token-ids", type=parse_token_ids, default=tuple(range(97, 123)), help='"lo:hi" or "a,b,c"'
    )
    p.add_argument("--tokenizer-path", default="", help="a tokenizer directory the router can load")
    p.add_argument("--model-path", default="", help="reported model path (default: the tokenizer path)")
    p.add_argument("--served-model-name", default="")
    p.add_argument("--context-length", type=int, default=32768)
    p.add_argument("--max-total-tokens", type=int, default=1 << 22)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--first-token-now", action="store_true", help="send a request's first token on arrival")
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    cfg = StandinConfig(
        step_ms=ns.step_ms,
        token_ids=ns.token_ids,
        tokenizer_path=ns.tokenizer_path,
        model_path=ns.model_path or ns.tokenizer_path or "standin",
        served_model_name=ns.served_model_name,
        context_length=ns.context_length,
        max_total_tokens=ns.max_total_tokens,
        page_size=ns.page_size,
        first_token_now=ns.first_token_now,
        **model_facts(ns.tokenizer_path),
    )
    ctx = zmq.Context()
    sock = bind_router_socket(ctx, f"tcp://{ns.host}:{ns.port}")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    engine = StandinEngine(sock, cfg)
    address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    print(f"{READY_PREFIX} role=mixed zmq={address} http=off", flush=True)
    try:
        engine.serve(stop)
    finally:
        sock.close(linger=1000)
        ctx.term()
    print(f"standin: {engine.steps} steps, {engine.tokens_sent} tokens sent", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
