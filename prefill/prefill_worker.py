"""The prefill worker's loop: the mixed worker's loop (shared/worker/mixed.py) around a PrefillEngine.

    ROUTER socket ──PrefillRequest──▶ engine.add_prefill (refused: PrefillDone ok=False at once)
         ▲                                   │ waiting ─▶ prefilling ─▶ transferring (prefill/prefill_engine.py)
         │ one PrefillDone per request       ▼
         └──────────── owners.pop ◀──── engine.step() / abort / shutdown

What differs from the mixed loop: the answers. A prefill worker sends no tokens (the decode worker
streams them); each PrefillRequest gets exactly one PrefillDone, sent when the worker holds nothing
more for it: after the transfer succeeded or failed, after an AbortRequest, or at once when it is
refused. A GenerateRequest or DecodeRequest is refused with the usual finished RequestOutput (its
sender waits for one). While requests only wait on their transfers, each turn waits on the socket a millisecond
instead of spinning.

In a cluster (`--redis-url`), the engine's radix cache reports the prompt pages it keeps after each
transfer (and what it evicts) to a KV event publisher (shared/cluster/kv_events.py, made in
shared/launch/worker_lifecycle.py): the routers' prefix index sends repeats of a prefix here.
"""

from __future__ import annotations

from pdserve.shared.protocol import PrefillRequest, RequestOutput
from pdserve.shared.worker.mixed import MixedWorker


class PrefillWorker(MixedWorker):
    ROLE = "prefill"

    def __init__(self, engine, sock, metrics, stop, **kwargs):
        super().__init__(engine, sock, metrics, stop, **kwargs)
        self._intake = {PrefillRequest: engine.add_prefill}

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """A prefill engine streams no output (`outputs` is empty): its answers are the PrefillDone
        of the requests that ended, one each, to the client that sent it."""
        for done in self.engine.take_done():
            identity = self.owners.pop(done.rid)
            if identity is not None:
                self.sock.send(identity, done)
