"""What the cuda_ipc process tests (tests/unit/test_kvtransfer_cuda_ipc_procs.py on CPU shared memory,
tests/gpu/test_kvtransfer_cuda_ipc.py on one GPU) ask of their peer processes
(tests/helpers/kv_transfer_peer.py through kv_peer_process.PeerProcess).

    send, recv = transfer_request("r0", src, dst, chunks=[[3, 5]], dst_pages=[9, 2], seed=7)
    pairs = random_requests(src, dst, seed, random.Random(1), dst_free, "a", num_pages=96, sizes=(1, 3, 7))
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

from tests.helpers.kv_peer_process import PeerProcess

# a manager's counters with nothing in flight and nothing held (the peer's `stats` command)
IDLE = {"senders": 0, "receivers": 0, "early": 0, "sending": 0, "peer_refs": 0, "gate_slots": 0}


def transfer_request(
    rid: str, src: str, dst: str, chunks: list[list[int]], dst_pages: list[int], seed: int, **hold
) -> tuple[dict, dict]:
    """The sender's and the receiver's halves of one transfer of `chunks` into `dst_pages`."""
    src_pages = [p for c in chunks for p in c]
    send = {"rid": rid, "dest": dst, "chunks": chunks, "first_output": {"token": 7, "rid": rid}, **hold}
    recv = {"rid": rid, "src": src, "pages": dst_pages, "expect": {"seed": seed, "src_pages": src_pages}}
    return send, recv


def random_requests(
    src: str,
    dst: str,
    seed: int,
    rng: random.Random,
    dst_free: list[int],
    prefix: str,
    num_pages: int,
    sizes: tuple[int, ...],
) -> list[tuple[dict, dict]]:
    """One transfer per size: odd page counts, random page order on both sides, 1-3 chunks, a
    reserve of 0-2 receiver pages beyond the pages sent (left untouched)."""
    src_free = list(range(1, num_pages))
    rng.shuffle(src_free)
    out = []
    for i, n in enumerate(sizes):
        src_pages = [src_free.pop() for _ in range(n)]
        cuts = sorted(rng.sample(range(1, n), min(n - 1, rng.randint(0, 2)))) if n > 1 else []
        chunks = [src_pages[a:b] for a, b in zip([0, *cuts], [*cuts, n], strict=True)]
        dst_pages = [dst_free.pop() for _ in range(n + rng.randint(0, 2))]
        out.append(transfer_request(f"{prefix}{i}", src, dst, chunks, dst_pages, seed))
    return out


def manager_stats(peer: PeerProcess) -> dict[str, int]:
    return peer.call("stats", manager="m")["stats"]


def peer_processes(**options) -> Iterator[Callable[[], PeerProcess]]:
    """A fixture body: yields a starter of peer processes, closes every one started afterwards."""
    started: list[PeerProcess] = []

    def start() -> PeerProcess:
        started.append(PeerProcess(**options))
        return started[-1]

    yield start
    for peer in started:
        peer.close()
