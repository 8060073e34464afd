"""Moving the samples of an n > 1 request off a worker that failed mid-stream.

Each unfinished sample moves as its own one-sample request (rid `<rid>~s<index>`) carrying the
tokens it had (`generated_ids`) and, when seeded, the seed the worker derived for it (seed + index,
shared/engine/request_intake.py), so a seeded or greedy sample goes on as it would have. The moved
samples run concurrently through the dispatcher (each with its own retries), their outputs merged
back under the request's rid and each sample's own index; a sample that cannot move ends with an
abort (503, or the status its dispatch gave). Prompt logprobs went out before: not sent twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncGenerator, Collection
from typing import TYPE_CHECKING, Any

from pdserve.router.serving.generator_api import GenerationError
from pdserve.shared.protocol import GenerateRequest, RequestOutput

if TYPE_CHECKING:
    from pdserve.router.serving.dispatch import Dispatcher

_DONE = object()


def sample_request(req: GenerateRequest, index: int, generated: list[int]) -> GenerateRequest:
    """Sample `index` of req as a one-sample request that resumes after `generated`."""
    params: dict[str, Any] = {**req.sampling_params, "n": 1}
    if params.get("sampling_seed") is not None:
        params["sampling_seed"] = int(params["sampling_seed"]) + index
    return dataclasses.replace(
        req, rid=f"{req.rid}~s{index}", sampling_params=params, generated_ids=list(generated)
    )


async def move_samples(
    dispatcher: Dispatcher,
    req: GenerateRequest,
    generated: dict[int, list[int]],
    avoid: Collection[str],
    abort_output: Any,
) -> AsyncGenerator[RequestOutput, None]:
    """The merged outputs of the moved samples (`generated`: index -> its tokens so far)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def follow(index: int, sub: GenerateRequest) -> None:
        try:
            async with contextlib.aclosing(dispatcher.run(sub, avoid=avoid)) as outputs:
                async for out in outputs:
                    out.rid, out.index = req.rid, index
                    out.input_token_logprobs = out.input_top_logprobs = None
                    out.input_token_ids_logprobs = None
                    await queue.put(out)
        except GenerationError as exc:
            message = f"The request could not move to another worker: {exc.message}"
            await queue.put(abort_output(req.rid, index, message, exc.status))
        finally:
            await queue.put(_DONE)

    subs = {index: sample_request(req, index, tokens) for index, tokens in sorted(generated.items())}
    dispatcher.moved[req.rid] = [sub.rid for sub in subs.values()]
    tasks = [asyncio.ensure_future(follow(index, sub)) for index, sub in subs.items()]
    try:
        pending = len(tasks)
        while pending:
            item = await queue.get()
            if item is _DONE:
                pending -= 1
                continue
            yield item
    finally:
        dispatcher.moved.pop(req.rid, None)
        for task in tasks:
            task.cancel()  # a consumer that left: each sub-run aborts its worker's request
        await asyncio.gather(*tasks, return_exceptions=True)
