"""The decode worker's loop: the mixed worker's loop (shared/worker/mixed.py) around a DecodeEngine.

    ROUTER socket ──DecodeRequest / GenerateRequest──▶ engine.add_remote / add_request
         ▲                                                │ prealloc ─▶ waiting_for_kv ─▶ running
         │ one OutputBatch per client per step            ▼ (or local prefill: waiting ─▶ prefilling ─▶ running)
         └───────────── RequestOwners.group ◀──── engine.step()

A DecodeRequest is answered like a GenerateRequest: RequestOutputs from the first token on (which
the prefill worker sampled), one OutputBatch per client per step; a failed transfer is a finished
output with finish_reason abort and "KV transfer failed: ...". While requests only wait on their
transfers, each turn waits on the socket a millisecond instead of spinning.
"""

from __future__ import annotations

from pdserve.shared.protocol import DecodeRequest
from pdserve.shared.worker.mixed import MixedWorker


class DecodeWorker(MixedWorker):
    ROLE = "decode"

    def __init__(self, engine, sock, metrics, stop, **kwargs):
        super().__init__(engine, sock, metrics, stop, **kwargs)
        self._intake[DecodeRequest] = engine.add_remote
