"""The router's aiohttp application: state, middlewares, native and OpenAI routes, life cycle.

    app = build_app(RouterArgs(worker_addrs=["tcp://127.0.0.1:30001"]))
    web.run_app(app, handler_cancellation=True)   # router/cli.py does this, with uvloop

Start-up: the worker pool starts polling; static `--worker-addr` workers are dialled (each is
asked for its ServerInfo until it answers); with `--redis-url` a ClusterView
(router/cluster/cluster_view.py) feeds the pool from Redis membership (and the prefill pool's
prefix index, router/cluster/precise_prefix_index.py where present, feeds `--prefill-policy
cache_aware`); with `--tokenizer-path`/`--model-path` the tokenizer loads at once, else when the
first worker reports its model. Clean-up stops the view, then closes every
worker connection (requests still in flight end with an abort).

Run it with `handler_cancellation=True`: a client that disconnects then cancels its handler, which
aborts its request on the worker instead of generating for no one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import web

from pdserve.router.cluster.policies import CacheAwarePolicy
from pdserve.router.http.auth import KEYS_KEY, auth_middleware
from pdserve.router.http.limits import MAX_BODY_KEY, body_limit_middleware
from pdserve.router.http.middleware import METRICS_KEY, error_middleware, metrics_middleware
from pdserve.router.native.expert_record import add_expert_record_routes
from pdserve.router.native.pause import add_pause_routes
from pdserve.router.native.profile import add_profile_routes
from pdserve.router.native.routes import add_native_routes
from pdserve.router.native.runtime import add_runtime_routes
from pdserve.router.native.sagemaker import add_sagemaker_routes
from pdserve.router.native.weights import add_weight_routes
from pdserve.router.openai.routes import add_openai_routes
from pdserve.router.openapi.document import add_openapi_routes
from pdserve.router.state import STATE_KEY, RouterArgs, RouterState

logger = logging.getLogger(__name__)

CLUSTER_VIEW_KEY = web.AppKey("pdserve_cluster_view", object)
PREFIX_INDEX_KEY = web.AppKey("pdserve_prefix_index", object)


def build_app(args: RouterArgs) -> web.Application:
    """The app for `args` (ValueError for invalid arguments). Nothing runs until it is started."""
    state = RouterState(args)
    app = web.Application(
        client_max_size=args.max_body_bytes,
        middlewares=[metrics_middleware, error_middleware, auth_middleware, body_limit_middleware],
    )
    app[STATE_KEY] = state
    app[METRICS_KEY] = state.metrics
    app[MAX_BODY_KEY] = args.max_body_bytes
    app[KEYS_KEY] = (args.api_key, args.admin_api_key)
    add_native_routes(app)
    # SGLang's control routes (weights for RL loops, pause, profiler, run-time switches)
    for add_routes in (
        add_weight_routes,
        add_pause_routes,
        add_profile_routes,
        add_runtime_routes,
        add_expert_record_routes,
    ):
        add_routes(app)
    add_openai_routes(app)
    add_sagemaker_routes(app)
    add_openapi_routes(app)  # its document lists every route registered above
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
        from pdserve.router.cluster.cluster_view import ClusterView  # redis only where it is used

        view = ClusterView(args.redis_url, membership=state.pool)
        await view.start()
        app[CLUSTER_VIEW_KEY] = view
        await _start_prefix_index(app, state)


async def _start_prefix_index(app: web.Application, state: RouterState) -> None:
    """The prefill pool's Redis prefix index feeds `--prefill-policy cache_aware`, where it exists;
    without it (or until it runs) the policy uses its router-side tree. It starts once a prefill
    worker told its page size (the index hashes prompts page by page)."""
    if not isinstance(state.prefill_policy, CacheAwarePolicy):
        return
    try:
        from pdserve.router.cluster.precise_prefix_index import PrefixIndex
    except ImportError:
        return
    app[PREFIX_INDEX_KEY] = asyncio.create_task(_run_prefix_index(state, PrefixIndex), name="prefix-index")


async def _run_prefix_index(state: RouterState, index_class) -> None:
    page_size = 0
    while not page_size:
        page_size = next(
            (
                h.server_info.page_size
                for h in state.pool.workers.values()
                if h.server_info is not None and h.role == "prefill"
            ),
            0,
        )
        if not page_size:
            await asyncio.sleep(0.5)
    index = index_class(state.args.redis_url, page_size)
    try:
        await index.start()
    except Exception as exc:  # noqa: BLE001 (routing still works, by the router's own tree)
        logger.warning("the prefix index did not start (%s): prefill choice by the router's own tree", exc)
        return
    state.prefill_policy.matcher = index.match_tokens
    try:
        await asyncio.Event().wait()  # until cancelled at clean-up
    finally:
        state.prefill_policy.matcher = None
        await index.stop()


async def _stop(app: web.Application) -> None:
    view = app.get(CLUSTER_VIEW_KEY)
    if view is not None:
        await view.stop()
    index_task = app.get(PREFIX_INDEX_KEY)
    if index_task is not None:
        index_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await index_task
    await app[STATE_KEY].pool.close()
