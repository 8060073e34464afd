"""The zmq backend: KV pages as zero-copy ZMQ frames over TCP (CPU to CPU, GPU via host, any hosts).

Control is control.py's (Ready/Bound/Data/Ack/Abort, heartbeats); this file is the data plane:

- sender: each message (a block of pages x a group of layers, at most `slab_bytes`) is gathered
  into one host slab (pinned when the pool is on CUDA; one index_select per layer and K/V) and sent
  as frame 1 of the Data message straight from the slab (`copy=False`); the slab is reused once
  ZMQ's tracker reports the bytes gone. At most `max_slabs` messages are in flight per manager.
- receiver: frame 1 is viewed in place as the pool dtype (raw bytes: bfloat16 never meets numpy)
  and scattered into the receiver's pages by page id, under the transfer's lock.

Module name: `pdserve.kvtransfer.zmq` is this file; inside the package `import zmq` is absolute
(Python 3), so it is pyzmq. Only running this file as a script from its own directory would clash.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from pdserve.kvtransfer.base import KVTransferConfig
from pdserve.kvtransfer.control import ControlPlaneManager
from pdserve.kvtransfer.data_plane import DataPlane
from pdserve.kvtransfer.layout import MessageSpec, typed_view
from pdserve.kvtransfer.plane_host import PlaneHost
from pdserve.kvtransfer.records import InboundTransfer, OutboundTransfer
from pdserve.kvtransfer.staging import HostStagingPool, gather_pages, scatter_pages
from pdserve.kvtransfer.wire import Data
from pdserve.shared.engine.kv_pool import PagedKVPool

DEFAULT_SLAB_BYTES = 32 << 20
DEFAULT_MAX_SLABS = 4


class ZmqDataPlane(DataPlane):
    moves_head_slices = True  # its copies index the pool (staging.py), views included

    def __init__(self, host: PlaneHost, slab_bytes: int, max_slabs: int):
        super().__init__(host)
        on_cuda = host.pool.device.type == "cuda"
        self.staging = HostStagingPool(slab_bytes, max_slabs, pin=on_cuda)
        self.stream = torch.cuda.Stream(host.pool.device) if on_cuda else None

    def payload_error(self, msg: Data, payload: list) -> str | None:
        if msg.nbytes == 0:
            return None if not payload else f"{len(payload)} frames with an empty message"
        if len(payload) != 1:
            return f"{len(payload)} payload frames, expected 1"
        if len(payload[0].buffer) != msg.nbytes:
            return f"{len(payload[0].buffer)} payload bytes, the header says {msg.nbytes}"
        return None

    def submit(
        self, rec: OutboundTransfer, msg: Data, spec: MessageSpec, src_pages: list[int], ready_event: Any
    ) -> bool:
        if spec.num_pages == 0:
            if not rec.state.is_final:
                self.host.send(rec.peer, msg)
            return True
        slab = self.staging.acquire(msg.nbytes)
        if slab is None:
            return False
        with rec.state.lock:
            if rec.state.is_final:
                self.staging.release(slab)
                return True
            out = typed_view(slab.buffer, rec.region.layout, spec)
            gather_pages(rec.region.pool, src_pages, spec, out, self.stream, ready_event)
        frame = memoryview(slab.buffer[: msg.nbytes].numpy())
        self.staging.release(slab, self.host.send(rec.peer, msg, frame))
        return True

    def receive(
        self,
        rec: InboundTransfer,
        msg: Data,
        spec: MessageSpec,
        dst_pages: list[int],
        payload: list,
        done: Callable[[], None],
    ) -> None:
        if spec.num_pages:
            raw = torch.frombuffer(payload[0].buffer, dtype=torch.uint8)
            region = rec.region
            with rec.state.lock:
                if not rec.state.is_final:
                    scatter_pages(
                        region.pool, dst_pages, spec, typed_view(raw, region.layout, spec), self.stream
                    )
        done()

    def discard(self, peer: str, msg: Data, payload: list) -> None:
        pass  # the frames are freed with the message


class ZmqKVManager(ControlPlaneManager):
    """KV manager of the zmq backend. `host` must be an address peers can reach (it is bound and
    advertised as `endpoint`); port 0 picks a free port."""

    def __init__(
        self,
        pool: PagedKVPool,
        worker_id: str,
        config: KVTransferConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        slab_bytes: int = DEFAULT_SLAB_BYTES,
        max_slabs: int = DEFAULT_MAX_SLABS,
    ):
        super().__init__(
            pool,
            worker_id,
            config,
            host,
            port,
            max_message_bytes=slab_bytes,
            make_plane=lambda host: ZmqDataPlane(host, slab_bytes, max_slabs),
        )
