"""A stand-in engine process for router benchmarks: the worker protocol, no model (no torch).

A benchmark tool, never a test double for the real worker: it answers the router's messages on a
bound ROUTER socket exactly as `worker --role mixed` does and emits tokens at a fixed rate, so what
a benchmark measures above it is the router's own cost.

    python -m pdserve.bench.standin_engine --port 0 --step-ms 20 --tokenizer-path DIR

Rules:
- Steps: while requests run, one step every `--step-ms` on a fixed clock (a step that overruns
  moves the clock, it never bursts to catch up). Each step gives every running request one token
  (every sample of an n > 1 request one token each) and sends each client ONE OutputBatch holding
  all its outputs of the step. A request that arrives while idle is stepped at once; one that
  arrives while busy waits for the next tick, as in a real engine's continuous batch. With
  `--first-token-now` a request's first token is sent as soon as it arrives (its own batch), and
  later tokens follow the step clock: benchmarks then see transit time without the step wait. An
  idle engine then starts its clock one step after that first token (its second token comes a
  step later, as after a real prefill, never in a second frame right behind the first).
- Tokens cycle through `--token-ids` (default 97..122: "a".."z" in a byte-level vocabulary). A
  request ends after `max_new_tokens` (SGLang's default 128 when absent; None means up to the
  context length) with finish_reason {"type": "length", "length": N}; no EOS is ever produced.
- AbortRequest: the request's samples end at once with finish_reason abort and the message (unknown
  rids: nothing). LoadQuery → LoadReport from the tokens held (prompt + output, paged). ServerInfoQuery
  → ServerInfo naming `--tokenizer-path`, so a router can tokenize and detokenize.
  FlushCacheRequest → success when idle, else the worker's refusal message. UpdateWeightsRequest →
  failure (it has no weights).
- Start-up prints the worker's ready line (`pdserve worker ready role=mixed zmq=... http=off`);
  SIGTERM/SIGINT abort what runs ("worker is shutting down"), deliver those outputs and exit 0.
- The socket's send high-water mark is unlimited: a router that falls behind sees its backlog grow
  (as it would behind a real engine), never lost outputs.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import zmq

from pdserve.shared.protocol import (
    AbortRequest,
    FlushCacheRequest,
    FlushCacheResult,
    GenerateRequest,
    LoadQuery,
    LoadReport,
    Message,
    OutputBatch,
    ProtocolError,
    RequestOutput,
    ServerInfo,
    ServerInfoQuery,
    UpdateWeightsRequest,
    UpdateWeightsResult,
    decode,
    encode,
    field_names,
)
from pdserve.shared.worker.launch import READY_PREFIX

DEFAULT_MAX_NEW_TOKENS = 128
SHUTDOWN_MESSAGE = "worker is shutting down"
# Every field of a RequestOutput with its default, as the row OutputBatch sends: one step's outputs
# are built as plain lists from it (cheaper than a dataclass per token) and decode to exactly the
# worker's RequestOutput.
_OUTPUT_TEMPLATE = RequestOutput(rid="", token_ids=[]).to_row()
_AT = {name: i for i, name in enumerate(field_names(RequestOutput))}
_RID, _INDEX, _TOKENS, _FINISHED, _REASON, _PROMPT, _COMPLETION = (
    _AT[name]
    for name in (
        "rid",
        "index",
        "token_ids",
        "finished",
        "finish_reason",
        "prompt_tokens",
        "completion_tokens",
    )
)


def output_wire(
    rid: str,
    index: int,
    token_ids: list[int],
    prompt_tokens: int,
    completion_tokens: int,
    finish_reason: dict[str, Any] | None,
) -> list[Any]:
    """The wire row of one RequestOutput (finished when finish_reason is given)."""
    out = list(_OUTPUT_TEMPLATE)
    out[_RID] = rid
    out[_INDEX] = index
    out[_TOKENS] = token_ids
    out[_FINISHED] = finish_reason is not None
    out[_REASON] = finish_reason
    out[_PROMPT] = prompt_tokens
    out[_COMPLETION] = completion_tokens
    return out


def batch_frame(outputs: list[list[Any]]) -> bytes:
    """An OutputBatch frame, byte for byte what `encode(OutputBatch(...))` gives."""
    return msgpack.packb([OutputBatch.TAG, {"outputs": outputs}], use_bin_type=True)


@dataclass
class StandinConfig:
    step_ms: float = 20.0
    token_ids: tuple[int, ...] = tuple(range(97, 123))
    tokenizer_path: str = ""
    model_path: str = "standin"
    served_model_name: str = ""
    context_length: int = 32768
    max_total_tokens: int = 1 << 22
    page_size: int = 16
    vocab_size: int = 0
    model_type: str = ""
    architectures: tuple[str, ...] = ()
    first_token_now: bool = False


@dataclass
class Sample:
    rid: str
    index: int
    identity: bytes
    prompt_tokens: int
    max_new_tokens: int
    generated: int = 0


def max_new_tokens_of(params: dict[str, Any], prompt_tokens: int, context_length: int) -> int:
    value = params.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    if value is None:
        return max(context_length - prompt_tokens, 0)
    return int(value)


class StandinEngine:
    """The stand-in's state and message handlers; `serve` drives it from one thread."""

    def __init__(self, sock: zmq.Socket, cfg: StandinConfig, worker_id: str = ""):
        self.sock = sock
        self.cfg = cfg
        self.worker_id = worker_id or f"standin-{uuid.uuid4().hex[:8]}"
        self.running: dict[tuple[str, int], Sample] = {}
        self.steps = 0
        self.tokens_sent = 0
        self._handlers: dict[type[Message], Callable[[bytes, Any], None]] = {
            GenerateRequest: self._on_generate,
            AbortRequest: self._on_abort,
            LoadQuery: self._on_load,
            FlushCacheRequest: self._on_flush,
            ServerInfoQuery: self._on_info,
            UpdateWeightsRequest: self._on_update_weights,
        }

    # ------------------------------------------------------------------ loop

    def serve(self, stop: threading.Event) -> None:
        step_s = self.cfg.step_ms / 1000.0
        next_tick = time.monotonic()
        while not stop.is_set():
            now = time.monotonic()
            if self.running:
                wait_ms = max(next_tick - now, 0.0) * 1000.0
            else:
                wait_ms = 50.0
            if self.sock.poll(math.ceil(wait_ms) if wait_ms > 0 else 0, zmq.POLLIN):
                was_idle = not self.running
                self.drain()
                if was_idle and self.running:  # with first_token_now the first token went out already
                    next_tick = time.monotonic() + (step_s if self.cfg.first_token_now else 0.0)
            now = time.monotonic()
            if self.running and now >= next_tick:
                self.step()
                next_tick = max(next_tick + step_s, now)
        self.shutdown()

    def drain(self) -> None:
        while True:
            try:
                parts = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(parts) != 2:
                continue
            try:
                msg = decode(parts[1])
            except ProtocolError:
                continue
            handler = self._handlers.get(type(msg))
            if handler is not None:
                handler(parts[0], msg)

    def step(self) -> None:
        """One token for every running sample; one OutputBatch per client."""
        by_client: dict[bytes, list[dict[str, Any]]] = {}
        for s in list(self.running.values()):
            by_client.setdefault(s.identity, []).append(self._advance(s))
        for identity, outs in by_client.items():
            self.sock.send_multipart([identity, batch_frame(outs)], copy=False)
        self.steps += 1
        self.tokens_sent += sum(len(outs) for outs in by_client.values())

    def shutdown(self) -> None:
        self.drain()
        for identity, outs in self._end_samples(list(self.running), SHUTDOWN_MESSAGE).items():
            self.sock.send_multipart([identity, batch_frame(outs)])

    # ------------------------------------------------------------------ handlers

    def _reply(self, identity: bytes, outs: list[dict[str, Any]]) -> None:
        self.sock.send_multipart([identity, batch_frame(outs)])

    def _on_generate(self, identity: bytes, msg: GenerateRequest) -> None:
        params = msg.sampling_params if isinstance(msg.sampling_params, dict) else {}
        n = int(params.get("n", 1) or 1)
        if not msg.rid or any((msg.rid, i) in self.running for i in range(n)):
            reason = {"type": "abort", "message": f"Duplicate or empty request id {msg.rid!r}."}
            out = output_wire(str(msg.rid), 0, [], 0, 0, reason)
            out["error"] = reason["message"]
            self._reply(identity, [out])
            return
        prompt_tokens = len(msg.input_ids)
        max_new = max_new_tokens_of(params, prompt_tokens, self.cfg.context_length)
        if max_new <= 0:  # nothing to generate: finished at once, as the engine does
            reason = {"type": "length", "length": 0}
            self._reply(identity, [output_wire(msg.rid, i, [], prompt_tokens, 0, reason) for i in range(n)])
            return
        samples = [Sample(msg.rid, i, identity, prompt_tokens, max_new) for i in range(n)]
        for s in samples:
            self.running[(s.rid, s.index)] = s
        if self.cfg.first_token_now:
            outs = [self._advance(s) for s in samples]
            self.sock.send_multipart([identity, batch_frame(outs)], copy=False)
            self.tokens_sent += len(outs)

    def _advance(self, s: Sample) -> dict[str, Any]:
        """Gives s its next token; removes it from the running set when that was its last."""
        s.generated += 1
        token = self.cfg.token_ids[(s.generated - 1) % len(self.cfg.token_ids)]
        reason = None
        if s.generated >= s.max_new_tokens:
            reason = {"type": "length", "length": s.generated}
            del self.running[(s.rid, s.index)]
        return output_wire(s.rid, s.index, [token], s.prompt_tokens, s.generated, reason)

    def _end_samples(self, keys: list[tuple[str, int]], message: str) -> dict[bytes, list[dict[str, Any]]]:
        by_client: dict[bytes, list[dict[str, Any]]] = {}
        for key in keys:
            s = self.running.pop(key)
            reason = {"type": "abort", "message": message}
            out = output_wire(s.rid, s.index, [], s.prompt_tokens, s.generated, reason)
            by_client.setdefault(s.identity, []).append(out)
        return by_client

    def _on_abort(self, identity: bytes, msg: AbortRequest) -> None:
        keys = [k for k in self.running if k[0] == msg.rid]
        for owner, outs in self._end_samples(keys, msg.message).items():
            self._reply(owner, outs)

    def _tokens_held(self) -> int:
        return sum(s.prompt_tokens + s.generated for s in self.running.values())

    def _on_load(self, identity: bytes, msg: LoadQuery) -> None:
        page = self.cfg.page_size
        total_pages = self.cfg.max_total_tokens // page
        used_pages = sum(-(-(s.prompt_tokens + s.generated) // page) for s in self.running.values())
        report = LoadReport(
            query_id=msg.query_id,
            num_running=len(self.running),
            num_waiting=0,
            num_free_pages=max(total_pages - used_pages, 0),
            num_evictable_pages=0,
            num_total_pages=total_pages,
            page_size=page,
            num_used_tokens=used_pages * page,
            max_total_num_tokens=self.cfg.max_total_tokens,
        )
        self.sock.send_multipart([identity, encode(report)])

    def _on_flush(self, identity: bytes, msg: FlushCacheRequest) -> None:
        if self.running:
            result = FlushCacheResult(
                msg.query_id, False, "Cache not flushed: there are running or queued requests."
            )
        else:
            result = FlushCacheResult(msg.query_id, True, "Cache flushed.")
        self.sock.send_multipart([identity, encode(result)])

    def _on_info(self, identity: bytes, msg: ServerInfoQuery) -> None:
        cfg = self.cfg
        info = ServerInfo(
            query_id=msg.query_id,
            worker_id=self.worker_id,
            role="mixed",
            args={
                "standin": True,
                "step_ms": cfg.step_ms,
                "page_size": cfg.page_size,
                "context_length": cfg.context_length,
                "max_total_tokens": cfg.max_total_tokens,
            },
            model_path=cfg.model_path,
            tokenizer_path=cfg.tokenizer_path,
            served_model_name=cfg.served_model_name or cfg.model_path,
            model_type=cfg.model_type,
            architectures=list(cfg.architectures),
            context_length=cfg.context_length,
            vocab_size=cfg.vocab_size,
            max_total_num_tokens=cfg.max_total_tokens,
            page_size=cfg.page_size,
            kv_pool_bytes=0,
            weight_version="default",
            version="standin",
        )
        self.sock.send_multipart([identity, encode(info)])

    def _on_update_weights(self, identity: bytes, msg: UpdateWeightsRequest) -> None:
        result = UpdateWeightsResult(msg.query_id, False, "The stand-in engine has no weights to update.")
        self.sock.send_multipart([identity, encode(result)])


# ---------------------------------------------------------------------- process


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
