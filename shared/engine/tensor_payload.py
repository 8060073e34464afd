"""Reading SGLang's `serialized_named_tensors` (`/update_weights_from_tensor`) without running code.

    named = decode_named_tensors(entry)      # [(name, tensor), ...]; raises TensorPayloadError

An entry is what SGLang's clients send for one rank: the base64 text (or the bytes) of a
`multiprocessing.reduction.ForkingPickler` pickle of a list of (name, tensor) pairs. Such a pickle
holds handles, not values: a CPU tensor names a shared-memory segment, a CUDA tensor a CUDA IPC
handle, so the sender must keep its tensors alive until the update is answered, and both ends
must be on one host.

Rules:
- the pickle is read by an unpickler that builds only what tensors need (torch's rebuild
  functions for shared CPU and CUDA storage, storage and tensor classes, dtypes, torch.Size);
  anything else (a function, a class of another library) is a TensorPayloadError naming it, never
  imported or called: a plain `pickle.loads` of a request body would run whatever it names;
- CPU tensors must be shared with `torch.multiprocessing.set_sharing_strategy("file_system")`:
  the default strategy passes file descriptors over a socket that only the sender's own child
  processes may open, so it is refused with that advice;
- the result must be a list (or tuple) of (str, tensor) pairs.
"""

from __future__ import annotations

import base64
import binascii
import collections
import io
import pickle
from typing import Any

import torch
from torch.multiprocessing import reductions

FD_ADVICE = (
    "CPU tensors shared by file descriptor cannot be opened by another process tree: call "
    "torch.multiprocessing.set_sharing_strategy('file_system') before serializing them"
)

_REBUILDERS = {
    "rebuild_tensor": reductions.rebuild_tensor,
    "rebuild_cuda_tensor": reductions.rebuild_cuda_tensor,
    "rebuild_storage_filename": reductions.rebuild_storage_filename,
    "rebuild_storage_empty": reductions.rebuild_storage_empty,
    "rebuild_typed_storage": reductions.rebuild_typed_storage,
    "rebuild_typed_storage_child": reductions.rebuild_typed_storage_child,
}
_CLASSES = {
    ("torch", "Size"): torch.Size,
    ("torch", "Tensor"): torch.Tensor,
    ("torch", "UntypedStorage"): torch.UntypedStorage,
    ("torch", "TypedStorage"): torch.TypedStorage,
    ("torch.storage", "UntypedStorage"): torch.UntypedStorage,
    ("torch.storage", "TypedStorage"): torch.TypedStorage,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class TensorPayloadError(ValueError):
    """The entry is not a list of shared tensors pdserve can open; `str()` is for the client."""


class _TensorUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "torch.multiprocessing.reductions" and name in _REBUILDERS:
            return _REBUILDERS[name]
        if (module, name) in _CLASSES:
            return _CLASSES[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "torch.multiprocessing.reductions" and name == "rebuild_storage_fd":
            raise TensorPayloadError(FD_ADVICE)
        raise TensorPayloadError(
            f"the payload names {module}.{name}, which is not part of a shared tensor "
            "(only ForkingPickler pickles of (name, tensor) pairs are read)"
        )


def _entry_bytes(entry: str | bytes) -> bytes:
    if isinstance(entry, bytes):
        return entry
    try:
        return base64.b64decode(entry, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise TensorPayloadError(f"the entry is not base64 text: {exc}") from None


def decode_named_tensors(entry: str | bytes) -> list[tuple[str, torch.Tensor]]:
    """The (name, tensor) pairs of one rank's entry; raises TensorPayloadError (see the rules)."""
    data = _entry_bytes(entry)
    try:
        obj = _TensorUnpickler(io.BytesIO(data)).load()
    except TensorPayloadError:
        raise
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, IndexError) as exc:
        raise TensorPayloadError(f"the entry is not a readable pickle: {type(exc).__name__}: {exc}") from None
    except (OSError, RuntimeError) as exc:  # a shared segment that is gone (the sender freed it)
        raise TensorPayloadError(f"a shared tensor could not be opened: {exc}") from None
    if not isinstance(obj, (list, tuple)):
        raise TensorPayloadError(
            f"the entry holds a {type(obj).__name__}, not a list of (name, tensor) pairs"
        )
    pairs: list[tuple[str, torch.Tensor]] = []
    for item in obj:
        if not (
            isinstance(item, (list, tuple))
            and len(item) == 2
            and isinstance(item[0], str)
            and isinstance(item[1], torch.Tensor)
        ):
            raise TensorPayloadError("every item of the entry must be a (name, tensor) pair")
        pairs.append((item[0], item[1].detach()))
    return pairs
