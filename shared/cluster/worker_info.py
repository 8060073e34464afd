"""What a worker publishes about itself in Redis, and the key schema.

Membership: one hash per worker at `pdserve:worker:<worker_id>` holding the fields of `WorkerInfo`
(values JSON-encoded), refreshed every `HEARTBEAT_S` seconds with a TTL of `TTL_S`: a worker that
misses about three beats disappears on its own. Routers scan `pdserve:worker:*` every beat (and may
subscribe to `pdserve:events` where workers announce joins and clean leaves for faster reaction).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

KEY_PREFIX = "pdserve:worker:"
EVENTS_CHANNEL = "pdserve:events"
HEARTBEAT_S = 1.0
TTL_S = 3.0


@dataclass
class WorkerInfo:
    worker_id: str
    role: str  # mixed | prefill | decode
    zmq_addr: str  # tcp://host:port of the worker's ROUTER socket
    http_addr: str = ""  # http://host:port for /health and /metrics ("" when off)
    kv_addr: str = ""  # the KV transfer endpoint (KVManager.endpoint) of a prefill or decode worker
    model_path: str = ""
    served_model_name: str = ""
    max_total_num_tokens: int = 0
    context_length: int = 0
    page_size: int = 0
    # load, refreshed with each heartbeat
    num_running: int = 0
    num_waiting: int = 0
    num_free_pages: int = 0
    num_total_pages: int = 0
    started_at: float = 0.0

    @property
    def key(self) -> str:
        return KEY_PREFIX + self.worker_id

    def to_redis(self) -> dict[str, str]:
        return {k: json.dumps(v) for k, v in asdict(self).items()}

    @classmethod
    def from_redis(cls, raw: dict[Any, Any]) -> WorkerInfo:
        known = {f.name for f in fields(cls)}
        values = {}
        for k, v in raw.items():
            k = k.decode() if isinstance(k, bytes) else k
            if k in known:
                values[k] = json.loads(v.decode() if isinstance(v, bytes) else v)
        return cls(**values)


class Membership(Protocol):
    """The router's side of membership: whatever watches the cluster (Redis, a static list) calls these.

    add_worker is idempotent (a known worker_id with a new zmq_addr is replaced); remove_worker of an
    unknown id is a no-op: `expired=False` means the worker said it leaves, `expired=True` that its
    key is gone without a word (missed beats, or Redis lost it: the membership decides from its own
    evidence, e.g. a live connection); update_load refreshes the load fields of a known worker.
    """

    async def add_worker(self, info: WorkerInfo) -> None: ...

    async def remove_worker(self, worker_id: str, expired: bool = False) -> None: ...

    def update_load(self, info: WorkerInfo) -> None: ...
