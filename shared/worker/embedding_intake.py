"""EmbedRequests at a worker's door, and their answers on the way out.

    intake = EmbeddingIntake(engine, sock.send, role="mixed")
    intake.on_request(identity, msg, accepting=True)   # into the engine, or refused at once
    intake.deliver()                                   # after each step: the answers of finished ones

Rules:
- every EmbedRequest gets exactly one EmbeddingOutput carrying its `query_id` (the router waits
  for that reply): the embedding, or `error` when it is refused (a decode worker, a generation
  model, bad ids, a duplicate rid, a worker shutting down) or aborted;
- a decode worker refuses embeddings: they are prefill-only work, for prefill and mixed workers.
"""

from __future__ import annotations

from collections.abc import Callable

from pdserve.shared.engine.request_validation import RequestError
from pdserve.shared.protocol import EmbeddingOutput, EmbedRequest, Message

DECODE_REFUSAL = (
    "A decode worker does not serve embeddings: they are prefill-only work, for prefill and mixed workers."
)


class EmbeddingIntake:
    def __init__(self, engine, send: Callable[[bytes, Message], bool], role: str):
        self.engine = engine
        self._send = send
        self.role = role
        self._owners: dict[str, tuple[bytes, int]] = {}  # rid -> (client identity, query_id)

    def on_request(self, identity: bytes, msg: EmbedRequest, accepting: bool) -> None:
        if not isinstance(msg.rid, str) or not msg.rid:
            self._refuse(identity, msg, "rid must be a non-empty string.")
        elif self.role == "decode":
            self._refuse(identity, msg, DECODE_REFUSAL)
        elif not accepting:
            self._refuse(identity, msg, "worker is shutting down")
        elif msg.rid in self._owners:
            self._refuse(identity, msg, f"Duplicate request id {msg.rid!r}: it is still running.")
        else:
            try:
                self.engine.add_embedding(msg)
            except RequestError as exc:
                self._refuse(identity, msg, str(exc))
                return
            self._owners[msg.rid] = (identity, msg.query_id)

    def deliver(self) -> None:
        """Sends the answer of every embedding request the engine finished to its client."""
        for out in self.engine.take_embeddings():
            owner = self._owners.pop(out.rid, None)
            if owner is not None:
                out.query_id = owner[1]
                self._send(owner[0], out)

    def _refuse(self, identity: bytes, msg: EmbedRequest, message: str) -> None:
        self._send(identity, EmbeddingOutput(rid=str(msg.rid), query_id=msg.query_id, error=message))
