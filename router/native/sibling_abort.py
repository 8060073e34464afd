"""`/abort_request` across the processes of `router --processes N`: a request runs in one of them.

    aborted = abort_here(state, rid=None, abort_all=True)     # this process's requests
    runner = await start_control(state, role.control_socket(role.index))
    siblings = SiblingAborts(role.sibling_sockets())
    known = await siblings.abort(rid, abort_all)             # passed on to every sibling

Each child listens on a Unix socket in the parent's private run directory (router/processes.py),
serving one route, `POST /abort` {"rid"} or {"abort_all": true} -> {"known": bool}. It is apart from
the public port so that a sibling's call never reaches the same process, never needs the admin key
and is never passed on again. Works without Redis (static `--worker-addr` clusters have none).
A sibling that does not answer in `SIBLING_TIMEOUT_S` (restarting) is skipped: its requests ended
with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

import aiohttp
from aiohttp import web

from pdserve.router.state import STATE_KEY, RouterState

SIBLING_TIMEOUT_S = 2.0
SIBLINGS_KEY = web.AppKey("pdserve_sibling_aborts", object)


def abort_here(state: RouterState, rid: str | None, abort_all: bool) -> bool:
    """Aborts rid (or every request) in this process; whether it ran any of them."""
    if abort_all:
        rids = state.dispatcher.active_rids()
        for active in rids:
            state.dispatcher.abort(active)
        return bool(rids)
    return rid is not None and state.dispatcher.abort(rid)


async def _handle_control_abort(request: web.Request) -> web.Response:
    body = await request.json()
    rid, abort_all = body.get("rid"), bool(body.get("abort_all", False))
    known = abort_here(request.app[STATE_KEY], rid if isinstance(rid, str) else None, abort_all)
    return web.json_response({"known": known})


async def start_control(state: RouterState, socket_path: str) -> web.AppRunner:
    """Serves the siblings' route on socket_path until the runner is cleaned up."""
    app = web.Application()
    app[STATE_KEY] = state
    app.router.add_post("/abort", _handle_control_abort)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    with contextlib.suppress(FileNotFoundError):  # left by this index's predecessor
        os.unlink(socket_path)
    await web.UnixSite(runner, socket_path).start()
    return runner


class SiblingAborts:
    """Passes an abort on to every sibling's control socket (one session each, opened at first use)."""

    def __init__(self, sockets: list[str]):
        self.sockets = sockets
        self._sessions: dict[str, aiohttp.ClientSession] = {}

    def _session(self, path: str) -> aiohttp.ClientSession:
        if path not in self._sessions:
            self._sessions[path] = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=path),
                timeout=aiohttp.ClientTimeout(total=SIBLING_TIMEOUT_S),
            )
        return self._sessions[path]

    async def _one(self, path: str, payload: dict) -> bool:
        try:
            async with self._session(path).post("http://router/abort", json=payload) as resp:
                return resp.status == 200 and bool((await resp.json()).get("known"))
        except (aiohttp.ClientError, asyncio.TimeoutError, TimeoutError, ValueError):
            return False

    async def abort(self, rid: str | None, abort_all: bool) -> bool:
        """Whether any sibling ran rid (or any request, with abort_all)."""
        payload = {"abort_all": True} if abort_all else {"rid": rid}
        answers = await asyncio.gather(*(self._one(p, payload) for p in self.sockets))
        return any(answers)

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()
