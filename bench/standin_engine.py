"""A stand-in engine process for router benchmarks: the worker protocol, no model (no torch).

A benchmark tool, never a test double for the real worker: it answers the router's messages on a
bound ROUTER socket exactly as `worker --role mixed` does and emits tokens at a fixed rate, so what
a benchmark measures above it is the router's own cost.

    python -m pdserve.bench.standin_process --port 0 --step-ms 20 --tokenizer-path DIR

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
- The process around it (flags, socket, ready line, signals) is standin_process.py's; the frames
  it sends are built in standin_wire.py.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from pdserve.bench.standin_wire import batch_frame, output_wire
from pdserve.shared.protocol import (
    AbortRequest,
    FlushCacheRequest,
    FlushCacheResult,
    GenerateRequest,
    LoadQuery,
    LoadReport,
    Message,
    ProtocolError,
    ServerInfo,
    ServerInfoQuery,
    UpdateWeightsRequest,
    UpdateWeightsResult,
    decode,
    encode,
)

DEFAULT_MAX_NEW_TOKENS = 128
SHUTDOWN_MESSAGE = "worker is shutting down"


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
            self._reply(identity, [output_wire(str(msg.rid), 0, [], 0, 0, reason, reason["message"])])
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
