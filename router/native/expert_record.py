"""`/start_expert_distribution_record`, `/stop_expert_distribution_record`,
`/dump_expert_distribution_record` (GET or POST): SGLang's expert-distribution recording on every
worker of a MoE model started with `--expert-distribution-recorder-mode stat`.

    curl -X POST localhost:30000/start_expert_distribution_record
    curl -X POST localhost:30000/generate -d '{"text": "What is the capital of France?"}'
    curl -X POST localhost:30000/stop_expert_distribution_record
    curl -X POST localhost:30000/dump_expert_distribution_record

Rules:
- each route asks every connected worker (prefill, decode and mixed alike: each counts the tokens
  it runs) and answers SGLang's text ("Start recording the expert distribution.\\n", "Stop
  recording the expert distribution.\\n", "Dump expert distribution record.\\n");
- a dump writes one file per worker on the workers' host (shared/engine/expert_distribution.py:
  `$SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR`, default /tmp), all named by one dump id; the answer
  lists the files after SGLang's line, one a line;
- a dense model, or workers started without the mode, make it a 400 naming each worker's reason.
Bodies are ignored (SGLang's take none); the admin key applies when one is set.
"""

from __future__ import annotations

import functools
import time

from aiohttp import web

from pdserve.router.http.limits import http_error
from pdserve.router.native.fanout import ask_each, connected_workers, failures, read_optional_object
from pdserve.router.state import STATE_KEY
from pdserve.shared.protocol import AdminReply, ExpertRecord

TIMEOUT_S = 60.0  # a dump copies the buffer to the host and writes it
# path -> (action, SGLang's answer)
ROUTES = {
    "/start_expert_distribution_record": ("start", "Start recording the expert distribution.\n"),
    "/stop_expert_distribution_record": ("stop", "Stop recording the expert distribution.\n"),
    "/dump_expert_distribution_record": ("dump", "Dump expert distribution record.\n"),
}


def _reasons(failed: list[tuple[str, str]]) -> str:
    """One line per distinct reason, naming the workers that gave it."""
    by_reason: dict[str, list[str]] = {}
    for worker_id, why in failed:
        by_reason.setdefault(why, []).append(worker_id)
    return " ".join(f"{why} (worker {', '.join(ids)})" for why, ids in by_reason.items())


async def handle_expert_record(request: web.Request, path: str) -> web.Response:
    state = request.app[STATE_KEY]
    action, answer = ROUTES[path]
    await read_optional_object(request)
    dump_id = f"{time.time():.6f}"
    answers = await ask_each(
        connected_workers(state), lambda: ExpertRecord(action=action, dump_id=dump_id), AdminReply, TIMEOUT_S
    )
    failed = failures(answers)
    if failed:
        raise http_error(400, f"{path}: {_reasons(failed)}")
    if action != "dump":
        return web.Response(text=answer)
    files = sorted(reply.message for _, reply in answers if isinstance(reply, AdminReply))
    return web.Response(text=answer + "".join(f"{f}\n" for f in files))


def add_expert_record_routes(app: web.Application) -> None:
    for path in ROUTES:
        handler = functools.partial(handle_expert_record, path=path)
        app.router.add_route("GET", path, handler)
        app.router.add_route("POST", path, handler)
