"""One NCCL communicator with one peer, used in one direction, with its own thread and CUDA streams.

Rank 0 is the sending manager (it made the unique id), rank 1 the receiving one. Every message of
the pair goes through the link's job queue in order, data or not:

- sender job: under the transfer's lock, skip it if the transfer is final (nothing is sent, no
  header); else gather the pages into a ring buffer on the copy stream and synchronize (the pages
  are free once the lock is released), queue the Data header on the control plane, post ncclSend
  on the comm stream. With two ring buffers the gather of message i+1 overlaps the send of i.
- receiver job: post ncclRecv into a ring buffer as soon as the header arrived (up to two ahead),
  then in order: wait for it, scatter into the pages under the transfer's lock unless the transfer
  is final, report `done` to the control plane. A job with no transfer (unknown, failed) still
  receives, so the i-th send always meets the i-th receive and the pair stays in step.

Headers leave in the order sends are posted and receives are posted in the order headers arrive,
which is what matches NCCL's point-to-point operations.

Failure: `abort()` marks the link failed and calls ncclCommAbort (on a helper thread: it may take a
moment), which ends operations stuck on a dead or silent peer; the thread then drops its remaining
jobs. A link blocked in ncclCommInitRank cannot be interrupted (no handle yet): its thread stays
parked until NCCL's bootstrap gives up, while the plane has already failed its transfers.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from pdserve.kvtransfer.layout import MessageSpec, typed_view
from pdserve.kvtransfer.nccl_lib import NcclError, NcclLibrary
from pdserve.kvtransfer.records import InboundTransfer, OutboundTransfer
from pdserve.kvtransfer.staging import gather_pages, scatter_pages
from pdserve.kvtransfer.wire import Data

if TYPE_CHECKING:
    from pdserve.kvtransfer.nccl import NcclDataPlane

logger = logging.getLogger(__name__)

RING = 2
ABORT_LOCK_WAIT_S = 1.0


@dataclass(eq=False)
class SendJob:
    rec: OutboundTransfer
    msg: Data
    spec: MessageSpec
    src_pages: list[int]
    ready_event: Any


@dataclass(eq=False)
class RecvJob:
    rec: InboundTransfer | None  # None: receive and drop the bytes
    msg: Data
    spec: MessageSpec
    dst_pages: list[int]
    done: Callable[[], None] | None


class NcclLink:
    def __init__(
        self,
        plane: NcclDataPlane,
        lib: NcclLibrary,
        peer: str,
        link_id: int,
        uid: bytes,
        rank: int,
        ring_bytes: int,
    ):
        self.plane = plane
        self.host = plane.host
        self.lib = lib
        self.peer = peer
        self.link_id = link_id
        self.uid = uid
        self.rank = rank
        self.ring_bytes = ring_bytes
        self.failed: str | None = None
        self.reported = False  # the plane has handled this link's failure
        self.recs: set[Any] = set()  # transfers with jobs on this link (I/O thread only)
        self._jobs: queue.SimpleQueue[SendJob | RecvJob | None] = queue.SimpleQueue()
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._comm: int | None = None
        self._comm_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"nccl-link-{link_id:x}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def pending(self) -> int:
        return self._pending

    def post(self, job: SendJob | RecvJob) -> None:
        if job.rec is not None:
            if len(self.recs) >= 256:
                self.recs = {r for r in self.recs if not r.dropped}
            self.recs.add(job.rec)
        with self._pending_lock:
            self._pending += 1
        self._jobs.put(job)

    def abort(self, reason: str) -> None:
        """Fails the link; returns at once (the communicator is aborted on a helper thread)."""
        if self.failed is None:
            self.failed = reason
        self._jobs.put(None)
        threading.Thread(target=self._abort_comm, name=f"nccl-abort-{self.link_id:x}", daemon=True).start()

    def _abort_comm(self) -> None:
        # A thread blocked inside an NCCL call holds the lock; ncclCommAbort is what unblocks it,
        # so after a short wait it is called regardless.
        locked = self._comm_lock.acquire(timeout=ABORT_LOCK_WAIT_S)
        try:
            comm, self._comm = self._comm, None
            if comm is not None:
                self.lib.comm_abort(comm)
        except NcclError as exc:
            logger.warning("NCCL link %x: abort: %s", self.link_id, exc)
        finally:
            if locked:
                self._comm_lock.release()

    # ------------------------------------------------------------------ link thread

    def _run(self) -> None:
        try:
            device = self.host.pool.device
            torch.cuda.set_device(device)
            self._comm_stream = torch.cuda.Stream(device)
            self._copy_stream = torch.cuda.Stream(device)
            comm = self.lib.comm_init_rank(2, self.uid, self.rank)
            with self._comm_lock:
                if self.failed is None:
                    self._comm = comm
            if self._comm is None:
                self.lib.comm_abort(comm)
                return
            self._ring = [torch.empty(self.ring_bytes, dtype=torch.uint8, device=device) for _ in range(RING)]
            if self.rank == 0:
                self._run_sender()
            else:
                self._run_receiver()
        except Exception as exc:  # CUDA or NCCL error: the link is finished, its transfers fail
            logger.exception("NCCL link %x with %s failed", self.link_id, self.peer)
            if self.failed is None:
                self.failed = f"NCCL link with {self.peer} failed: {exc}"
        finally:
            if self.failed is None:
                self.failed = "NCCL link closed"
            self.host.call_soon(lambda: self.plane.link_failed(self))

    def _buffer(self, slot: int, nbytes: int) -> torch.Tensor:
        if nbytes <= self.ring_bytes:
            return self._ring[slot]
        return torch.empty(nbytes, dtype=torch.uint8, device=self.host.pool.device)  # one oversize page-layer

    def _nccl(self, op: str, buf: torch.Tensor, nbytes: int) -> None:
        with self._comm_lock:
            if self._comm is None:
                raise NcclError(self.failed or "NCCL link closed")
            call = self.lib.send if op == "send" else self.lib.recv
            call(buf.data_ptr(), nbytes, 1 - self.rank, self._comm, self._comm_stream.cuda_stream)

    def _finished_one(self) -> None:
        with self._pending_lock:
            self._pending -= 1

    def _run_sender(self) -> None:
        in_use: list[tuple[Any, torch.Tensor] | None] = [None] * RING  # (send event, buffer) per slot
        slot = 0
        while True:
            job = self._jobs.get()
            if job is None or self.failed is not None:
                return
            assert isinstance(job, SendJob)
            try:
                if in_use[slot] is not None:
                    in_use[slot][0].synchronize()  # type: ignore[index]  # the slot's previous send is done
                    in_use[slot] = None
                buf = self._buffer(slot, job.msg.nbytes)
                with job.rec.state.lock:
                    if job.rec.state.is_final:
                        continue
                    if job.spec.num_pages:
                        out = typed_view(buf, self.host.layout, job.spec)
                        gather_pages(
                            self.host.pool, job.src_pages, job.spec, out, self._copy_stream, job.ready_event
                        )
                msg = job.msg
                self.host.call_soon(lambda msg=msg: self.host.send(self.peer, msg))
                if msg.nbytes:
                    self._nccl("send", buf, msg.nbytes)
                    event = torch.cuda.Event()
                    event.record(self._comm_stream)
                    in_use[slot] = (event, buf)
                    slot = (slot + 1) % RING
            finally:
                self._finished_one()

    def _run_receiver(self) -> None:
        inflight: deque[tuple[RecvJob, torch.Tensor | None, Any]] = deque()
        slot = 0
        stopping = False
        while not stopping or inflight:
            if self.failed is not None:
                return
            job: SendJob | RecvJob | None = None
            if not stopping and len(inflight) < RING:
                try:
                    job = self._jobs.get(block=not inflight)
                    stopping = job is None
                except queue.Empty:
                    job = None
            if isinstance(job, RecvJob):
                buf, event = None, None
                if job.msg.nbytes:
                    buf = self._buffer(slot, job.msg.nbytes)
                    slot = (slot + 1) % RING
                    self._nccl("recv", buf, job.msg.nbytes)
                    event = torch.cuda.Event()
                    event.record(self._comm_stream)
                inflight.append((job, buf, event))
            elif inflight:
                self._complete(*inflight.popleft())

    def _complete(self, job: RecvJob, buf: torch.Tensor | None, event: Any) -> None:
        try:
            if event is not None:
                event.synchronize()
            if self.failed is not None:
                return  # aborted: the bytes may be incomplete, write nothing
            rec = job.rec
            if rec is not None and buf is not None:
                with rec.state.lock:
                    if not rec.state.is_final:
                        src = typed_view(buf, self.host.layout, job.spec)
                        scatter_pages(self.host.pool, job.dst_pages, job.spec, src, self._copy_stream)
            if job.done is not None:
                self.host.call_soon(job.done)
        finally:
            self._finished_one()
