"""What the SGLang control-route tests send and read: a tensor-update payload as SGLang's clients
serialize it, and a native stream with the arrival time of each chunk.

    payload = serialize_named_tensors([("model.norm.weight", torch.ones(64))])
    last = stream_with_arrivals(url, input_ids, {"max_new_tokens": 8}, arrivals)  # arrivals: [(t, n_ids)]
"""

from __future__ import annotations

import base64
import io
import json
import time
from multiprocessing.reduction import ForkingPickler
from typing import Any

import requests
import torch.multiprocessing

# Every object serialized stays referenced for the session: a shared tensor's memory is unlinked once
# its last reference goes, and the workers open it only when the request reaches them (a caller's
# `serialize([(name, torch.ones(64))])` would otherwise free it at once: under load, a second worker
# found it gone). SGLang's clients keep their tensors alive the same way until the call returns.
_KEPT: list[Any] = []


def serialize_named_tensors(obj: Any, strategy: str = "file_system") -> str:
    """SGLang's MultiprocessingSerializer.serialize(obj, output_str=True), with CPU tensors shared
    by `strategy` (file_system: named shared memory, which another process tree can open)."""
    _KEPT.append(obj)
    before = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy(strategy)
    try:
        buf = io.BytesIO()
        ForkingPickler(buf).dump(obj)
    finally:
        torch.multiprocessing.set_sharing_strategy(before)
    return base64.b64encode(buf.getvalue()).decode()


def stream_with_arrivals(url: str, input_ids: list[int], params: dict, arrivals: list) -> dict:
    """Streams /generate; appends (monotonic time, output ids so far) per chunk; returns the last chunk."""
    last: dict = {}
    with requests.post(
        url + "/generate",
        json={"input_ids": input_ids, "sampling_params": params, "stream": True},
        stream=True,
        timeout=300,
    ) as resp:
        assert resp.status_code == 200, resp.text
        for line in resp.iter_lines():
            if line.startswith(b"data: {"):
                last = json.loads(line[len(b"data: ") :])
                arrivals.append((time.monotonic(), len(last["output_ids"])))
    return last
