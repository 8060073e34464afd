"""Which client sent which request, so each step's outputs go back to the right socket identity.

Rules:
- a rid is registered only after the engine accepted it, so a refused duplicate rid from another
  client never steals the outputs of the running one;
- an entry lives until all n samples of the request have sent a finished output, then it is gone
  (a rid can be reused afterwards);
- `group` keeps the engine's output order within a client: a client sees its requests' tokens in
  the order the step produced them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pdserve.shared.protocol import RequestOutput

logger = logging.getLogger(__name__)


@dataclass
class _Owner:
    identity: bytes
    samples_left: int  # samples of the request that have not finished yet


class RequestOwners:
    def __init__(self) -> None:
        self._owners: dict[str, _Owner] = {}

    def __len__(self) -> int:
        return len(self._owners)

    def __contains__(self, rid: str) -> bool:
        return rid in self._owners

    def register(self, rid: str, identity: bytes, num_samples: int = 1) -> None:
        self._owners[rid] = _Owner(identity, max(1, num_samples))

    def owner_of(self, rid: str) -> bytes | None:
        owner = self._owners.get(rid)
        return None if owner is None else owner.identity

    def rids_of(self, identity: bytes) -> list[str]:
        """The rids the client `identity` has running."""
        return [rid for rid, owner in self._owners.items() if owner.identity == identity]

    def pop(self, rid: str) -> bytes | None:
        """Forgets rid and returns its client (a request answered by one final message), or None."""
        owner = self._owners.pop(rid, None)
        return None if owner is None else owner.identity

    def group(self, outputs: list[RequestOutput]) -> dict[bytes, list[RequestOutput]]:
        """Splits one step's outputs by client; forgets a rid once its last sample finished.

        Outputs of rids nobody owns (offline warm-up requests) are dropped with a debug line."""
        grouped: dict[bytes, list[RequestOutput]] = {}
        for out in outputs:
            owner = self._owners.get(out.rid)
            if owner is None:
                logger.debug("dropping output of unowned rid %r", out.rid)
                continue
            grouped.setdefault(owner.identity, []).append(out)
            if out.finished:
                owner.samples_left -= 1
                if owner.samples_left <= 0:
                    del self._owners[out.rid]
        return grouped
