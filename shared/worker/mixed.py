"""The mixed worker's loop: prefill and decode in one engine, like a classic SGLang server.

Life cycle (one thread drives the engine; the HTTP thread only reads published metrics):

    ROUTER socket ──frames──▶ dispatch table ──▶ engine.add_request / abort / load / flush_cache
         ▲                                              │
         │ one OutputBatch per client per step          ▼
         └───────────── RequestOwners.group ◀──── engine.step()

Each turn of the loop:
  1. polls the socket, without waiting while the engine has work, else up to `idle_poll_ms`;
  2. handles every queued frame: a request goes to the engine call its kind has in the role's
     intake table (mixed: GenerateRequest; the roles add PrefillRequest, DecodeRequest), or is
     refused at once as its kind is answered (request_intake.py), an EmbedRequest to the engine
     of an embedding model (embedding_intake.py; one EmbeddingOutput each), AbortRequest (outputs go to the rid's owner), LoadQuery →
     LoadReport, FlushCacheRequest → FlushCacheResult, ServerInfoQuery → ServerInfo,
     UpdateWeightsRequest / UpdateWeightsFromTensor → UpdateWeightsResult once done,
     PauseGeneration / ContinueGeneration → AdminReply, and the control messages of control.py
     (weight version, profiler, gc, parameter read-out); undecodable frames are logged and dropped;
  3. moves a weights update on (update_queue.py: while it drains, new GenerateRequests are held,
     not refused, and enter the engine after the swap);
  4. unless generation is paused, runs one engine step and sends each client ONE OutputBatch
     holding all its outputs of the step (a client whose connection is gone gets nothing: what it
     had running is aborted);
  5. publishes a metrics snapshot (every `metrics_interval_s`, and at once when the engine goes idle),
     and the load numbers to the Redis heartbeat when the worker is registered.

Pausing (PauseGeneration): no engine step runs until ContinueGeneration; GenerateRequests that
arrive meanwhile are held in arrival order (the weights update's queue) and enter the engine on
continue. Mode "abort" first aborts every live request (their clients get the abort outputs, as
SGLang's pause does); mode "in_place" first reads the decode step in flight, then leaves the live
requests where they are, pages and all. Aborts, queries and weight updates are served while
paused; a weights update fails at once while requests are paused in place (they cannot drain).
In P/D, a request paused while its KV transfer runs may fail it (`--kv-transfer-timeout`).

Shutdown (`stop` set by SIGTERM/SIGINT) drains first: the worker leaves the cluster (its Redis key
is deleted and "leave" announced, so routers send it nothing new), intake closes (new
GenerateRequests get "worker is shutting down", which routers retry elsewhere), and the loop goes
on stepping what it runs, answering aborts and queries, until nothing is left or `shutdown_drain_s`
passes. Then frames still queued are handled with intake closed, a pending weights update fails,
held and live requests are aborted and their clients get the abort outputs (a router moves such a
stream to another worker), and `serve` returns; the caller closes the socket (with linger, so
they leave). A second signal exits at once (shared/launch/worker_lifecycle.py).

No client can kill the loop: a handler's exception is logged and answered where the message says
who to answer. An exception inside `engine.step()` aborts all live requests with an internal-error
message (their state cannot be trusted) and the loop goes on; if even that fails, it propagates.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from pdserve.shared.engine.request_validation import RequestError
from pdserve.shared.protocol import (
    AbortRequest,
    AdminReply,
    ContinueGeneration,
    EmbedRequest,
    FlushCacheRequest,
    GenerateRequest,
    LoadQuery,
    Message,
    OutputBatch,
    PauseGeneration,
    RequestMessage,
    RequestOutput,
    ServerInfoQuery,
    UpdateWeightsFromTensor,
    UpdateWeightsRequest,
)
from pdserve.shared.worker.control import WorkerControl
from pdserve.shared.worker.embedding_intake import EmbeddingIntake
from pdserve.shared.worker.metrics import EngineSnapshot, WorkerMetrics
from pdserve.shared.worker.owners import RequestOwners
from pdserve.shared.worker.request_intake import (
    REQUEST_KINDS,
    held_refusal,
    not_served,
    refusal,
    salvage_request,
)
from pdserve.shared.worker.update_queue import DEFAULT_DRAIN_TIMEOUT_S, WeightUpdates
from pdserve.shared.worker.zmq_io import Envelope, RouterSocket

logger = logging.getLogger(__name__)

SHUTDOWN_MESSAGE = "worker is shutting down"
PAUSE_ABORT_MESSAGE = "Aborted: generation was paused (/pause_generation)."
PAUSE_MODES = ("abort", "in_place")
CLIENT_GONE_MESSAGE = "the client that sent the request is gone"
DEFAULT_SHUTDOWN_DRAIN_S = 30.0  # what a SIGTERM leaves running requests to finish before aborting them
TRANSFER_POLL_MS = 1  # socket wait per turn while live requests only wait on KV transfers


class MixedWorker:
    """The mixed role's loop; the prefill and decode workers (prefill/prefill_worker.py, decode/decode_worker.py)
    reuse it with their own engine, ROLE, extra handlers and answers."""

    ROLE = "mixed"

    def __init__(
        self,
        engine,
        sock: RouterSocket,
        metrics: WorkerMetrics,
        stop: threading.Event,
        idle_poll_ms: int = 50,
        metrics_interval_s: float = 0.25,
        worker_id: str = "",
        worker_flags: dict[str, Any] | None = None,
        registration=None,  # a shared.cluster.WorkerRegistration, when the worker is in a cluster
        drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
        shutdown_drain_s: float = DEFAULT_SHUTDOWN_DRAIN_S,
    ):
        self.engine = engine
        self.sock = sock
        self.metrics = metrics
        self.stop = stop
        self.worker_id = worker_id
        self.worker_flags = dict(worker_flags or {})
        self.registration = registration
        self.paused = False
        self.updates = WeightUpdates(
            engine, sock.send, self._deliver, self._on_request, drain_timeout_s, lambda: self.paused
        )
        self.control = WorkerControl(engine, sock.send, worker_id)
        self.shutdown_drain_s = shutdown_drain_s
        self.idle_poll_ms = idle_poll_ms
        self.metrics_interval_s = metrics_interval_s
        self.owners = RequestOwners()
        self.embeddings = EmbeddingIntake(engine, sock.send, self.ROLE)
        self.accepting = True
        self._last_publish = float("-inf")
        # which engine call takes which request kind (the roles have their own); others are refused
        self._intake: dict[type[Message], Callable[[Any], None]] = {GenerateRequest: engine.add_request}
        self._handlers: dict[type[Message], Callable[[bytes, Any], None]] = {
            **dict.fromkeys(REQUEST_KINDS, self._on_request),
            EmbedRequest: lambda identity, msg: self.embeddings.on_request(identity, msg, self.accepting),
            AbortRequest: self._on_abort,
            LoadQuery: self._on_load,
            FlushCacheRequest: self._on_flush,
            ServerInfoQuery: self._on_server_info,
            UpdateWeightsRequest: self._on_update_weights,
            UpdateWeightsFromTensor: self._on_update_weights,
            PauseGeneration: self._on_pause,
            ContinueGeneration: self._on_continue,
            **self.control.handlers(),
        }

    # ------------------------------------------------------------------ loop

    def serve(self) -> None:
        """Runs until `stop` is set, then shuts down as the module docstring says."""
        self._publish_metrics(force=True)
        busy = False
        while not self.stop.is_set():
            if self.sock.poll(self._poll_ms(busy)):
                self._drain_socket()
            self.updates.advance()
            ran = self._runnable()
            if ran:
                self._step()
            # going idle publishes at once, also after work that came and finished in one step:
            # a scrape after the last output sees the final counts
            was_busy, busy = busy or ran, self._runnable()
            self._publish_metrics(force=was_busy and not busy)
        self._drain()
        self._shutdown()

    def _drain(self) -> None:
        """Leaves the cluster, closes intake, and finishes what runs within shutdown_drain_s."""
        self.accepting = False
        if self.registration is not None:
            self.registration.close()
        deadline = time.monotonic() + self.shutdown_drain_s
        if self.engine.has_work():
            logger.info("draining: %d request(s) left to finish", len(self.owners))
        while self.engine.has_work() and time.monotonic() < deadline:
            if self.sock.poll(self._poll_ms(True)):
                self._drain_socket()
            self._step()
            self._publish_metrics()
        if self.engine.has_work():
            logger.warning("drain timeout (%g s): aborting what still runs", self.shutdown_drain_s)

    def _drain_socket(self) -> None:
        while (env := self.sock.recv_nowait()) is not None:
            self._handle(env)

    def _handle(self, env: Envelope) -> None:
        if env.message is None:
            logger.warning("dropping undecodable frame from %s: %s", env.identity.hex(), env.error)
            salvaged = salvage_request(env.frame)
            if salvaged is not None and salvaged[1] not in self.owners:
                kind, rid = salvaged
                self._refuse(env.identity, kind, rid, f"Malformed {kind.__name__}: {env.error}")
            return
        handler = self._handlers.get(type(env.message))
        if handler is None:
            logger.warning(
                "dropping %s from %s: not a request", type(env.message).__name__, env.identity.hex()
            )
            return
        try:
            handler(env.identity, env.message)
        except Exception:  # a client must never kill the loop
            logger.exception("handling %s from %s failed", type(env.message).__name__, env.identity.hex())
            msg = env.message
            rid = msg.request.rid if isinstance(msg, REQUEST_KINDS) else None
            if isinstance(rid, str) and rid not in self.owners:
                self._refuse(env.identity, type(msg), rid, "Internal error handling the request.")

    def _runnable(self) -> bool:
        """Whether a step has anything to do now (nothing runs while generation is paused)."""
        return not self.paused and self.engine.has_work()

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:
            logger.exception("engine step failed; aborting every live request")
            outputs = self.engine.abort_all(f"Internal error in the worker: {type(exc).__name__}: {exc}")
        self._deliver(outputs)
        self.embeddings.deliver()
        self.control.profiler.after_step()

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for identity, outs in self.owners.group(outputs).items():
            self._send(identity, outs)

    def _send(self, identity: bytes, outputs: list[RequestOutput]) -> None:
        if not self.sock.send(identity, OutputBatch(outputs=outputs)):
            self._client_gone(identity)

    def _client_gone(self, identity: bytes) -> None:
        """Its connection dropped (the router died, or its heartbeats went unanswered; a router
        that is still alive has moved these requests on): what it had running is aborted, pages freed."""
        rids = self.owners.rids_of(identity)
        if not rids:
            return
        logger.warning("client %s is gone: aborting its %d request(s)", identity.hex(), len(rids))
        for rid in rids:
            self.engine.abort(rid, CLIENT_GONE_MESSAGE)  # its final outputs have nobody to go to
            self.owners.pop(rid)

    def _refuse(self, identity: bytes, kind: type[Message], rid: str, message: str) -> None:
        """Answers a request that never entered the engine, as its kind is answered."""
        self._answer(identity, refusal(kind, rid, message))

    def _refuse_held(self, identity: bytes, msg: RequestMessage, message: str) -> None:
        """Answers a request aborted while held for a weights update."""
        self._answer(identity, held_refusal(msg, message))

    def _answer(self, identity: bytes, reply: Message) -> None:
        if not self.sock.send(identity, reply) and isinstance(reply, OutputBatch):
            self._client_gone(identity)

    def _poll_ms(self, busy: bool) -> int:
        """How long a turn waits on the socket: not at all while there is compute to do, a moment
        while requests only wait on KV transfers (the roles), `idle_poll_ms` when idle."""
        if not busy:  # also while paused: nothing to compute until a message comes
            return self.idle_poll_ms
        return 0 if self.engine.has_compute() else TRANSFER_POLL_MS

    def _publish_metrics(self, force: bool = False) -> None:
        """Snapshots the engine for /metrics; throttled because load() walks the cache's counters."""
        now = time.monotonic()
        if force or now - self._last_publish >= self.metrics_interval_s:
            snapshot = EngineSnapshot.of(self.engine)
            self.metrics.publish(snapshot, now)
            if self.registration is not None:
                self.registration.publish_load(
                    num_running=snapshot.load.num_running,
                    num_waiting=snapshot.load.num_waiting + self.updates.num_held,
                    num_free_pages=snapshot.load.num_free_pages + snapshot.load.num_evictable_pages,
                )
            self._last_publish = now

    def _shutdown(self) -> None:
        self.accepting = False
        self._drain_socket()
        for identity, msg in self.updates.close(SHUTDOWN_MESSAGE):
            self._refuse(identity, type(msg), msg.request.rid, SHUTDOWN_MESSAGE)
        aborted = self.engine.abort_all(SHUTDOWN_MESSAGE)
        if aborted:
            logger.info("shutdown: aborted %d live request(s)", len(aborted))
        self._deliver(aborted)
        self.embeddings.deliver()
        if self.control.profiler.running:  # a trace nobody stopped is still written
            self.control.profiler.stop()
        self._publish_metrics(force=True)

    # ------------------------------------------------------------------ handlers

    def _on_request(self, identity: bytes, msg: RequestMessage) -> None:
        kind, gen = type(msg), msg.request
        if not isinstance(gen.rid, str) or not gen.rid:
            self._refuse(identity, kind, str(gen.rid), "rid must be a non-empty string.")
            return
        intake = self._intake.get(kind)
        if intake is None:
            self._refuse(identity, kind, gen.rid, not_served(self.ROLE, kind, list(self._intake)))
            return
        if not self.accepting:
            self._refuse(identity, kind, gen.rid, SHUTDOWN_MESSAGE)
            return
        if not isinstance(gen.sampling_params, dict):
            self._refuse(identity, kind, gen.rid, "sampling_params must be an object (a dict).")
            return
        if self.updates.holding or self.paused:  # it waits, and enters after the swap / on continue
            self.updates.hold(identity, msg)
            return
        try:
            intake(msg)
        except RequestError as exc:
            logger.info("refused request %r: %s", gen.rid, exc)
            self._refuse(identity, kind, gen.rid, str(exc))
            return
        self.owners.register(gen.rid, identity, int(gen.sampling_params.get("n", 1)))

    def _on_abort(self, identity: bytes, msg: AbortRequest) -> None:
        held = self.updates.take_held(msg.rid)
        if held is not None:
            self._refuse_held(identity, held, msg.message)
            return
        self._deliver(self.engine.abort(msg.rid, msg.message))
        self.embeddings.deliver()  # an aborted embedding request's answer (its error) goes now

    def _on_load(self, identity: bytes, msg: LoadQuery) -> None:
        report = self.engine.load(msg.query_id)
        report.num_waiting += self.updates.num_held
        self.sock.send(identity, report)

    def _on_flush(self, identity: bytes, msg: FlushCacheRequest) -> None:
        self.sock.send(identity, self.engine.flush_cache(msg.query_id))

    def _on_server_info(self, identity: bytes, msg: ServerInfoQuery) -> None:
        info = self.engine.server_info(msg.query_id)
        info.worker_id = self.worker_id
        info.role = self.ROLE
        info.args = {**info.args, **self.worker_flags}
        self.sock.send(identity, info)

    def _on_update_weights(
        self, identity: bytes, msg: UpdateWeightsRequest | UpdateWeightsFromTensor
    ) -> None:
        self.updates.submit(identity, msg)

    def _on_pause(self, identity: bytes, msg: PauseGeneration) -> None:
        if msg.mode not in PAUSE_MODES:
            reply = AdminReply(
                msg.query_id, False, f"mode must be one of {list(PAUSE_MODES)}, got {msg.mode!r}."
            )
            self.sock.send(identity, reply)
            return
        if msg.mode == "abort":
            self._deliver(self.engine.abort_all(PAUSE_ABORT_MESSAGE))
        else:
            self._deliver(self.engine.finish_in_flight())
        self.paused = True
        logger.info("generation paused (%s)", msg.mode)
        self.sock.send(identity, AdminReply(msg.query_id, True, "Generation paused successfully."))

    def _on_continue(self, identity: bytes, msg: ContinueGeneration) -> None:
        was_paused, self.paused = self.paused, False
        if was_paused:
            logger.info("generation continues")
        self.updates.release_held()
        self.sock.send(identity, AdminReply(msg.query_id, True, "Generation continued successfully."))
