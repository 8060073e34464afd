"""The prefill worker's loop: the mixed worker's loop (shared/worker/mixed.py) around a PrefillEngine.

    ROUTER socket ──PrefillRequest──▶ engine.add_request (refused: PrefillDone ok=False at once)
         ▲                                   │ waiting ─▶ prefilling ─▶ transferring (prefill/engine.py)
         │ one PrefillDone per request       ▼
         └──────────── owners.pop ◀──── engine.step() / abort / shutdown

What differs from the mixed loop: the answers. A prefill worker sends no tokens (the decode worker
streams them); each PrefillRequest gets exactly one PrefillDone, sent when the worker holds nothing
more for it: after the transfer succeeded or failed, after an AbortRequest, or at once when it is
refused. A plain GenerateRequest is refused with the usual finished RequestOutput (its sender waits
for one). While requests only wait on their transfers, each turn waits on the socket a millisecond
instead of spinning.

In a cluster (`--redis-url`), the engine's radix cache reports the prompt pages it keeps after each
transfer (and what it evicts) to a KV event publisher (shared/kv_events.py, made in
shared/worker/lifecycle.py): the routers' prefix index sends repeats of a prefix here.
"""

from __future__ import annotations

from pdserve.shared.protocol import GenerateRequest, PrefillDone, PrefillRequest
from pdserve.shared.worker.mixed import MixedWorker, error_output

NOT_A_PREFILL_REQUEST = (
    "A prefill worker serves PrefillRequest only; send generation to a decode or mixed worker."
)


class PrefillWorker(MixedWorker):
    ROLE = "prefill"

    def __init__(self, engine, sock, metrics, stop, **kwargs):
        super().__init__(engine, sock, metrics, stop, **kwargs)
        self._handlers[PrefillRequest] = self._on_generate
        self._handlers[GenerateRequest] = self._on_plain_generate

    def _on_plain_generate(self, identity: bytes, msg: GenerateRequest) -> None:
        self._send(identity, [error_output(str(msg.rid), NOT_A_PREFILL_REQUEST)])

    def _deliver(self, outputs: list[PrefillDone]) -> None:  # type: ignore[override]
        for done in outputs:
            identity = self.owners.pop(done.rid)
            if identity is not None:
                self.sock.send(identity, done)

    def _refuse(self, identity: bytes, rid: str, message: str) -> None:
        self.sock.send(identity, PrefillDone(rid=rid, ok=False, reason=message))

    def _refuse_held(self, identity: bytes, msg: GenerateRequest, message: str) -> None:
        self._refuse(identity, msg.rid, message)
