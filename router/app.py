"""The router's aiohttp application: state, middlewares, native and OpenAI routes, life cycle.

    app = build_app(RouterArgs(worker_addrs=["tcp://127.0.0.1:30001"]))
    web.run_app(app, handler_cancellation=True)   # router/cli.py does this, with uvloop

Start-up: the worker pool starts polling; static `--worker-addr` workers are dialled (each is
asked for its ServerInfo until it answers); with `--redis-url` a ClusterView (router/cluster_view.py)
feeds the pool from Redis membership; with `--tokenizer-path`/`--model-path` the tokenizer loads
at once, else when the first worker reports its model. Clean-up stops the view, then closes every
worker connection (requests still in flight end with an abort).

Run it with `handler_cancellation=True`: a client that disconnects then cancels its handler, which
aborts its request on the worker instead of generating for no one.
"""

from __future__ import annotations

import logging

from aiohttp import web

from pdserve.router.auth import KEYS_KEY, auth_middleware
from pdserve.router.limits import MAX_BODY_KEY, body_limit_middleware
from pdserve.router.middleware import METRICS_KEY, error_middleware, metrics_middleware
from pdserve.router.native_api import add_native_routes
from pdserve.router.openai.routes import add_openai_routes
from pdserve.router.state import STATE_KEY, RouterArgs, RouterState

logger = logging.getLogger(__name__)

CLUSTER_VIEW_KEY = web.AppKey("pdserve_cluster_view", object)


def build_app(args: RouterArgs) -> web.Application:
    """The app for `args` (ValueError for invalid arguments). Nothing runs until it is started."""
    state = RouterState(args)
    app = web.Application(
        client_max_size=args.max_body_bytes,
        middlewares=[metrics_middleware, error_middleware, body_limit_middleware, auth_middleware],
    )
    app[STATE_KEY] = state
    app[METRICS_KEY] = state.metrics
    app[MAX_BODY_KEY] = args.max_body_bytes
    app[KEYS_KEY] = (args.api_key, args.admin_api_key)
    add_native_routes(app)
    add_openai_routes(app)
    app.on_startup.append(_start)
    app.on_cleanup.append(_stop)
    return app


async def _start(app: web.Application) -> None:
    state = app[STATE_KEY]
    args = state.args
    await state.pool.start()
    for address in args.worker_addrs:
        state.pool.add_static(address)
    if args.tokenizer_path or args.model_path:
        state.start_tokenizer_load()
    if args.redis_url:
        from pdserve.router.cluster_view import ClusterView  # redis only where it is used

        view = ClusterView(args.redis_url, membership=state.pool)
        await view.start()
        app[CLUSTER_VIEW_KEY] = view


async def _stop(app: web.Application) -> None:
    view = app.get(CLUSTER_VIEW_KEY)
    if view is not None:
        await view.stop()
    await app[STATE_KEY].pool.close()
