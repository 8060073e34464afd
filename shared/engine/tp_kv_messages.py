"""Control messages of a tensor-parallel worker's KV transfers, rank 0 to the followers.

They travel on the step channel (tp_steps.py), in order with the forward passes: a follower has
run the pass that wrote a request's pages before it acts on the `SendKV` that names them. A
follower answers on a channel of its own (tp_kv_follower.py). Fields are msgpack-able as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class OpenKV:
    """Open the rank's KV managers (kvtransfer/rank_kv.py) and report their endpoints."""

    backend: str
    worker_id: str
    host: str
    report_address: str
    options: dict[str, Any]
    heartbeat_interval_s: float
    heartbeat_timeout_s: float
    transfer_timeout_s: float


@dataclass(frozen=True)
class StartKV:
    """A request's legs (kvtransfer/tp_legs.py) as [index, rank, head or None, peer endpoint]."""

    tid: int
    rid: str
    sends: bool
    legs: list[list[Any]]


@dataclass(frozen=True)
class SendKV:
    tid: int
    pages: list[int]
    is_last: bool
    first_output: dict[str, Any] | None


@dataclass(frozen=True)
class InitKV:
    tid: int
    pages: list[int]


@dataclass(frozen=True)
class AbortKV:
    tid: int
    reason: str


@dataclass(frozen=True)
class CloseKV:
    """Close the rank's KV managers (the worker stops)."""


KV_CONTROL_MESSAGES: dict[str, type] = {
    "kv_open": OpenKV,
    "kv_start": StartKV,
    "kv_send": SendKV,
    "kv_init": InitKV,
    "kv_abort": AbortKV,
    "kv_close": CloseKV,
}
