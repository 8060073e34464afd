"""Which rank moves which KV heads to which rank, between two workers of any tensor-parallel widths.

A worker's KV endpoint (`kv_addr` in Redis; the router passes it through untouched) names every
rank's managers: `tp-kv:` and a JSON object, or a plain backend endpoint for a single rank that
offers nothing else (what a worker without this layer advertises). Per rank:
- `full`: a manager over the rank's whole pool. Two workers of one width pair rank i with rank i:
  the same heads on both sides, whole pages.
- `heads`: the global KV heads the rank holds, in pool order; `slices`: its manager moves single
  heads' slices of the pool (kvtransfer/head_slice.py), which only some backends do. Two workers
  of different widths move each head a decode rank holds from one prefill rank that holds it, a
  leg between the two ranks' `full` managers over that head's slices: with replicated heads (fewer
  KV heads than ranks) decode rank j takes the j-th holder modulo their number, a choice both
  sides compute alike.

A pair that can do neither (different widths on a backend without head slices) is refused with a
KVTransferError that names both widths and the backend, when the request's handle is made: no
page moves. Legs come in one order on both sides: decode rank, then head.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from pdserve.kvtransfer.base import KVTransferError

ENDPOINT_PREFIX = "tp-kv:"


@dataclass(frozen=True)
class RankEndpoint:
    full: str
    heads: list[int] = field(default_factory=list)
    slices: bool = False


@dataclass(frozen=True)
class WorkerKVEndpoint:
    backend: str
    ranks: list[RankEndpoint]

    @property
    def width(self) -> int:
        return len(self.ranks)

    @property
    def moves_heads(self) -> bool:
        return all(r.slices and r.heads for r in self.ranks)

    def encode(self) -> str:
        return ENDPOINT_PREFIX + json.dumps(asdict(self), separators=(",", ":"))

    @staticmethod
    def parse(text: str) -> WorkerKVEndpoint:
        if not text.startswith(ENDPOINT_PREFIX):
            return WorkerKVEndpoint("", [RankEndpoint(text)])
        try:
            raw = json.loads(text[len(ENDPOINT_PREFIX) :])
            return WorkerKVEndpoint(raw["backend"], [RankEndpoint(**r) for r in raw["ranks"]])
        except (ValueError, KeyError, TypeError) as exc:
            raise KVTransferError(f"malformed KV endpoint {text[:200]!r}: {exc}") from exc


@dataclass(frozen=True)
class Leg:
    """One backend transfer of a request: this worker's `rank`, its whole pool (`head` None) or the
    slice of global KV head `head`, with the peer rank's manager at `peer`."""

    rank: int
    head: int | None
    peer: str


def plan_legs(own: WorkerKVEndpoint, peer: WorkerKVEndpoint, own_sends: bool) -> list[Leg]:
    """This worker's legs of one request with `peer` (see the module rules)."""
    if own.width == peer.width and all(
        not a.heads or not b.heads or a.heads == b.heads for a, b in zip(own.ranks, peer.ranks)
    ):
        return [Leg(i, None, p.full) for i, p in enumerate(peer.ranks)]
    prefill, decode = (own, peer) if own_sends else (peer, own)
    if not (own.moves_heads and peer.moves_heads):
        backends = sorted({b or "its own" for b in (own.backend, peer.backend)})
        raise KVTransferError(
            f"a prefill worker of --tp {prefill.width} cannot send KV to a decode worker of --tp "
            f"{decode.width} over the {' / '.join(backends)} backend: different widths move KV head "
            "slices, which only the fake and zmq backends do"
        )
    legs = []
    for j, d_rank in enumerate(decode.ranks):
        for head in d_rank.heads:
            holders = [i for i, p_rank in enumerate(prefill.ranks) if head in p_rank.heads]
            if not holders:
                raise KVTransferError(f"the prefill worker holds no KV head {head} (another model?)")
            i = holders[j % len(holders)]
            if own_sends:
                legs.append(Leg(i, head, d_rank.full))
            else:
                legs.append(Leg(j, head, prefill.ranks[i].full))
    return legs
