"""What the router's control routes share: asking every worker the same thing, optional bodies,
typed fields (their admin key is router/http/auth.py's: they are in its ADMIN_PATHS).

    handles = connected_workers(state)                         # 503 when none is connected
    answers = await ask_each(handles, lambda: FreezeGC(), AdminReply, timeout_s=10)
    failed = failures(answers)                                 # [(worker_id, why)], empty when all succeeded
    body = await read_optional_object(request)                 # {} for an empty body or null

Rules:
- a worker that does not answer within the timeout, or whose connection drops, is a failure
  named by its worker id, like a worker that answers `success: false`;
- `make` builds a fresh message per worker (`query` stamps each with its own query id);
- bodies are optional where SGLang's are (GET routes, `pause_generation`): no body, an empty one
  and JSON `null` are all `{}`; anything else must be a JSON object (400).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web

from pdserve.router.cluster.worker_conn import WorkerUnavailable
from pdserve.router.cluster.worker_pool import WorkerHandle
from pdserve.router.http.limits import MAX_BODY_KEY, http_error, read_json, too_large
from pdserve.router.state import RouterState
from pdserve.shared.protocol import Message

R = TypeVar("R", bound=Message)


def connected_workers(state: RouterState) -> list[WorkerHandle]:
    handles = [h for h in state.pool.workers.values() if h.conn.connected]
    if not handles:
        raise http_error(503, state.pool.why_none())
    return handles


async def ask_one(h: WorkerHandle, msg: Message, reply_type: type[R], timeout_s: float) -> R | str:
    """The worker's reply, or why there is none."""
    try:
        return await h.conn.query(msg, reply_type, timeout_s)
    except (WorkerUnavailable, TimeoutError, asyncio.TimeoutError) as exc:
        return f"no answer ({exc or f'timed out after {timeout_s:g} s'})"


async def ask_each(
    handles: list[WorkerHandle], make: Callable[[], Message], reply_type: type[R], timeout_s: float
) -> list[tuple[WorkerHandle, R | str]]:
    replies = await asyncio.gather(*(ask_one(h, make(), reply_type, timeout_s) for h in handles))
    return list(zip(handles, replies))


def failures(answers: list[tuple[WorkerHandle, Any]]) -> list[tuple[str, str]]:
    """(worker id, why) of each worker that did not answer or answered success False."""
    out = []
    for h, reply in answers:
        if isinstance(reply, str):
            out.append((h.worker_id, reply))
        elif not reply.success:
            out.append((h.worker_id, reply.message))
    return out


def describe(failed: list[tuple[str, str]]) -> str:
    return "; ".join(f"{worker_id}: {why}" for worker_id, why in failed)


async def read_optional_object(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        raw = await request.read()  # aiohttp keeps it: read_json reads the same bytes
    except web.HTTPRequestEntityTooLarge:
        raise too_large(request.app[MAX_BODY_KEY]) from None
    if not raw.strip():
        return {}
    data = await read_json(request)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise http_error(400, f"The request body must be a JSON object, got {type(data).__name__}.")
    return data


def field(body: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    """body[name] when it has the type (bool is not an int here), `default` when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
        raise http_error(400, f"{name} must be {names}, got {type(value).__name__}.")
    return value


_TYPE_NAMES = {str: "a string", bool: "a boolean", int: "an integer", list: "a list", dict: "an object"}
