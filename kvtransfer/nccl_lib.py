"""The few NCCL calls the nccl backend needs, through ctypes: no build step, no CUDA at import.

Why not torch.distributed: a process group is process-wide and its NCCL watchdog tears the process
down when a peer dies mid-operation, while a decode worker must survive any prefill worker's death
and talk to many of them. `torch.cuda.nccl` has no send/recv. Plain NCCL gives one independent
communicator per (prefill, decode) pair, made from a 128-byte unique id that pdserve ships over its
own ZMQ control channel, and `ncclCommAbort` to unblock a pair whose peer died.

The library is the one torch already loaded (`libnccl.so.2` from the nvidia-nccl wheel, found by
its soname), else the wheel's file, else `PDSERVE_NCCL_LIBRARY`.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from functools import lru_cache
from pathlib import Path

NCCL_UINT8 = 1  # ncclDataType_t: bytes travel as bytes
_NCCL_SUCCESS = 0
_UNIQUE_ID_BYTES = 128


class NcclError(RuntimeError):
    pass


class NcclUniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_byte * _UNIQUE_ID_BYTES)]


def _candidates() -> list[str]:
    paths = []
    if os.environ.get("PDSERVE_NCCL_LIBRARY"):
        paths.append(os.environ["PDSERVE_NCCL_LIBRARY"])
    paths.append("libnccl.so.2")
    spec = importlib.util.find_spec("nvidia.nccl") if importlib.util.find_spec("nvidia") else None
    for location in (spec.submodule_search_locations or []) if spec else []:
        paths.append(str(Path(location) / "lib" / "libnccl.so.2"))
    return paths


class NcclLibrary:
    def __init__(self) -> None:
        errors = []
        for path in _candidates():
            try:
                self._lib = ctypes.CDLL(path)
                self.path = path
                break
            except OSError as exc:
                errors.append(f"{path}: {exc}")
        else:
            raise NcclError("cannot load NCCL: " + "; ".join(errors))
        lib = self._lib
        c_int, c_size_t, c_void_p = ctypes.c_int, ctypes.c_size_t, ctypes.c_void_p
        lib.ncclGetErrorString.restype = ctypes.c_char_p
        lib.ncclGetErrorString.argtypes = [c_int]
        self._declare("ncclGetVersion", [ctypes.POINTER(c_int)])
        self._declare("ncclGetUniqueId", [ctypes.POINTER(NcclUniqueId)])
        self._declare("ncclCommInitRank", [ctypes.POINTER(c_void_p), c_int, NcclUniqueId, c_int])
        self._declare("ncclCommAbort", [c_void_p])
        self._declare("ncclCommDestroy", [c_void_p])
        self._declare("ncclCommGetAsyncError", [c_void_p, ctypes.POINTER(c_int)])
        self._declare("ncclSend", [c_void_p, c_size_t, c_int, c_int, c_void_p, c_void_p])
        self._declare("ncclRecv", [c_void_p, c_size_t, c_int, c_int, c_void_p, c_void_p])

    def _declare(self, name: str, argtypes: list) -> None:
        fn = getattr(self._lib, name)
        fn.restype = ctypes.c_int
        fn.argtypes = argtypes

    def _check(self, name: str, result: int) -> None:
        if result != _NCCL_SUCCESS:
            text = self._lib.ncclGetErrorString(result).decode(errors="replace")
            raise NcclError(f"{name} failed: {text} ({result})")

    def version(self) -> int:
        value = ctypes.c_int()
        self._check("ncclGetVersion", self._lib.ncclGetVersion(ctypes.byref(value)))
        return value.value

    def unique_id(self) -> bytes:
        """A fresh id; the calling process hosts the communicator's bootstrap (rank 0 makes it)."""
        uid = NcclUniqueId()
        self._check("ncclGetUniqueId", self._lib.ncclGetUniqueId(ctypes.byref(uid)))
        return bytes(uid.internal)

    def comm_init_rank(self, nranks: int, uid: bytes, rank: int) -> int:
        """Blocks until all `nranks` ranks joined (run it off the I/O thread); the comm handle."""
        if len(uid) != _UNIQUE_ID_BYTES:
            raise NcclError(f"an NCCL unique id has {_UNIQUE_ID_BYTES} bytes, got {len(uid)}")
        comm = ctypes.c_void_p()
        uid_struct = NcclUniqueId()
        ctypes.memmove(uid_struct.internal, uid, _UNIQUE_ID_BYTES)
        self._check(
            "ncclCommInitRank", self._lib.ncclCommInitRank(ctypes.byref(comm), nranks, uid_struct, rank)
        )
        assert comm.value is not None
        return comm.value

    def send(self, ptr: int, nbytes: int, peer: int, comm: int, stream: int) -> None:
        self._check("ncclSend", self._lib.ncclSend(ptr, nbytes, NCCL_UINT8, peer, comm, stream))

    def recv(self, ptr: int, nbytes: int, peer: int, comm: int, stream: int) -> None:
        self._check("ncclRecv", self._lib.ncclRecv(ptr, nbytes, NCCL_UINT8, peer, comm, stream))

    def async_error(self, comm: int) -> int:
        value = ctypes.c_int()
        self._check("ncclCommGetAsyncError", self._lib.ncclCommGetAsyncError(comm, ctypes.byref(value)))
        return value.value

    def comm_abort(self, comm: int) -> None:
        """Frees the communicator and ends its pending operations (peer dead or link dropped)."""
        self._check("ncclCommAbort", self._lib.ncclCommAbort(comm))


@lru_cache(maxsize=1)
def load_nccl() -> NcclLibrary:
    """The process's NCCL (loaded once: the shared library is process-wide anyway)."""
    return NcclLibrary()
