"""Sharing a KV pool with the other processes of one host, and mapping a peer's pool here.

    shared = export_pool(pool)                       # receiver, once per manager: a msgpack-able dict
    why = unreachable_reason(shared, here())         # sender: None when it can try to map it
    peer_kv = map_pool(shared, local_pool)           # sender: the peer's `kv` tensor, writable here

Two kinds, by the pool's device:
- "cuda": the pool's storage through a CUDA IPC memory handle (torch's `_share_cuda_`, opened with
  `_new_shared_cuda` on the sender's own device: same GPU, or a peer GPU the sender's device can
  reach). CUDA refuses to open a handle in the process that made it, so a pool exported by this
  very process is found in this process's table of exports instead.
- "host": CPU pools are moved (in place, once) into shared memory (`_share_fd_cpu_`) and reached by
  other processes as /proc/<pid>/fd/<fd>. It runs the same backend on CPU (CI, CPU workers on one
  host); `auto` still picks zmq for CPU workers.

A mapping lives as long as the returned tensor: dropping it closes the IPC mapping (or unmaps the
file), which is what lets the GPU memory of a receiver that died be reclaimed.

Rules: the same host is the same Linux boot id; the export names its process and a token, and the
write gate's token (ipc_gate.py) proves a sender reached that process. Torch and CUDA are touched
only when a pool is exported or mapped.
"""

from __future__ import annotations

import os
import secrets
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from pdserve.kvtransfer.layout import dtype_name
from pdserve.shared.engine.kv_pool import PagedKVPool

# Pools this process exported, by token: a peer manager in this same process maps them directly.
_EXPORTED_HERE: weakref.WeakValueDictionary[str, torch.Tensor] = weakref.WeakValueDictionary()


class PoolShareError(RuntimeError):
    """A pool that cannot be exported, or a peer's that cannot be mapped here (the message says why)."""


def host_id() -> str:
    """This machine's identity for "same host": the kernel's boot id (shared by its containers)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return f"no-boot-id:{os.uname().nodename}"


def _device_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


@dataclass(frozen=True)
class Here:
    """What a sender knows of itself when judging a peer's export."""

    host: str
    pid: int
    kind: str  # "cuda" | "host"
    device_index: int | None  # the local pool's CUDA device
    visible_uuids: tuple[str, ...]  # every CUDA device this process sees, by index
    peer_access: dict[str, bool]  # uuid -> whether this device can reach it (same device: True)


def here(pool: PagedKVPool) -> Here:
    if pool.device.type != "cuda":
        return Here(host_id(), os.getpid(), "host", None, (), {})
    index = pool.device.index if pool.device.index is not None else torch.cuda.current_device()
    uuids = tuple(_device_uuid(i) for i in range(torch.cuda.device_count()))
    access = {
        uuid: i == index or bool(torch.cuda.can_device_access_peer(index, i)) for i, uuid in enumerate(uuids)
    }
    return Here(host_id(), os.getpid(), "cuda", index, uuids, access)


def export_pool(pool: PagedKVPool) -> dict[str, Any]:
    """Makes `pool.kv` mappable by other processes of this host; returns its msgpack-able description."""
    kv = pool.kv
    shared: dict[str, Any] = {
        "host": host_id(),
        "pid": os.getpid(),
        "token": secrets.token_hex(8),
        "dtype": dtype_name(kv.dtype),
        "shape": list(kv.shape),
        "stride": list(kv.stride()),
        "offset": kv.storage_offset(),
    }
    storage = kv.untyped_storage()
    try:
        if kv.is_cuda:
            device, handle, size, offset, ref_handle, ref_offset, event_handle, event_sync = (
                storage._share_cuda_()
            )
            shared.update(
                kind="cuda",
                uuid=_device_uuid(kv.device.index),
                cuda=[int(device), bytes(handle), int(size), int(offset), bytes(ref_handle),
                      int(ref_offset), bytes(event_handle or b""), bool(event_sync)],
            )  # fmt: skip
        else:
            fd, size = storage._share_fd_cpu_()  # moves the storage into shared memory, in place
            shared.update(kind="host", fd=int(fd), nbytes=int(size))
    except (RuntimeError, OSError) as exc:
        raise PoolShareError(f"cannot share the KV pool with other processes: {exc}") from exc
    _EXPORTED_HERE[shared["token"]] = kv
    return shared


def unreachable_reason(shared: dict[str, Any], me: Here) -> str | None:
    """Why this process cannot write into the exported pool (None: it can try). Pure: no I/O."""
    if shared.get("host") != me.host:
        return "the peer is on another host"
    if shared.get("kind") != me.kind:
        return f"the peer's pool is a {shared.get('kind')} pool, this one a {me.kind} pool"
    if me.kind == "cuda" and shared.get("pid") != me.pid:
        uuid = shared.get("uuid")
        if uuid not in me.visible_uuids:
            return f"the peer's GPU {uuid} is not visible to this process (CUDA_VISIBLE_DEVICES)"
        if not me.peer_access.get(uuid, False):
            return f"this GPU cannot reach the peer's GPU {uuid} (no peer access)"
    return None


def map_pool(shared: dict[str, Any], pool: PagedKVPool) -> torch.Tensor:
    """The exported pool as a tensor writable from here (on `pool`'s device for CUDA)."""
    local = _EXPORTED_HERE.get(shared["token"])
    if local is not None and shared.get("pid") == os.getpid():
        return local
    dtype = getattr(torch, shared["dtype"])
    try:
        if shared["kind"] == "cuda":
            _, handle, size, offset, ref_handle, ref_offset, event_handle, event_sync = shared["cuda"]
            index = pool.device.index if pool.device.index is not None else torch.cuda.current_device()
            # Opened on our own device: for a peer GPU, CUDA maps it with peer access enabled.
            storage = torch.UntypedStorage._new_shared_cuda(
                index, handle, size, offset, ref_handle, ref_offset, event_handle, event_sync
            )
            where = torch.device("cuda", index)
        else:
            path = f"/proc/{int(shared['pid'])}/fd/{int(shared['fd'])}"
            storage = torch.UntypedStorage.from_file(path, shared=True, nbytes=int(shared["nbytes"]))
            where = torch.device("cpu")
        kv = torch.empty(0, dtype=dtype, device=where)
        kv.set_(storage, int(shared["offset"]), tuple(shared["shape"]), tuple(shared["stride"]))
    except (RuntimeError, OSError) as exc:
        raise PoolShareError(f"cannot map the peer's KV pool: {exc}") from exc
    return kv
