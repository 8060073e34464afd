"""Read-only native routes: model and server info, health, load, Prometheus metrics.

- `/get_model_info`: exactly the key set of SGLang's newest docs (model_path, is_generation,
  tokenizer_path, preferred_sampling_params, weight_version, has_image_understanding,
  has_audio_understanding, model_type, architectures);
- `/get_server_info` and `/server_info`: the router's arguments (keys masked), the model facts,
  version, `max_total_num_tokens` (summed over serving workers), memory pool sizes and arguments of
  every worker (from its ServerInfo), live workers by role, `router_processes` and this process's
  `router_process_index` (`--processes N`: each process answers for itself, and sees every worker);
  and what SGLang's tools read there: `internal_states`, one entry per worker that serves
  generation (its arguments, `last_gen_throughput` from its load reports, `memory_usage`), and
  with prefill/decode workers the `prefill` and `decode` lists of those workers' own server info;
- `/health`: 200 with an empty body when the router knows the model, has its tokenizer and at least
  one worker can take a request; 503 otherwise, saying why;
- `/health_generate`: generates one token through a real worker (200, empty body) or 503;
- `/get_load`: a fresh LoadQuery to every connected worker, one entry per worker;
- `/metrics`: the router's own registry, worker gauges refreshed at each scrape (with `--processes N`,
  summed over the processes: router/serving/metrics.py).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from typing import Any

from aiohttp import web

from pdserve.router.cluster.worker_conn import WorkerUnavailable
from pdserve.router.cluster.worker_pool import WorkerHandle
from pdserve.router.processes import ProcessRole
from pdserve.router.serving.generator_api import GenerateInput, GenerationError
from pdserve.router.serving.metrics import CONTENT_TYPE, RouterMetrics
from pdserve.router.state import STATE_KEY, VERSION, RouterState
from pdserve.shared.protocol import LoadQuery, LoadReport

HEALTH_GENERATE_TIMEOUT_S = 30.0
PROCESS_ROLE_KEY = web.AppKey("pdserve_process_role", ProcessRole)
LOAD_QUERY_TIMEOUT_S = 5.0


async def handle_model_info(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    facts = state.facts
    return web.json_response(
        {
            "model_path": state.model_path,
            "is_generation": facts.is_generation if facts else True,
            "tokenizer_path": state.tokenizer_path,
            "preferred_sampling_params": state.preferred_sampling_params,
            "weight_version": state.weight_version,
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": facts.model_type if facts else None,
            "architectures": facts.architectures if facts else None,
        }
    )


def _worker_entry(h: WorkerHandle) -> dict[str, Any]:
    info = h.server_info
    load = h.last_load
    return {
        "worker_id": h.worker_id,
        "role": h.role,
        "zmq_addr": h.info.zmq_addr,
        "http_addr": h.info.http_addr,
        "connected": h.conn.connected,
        "leaving": h.leaving,
        "circuit": h.breaker.state.name.lower(),
        "router_inflight": h.inflight,
        "num_running_reqs": load.num_running if load else None,
        "num_waiting_reqs": load.num_waiting if load else None,
        "max_total_num_tokens": info.max_total_num_tokens if info else None,
        "page_size": info.page_size if info else None,
        "kv_pool_bytes": info.kv_pool_bytes if info else None,
        "context_length": info.context_length if info else None,
        "weight_version": info.weight_version if info else None,
        "version": info.version if info else None,
        "args": info.args if info else None,
    }


def _gib(nbytes: int) -> float:
    return round(nbytes / (1 << 30), 2)


def internal_state(h: WorkerHandle) -> dict[str, Any]:
    """One worker's entry of `internal_states`, as an SGLang scheduler reports its own: its
    arguments, `avg_spec_accept_length`, `last_gen_throughput` (tokens/s) and `memory_usage` (GB,
    token capacity)."""
    info = h.server_info
    entry: dict[str, Any] = dict(info.args) if info else {}
    entry["avg_spec_accept_length"] = None  # no speculative decoding (SGLang's tools read None as that)
    entry["last_gen_throughput"] = round(h.gen_throughput, 2)
    entry["memory_usage"] = {
        "weight": _gib(info.weight_bytes) if info else 0.0,
        "kvcache": _gib(info.kv_pool_bytes) if info else 0.0,
        "token_capacity": info.max_total_num_tokens if info else 0,
        "graph": 0.0,  # CUDA graphs share the KV pool and activations: no memory of their own
    }
    return entry


def _role_server_info(h: WorkerHandle) -> dict[str, Any]:
    """A P/D worker as SGLang's P/D router lists it: the worker's own server info."""
    info = h.server_info
    return {
        **(info.args if info else {}),
        "worker_id": h.worker_id,
        "internal_states": [internal_state(h)],
        "version": info.version if info else None,
    }


def server_info(state: RouterState, role: ProcessRole | None = None) -> dict[str, Any]:
    facts = state.facts
    serving = state.pool.serving_workers()
    workers = [_worker_entry(h) for h in state.pool.workers.values()]
    by_role: dict[str, list[WorkerHandle]] = {}
    for h in state.pool.workers.values():
        by_role.setdefault(h.role, []).append(h)
    # P/D: what SGLang's P/D router answers (tools read `decode[0]` first when it is there)
    disaggregated = {
        r: [_role_server_info(h) for h in by_role[r]] for r in ("prefill", "decode") if r in by_role
    }
    return {
        **state.args.to_public_dict(),
        "model_path": state.model_path,
        "tokenizer_path": state.tokenizer_path,
        "served_model_name": state.model_name,
        "context_length": state.context_length,
        "vocab_size": facts.vocab_size if facts else None,
        "model_type": facts.model_type if facts else None,
        "architectures": facts.architectures if facts else None,
        "weight_version": state.weight_version,
        "version": VERSION,
        "max_total_num_tokens": sum(h.server_info.max_total_num_tokens for h in serving if h.server_info),
        "memory_pool_sizes": {
            w["worker_id"]: {
                "max_total_num_tokens": w["max_total_num_tokens"],
                "kv_pool_bytes": w["kv_pool_bytes"],
            }
            for w in workers
        },
        "live_workers": state.pool.by_role(),
        "workers": workers,
        "router_processes": role.count if role else 1,
        "router_process_index": role.index if role else 0,
        "internal_states": [internal_state(h) for h in serving],
        **disaggregated,
    }


async def handle_server_info(request: web.Request) -> web.Response:
    role = request.app.get(PROCESS_ROLE_KEY)
    return web.json_response(server_info(request.app[STATE_KEY], role), dumps=_dumps)


def _dumps(data: Any) -> str:
    return json.dumps(data, default=str)  # worker args may hold paths and other non-JSON values


async def handle_health(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    state.require_ready()
    if not state.pool.serving_workers():
        raise GenerationError(503, state.pool.why_none())
    return web.Response(status=200)


async def handle_health_generate(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    if not state.require_ready().is_generation:  # an embedding model: one embedding, as SGLang does
        try:
            await asyncio.wait_for(state.embedder.embed([[0]]), HEALTH_GENERATE_TIMEOUT_S)
        except (asyncio.TimeoutError, TimeoutError):
            raise GenerationError(503, f"No embedding within {HEALTH_GENERATE_TIMEOUT_S:g} s.") from None
        return web.Response(status=200)
    inp = GenerateInput(
        rid=f"health-{uuid.uuid4().hex}",
        input_ids=[0],
        sampling_params={"max_new_tokens": 1, "temperature": 0.0, "ignore_eos": True},
    )

    async def one_token() -> None:
        async for event in state.generator.stream(inp, buffered=True):
            if (event.finish_reason or {}).get("type") == "abort":
                raise GenerationError(503, f"Health generation was aborted: {event.finish_reason}")

    try:
        await asyncio.wait_for(one_token(), HEALTH_GENERATE_TIMEOUT_S)
    except (asyncio.TimeoutError, TimeoutError):
        raise GenerationError(503, f"No token generated within {HEALTH_GENERATE_TIMEOUT_S:g} s.") from None
    return web.Response(status=200)


async def _fresh_load(h: WorkerHandle) -> LoadReport | None:
    try:
        return h.record_load(await h.conn.query(LoadQuery(), LoadReport, LOAD_QUERY_TIMEOUT_S))
    except (WorkerUnavailable, TimeoutError, asyncio.TimeoutError):
        return None


async def handle_get_load(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    handles = list(state.pool.workers.values())
    reports = await asyncio.gather(*(_fresh_load(h) for h in handles))
    rows = []
    for h, load in zip(handles, reports):
        rows.append(
            {
                "worker_id": h.worker_id,
                "role": h.role,
                "responding": load is not None,
                "num_reqs": (load.num_running + load.num_waiting) if load else None,
                "num_running_reqs": load.num_running if load else None,
                "num_waiting_reqs": load.num_waiting if load else None,
                "num_tokens": load.num_used_tokens if load else None,
                "num_free_pages": load.num_free_pages if load else None,
                "num_evictable_pages": load.num_evictable_pages if load else None,
                "num_total_pages": load.num_total_pages if load else None,
                "router_inflight": h.inflight,
                "num_steps": load.num_steps if load else None,
                "generated_tokens": load.generated_tokens if load else None,
            }
        )
    return web.json_response(rows)


def refresh_worker_gauges(state: RouterState) -> Callable[[RouterMetrics], None]:
    def refresh(metrics: RouterMetrics) -> None:
        metrics.set_workers(
            [
                (h.worker_id, h.load, h.inflight, h.can_serve, int(h.breaker.state))
                for h in state.pool.workers.values()
            ]
        )

    return refresh


async def handle_metrics(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    body = state.metrics.render(refresh_worker_gauges(state))
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})
