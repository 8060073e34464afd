"""A small client of one worker (a DEALER socket), and a one-shot command line around it.

    with WorkerClient("tcp://127.0.0.1:30001") as client:
        client.submit(GenerateRequest(rid="a", input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 8}))
        for out in client.stream("a"):
            print(out.token_ids)

    python -m pdserve.shared.worker.client --addr tcp://127.0.0.1:30001 --prompt "Hi" --max-new-tokens 32 --chat

Rules: a client belongs to one thread. The worker sends every output of a step in one batch, so
outputs of requests other than the one being waited on are buffered per rid until asked for, and
replies (LoadReport, FlushCacheResult) are matched by `query_id`; nothing received is lost.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections import deque
from collections.abc import Iterator
from typing import Any, TextIO

import zmq
from typing_extensions import Self  # typing.Self needs Python 3.11

from pdserve.shared.args import DEFAULT_MODEL
from pdserve.shared.protocol import (
    AbortRequest,
    EmbeddingOutput,
    EmbedRequest,
    FlushCacheRequest,
    FlushCacheResult,
    GenerateRequest,
    LoadQuery,
    LoadReport,
    Message,
    OutputBatch,
    RequestOutput,
    ServerInfo,
    ServerInfoQuery,
    UpdateWeightsRequest,
    UpdateWeightsResult,
)
from pdserve.shared.worker.zmq_io import DealerSocket


class WorkerClient:
    def __init__(self, address: str, identity: bytes | None = None):
        self._ctx = zmq.Context()
        self._sock = DealerSocket(self._ctx, address, identity)
        self._outputs: dict[str, deque[RequestOutput]] = {}
        self._replies: dict[tuple[type[Message], int], Message] = {}
        self._query_ids = itertools.count(1)

    # ------------------------------------------------------------------ requests

    def submit(self, req: GenerateRequest) -> None:
        self._sock.send(req)

    def abort(self, rid: str, message: str = "Aborted by the client.") -> None:
        self._sock.send(AbortRequest(rid=rid, message=message))

    def load(self, timeout_s: float = 10.0) -> LoadReport:
        query_id = next(self._query_ids)
        self._sock.send(LoadQuery(query_id=query_id))
        return self._wait_reply(LoadReport, query_id, timeout_s)

    def flush_cache(self, timeout_s: float = 10.0) -> FlushCacheResult:
        query_id = next(self._query_ids)
        self._sock.send(FlushCacheRequest(query_id=query_id))
        return self._wait_reply(FlushCacheResult, query_id, timeout_s)

    def embed(self, rid: str, input_ids: list[int], timeout_s: float = 60.0) -> EmbeddingOutput:
        """The worker's one answer to an EmbedRequest (an embedding, or its refusal in `error`)."""
        query_id = next(self._query_ids)
        self._sock.send(EmbedRequest(rid=rid, input_ids=input_ids, query_id=query_id))
        return self._wait_reply(EmbeddingOutput, query_id, timeout_s)

    def server_info(self, timeout_s: float = 10.0) -> ServerInfo:
        query_id = next(self._query_ids)
        self._sock.send(ServerInfoQuery(query_id=query_id))
        return self._wait_reply(ServerInfo, query_id, timeout_s)

    def update_weights(
        self,
        model_path: str,
        weight_version: str | None = None,
        load_format: str | None = None,
        timeout_s: float = 120.0,
    ) -> UpdateWeightsResult:
        """Waits for the swap (the worker first drains its running requests)."""
        query_id = next(self._query_ids)
        self._sock.send(
            UpdateWeightsRequest(
                query_id=query_id,
                model_path=model_path,
                load_format=load_format,
                weight_version=weight_version,
            )
        )
        return self._wait_reply(UpdateWeightsResult, query_id, timeout_s)

    def send_raw(self, frame: bytes) -> None:
        self._sock.send_raw(frame)

    # ------------------------------------------------------------------ outputs

    def stream(self, rid: str, timeout_s: float = 60.0, num_samples: int = 1) -> Iterator[RequestOutput]:
        """Yields rid's outputs as they arrive until all num_samples samples finished.

        Raises TimeoutError when nothing for rid arrives within timeout_s."""
        left = num_samples
        while left > 0:
            out = self._next_output(rid, timeout_s)
            if out.finished:
                left -= 1
            yield out

    def collect(self, rid: str, timeout_s: float = 60.0, num_samples: int = 1) -> list[RequestOutput]:
        return list(self.stream(rid, timeout_s, num_samples))

    def _next_output(self, rid: str, timeout_s: float) -> RequestOutput:
        deadline = time.monotonic() + timeout_s
        while not self._outputs.get(rid):
            self._pump(deadline, f"an output of {rid!r}")
        queue = self._outputs[rid]
        out = queue.popleft()
        if not queue:
            del self._outputs[rid]
        return out

    def _wait_reply(self, kind: type[Message], query_id: int, timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        while (kind, query_id) not in self._replies:
            self._pump(deadline, f"{kind.__name__} {query_id}")
        return self._replies.pop((kind, query_id))

    def _pump(self, deadline: float, waiting_for: str) -> None:
        """Receives one message into the buffers; TimeoutError past the deadline."""
        left_ms = int((deadline - time.monotonic()) * 1000)
        msg = self._sock.recv(max(left_ms, 0))
        if msg is None:
            raise TimeoutError(f"no {waiting_for} from {self._sock.address}")
        if isinstance(msg, OutputBatch):
            for out in msg.outputs:
                self._outputs.setdefault(out.rid, deque()).append(out)
        else:
            self._replies[(type(msg), getattr(msg, "query_id", 0))] = msg

    # ------------------------------------------------------------------ life cycle

    def close(self) -> None:
        self._sock.close()
        self._ctx.term()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------- one-shot generation


def prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    """Token ids of the prompt; with chat, as the user turn of the model's chat template."""
    if chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(prompt)


def generate_text(
    client: WorkerClient,
    tokenizer,
    input_ids: list[int],
    sampling_params: dict[str, Any],
    out: TextIO = sys.stdout,
    timeout_s: float = 120.0,
) -> dict[str, Any]:
    """Streams the completion of input_ids to `out` as it arrives; returns the meta info.

    Text is re-decoded from all ids each step and only the new suffix printed; a suffix ending in
    U+FFFD (a multi-byte character cut in half) waits for the next token."""
    rid = f"cli-{time.time_ns()}"
    start = time.perf_counter()
    client.submit(GenerateRequest(rid=rid, input_ids=input_ids, sampling_params=sampling_params))
    ids: list[int] = []
    printed = ""
    last: RequestOutput | None = None
    for last in client.stream(rid, timeout_s):
        ids.extend(last.token_ids)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.startswith(printed) and (last.finished or not text.endswith("\ufffd")):
            out.write(text[len(printed) :])
            out.flush()
            printed = text
    out.write("\n")
    assert last is not None
    return {
        "id": rid,
        "prompt_tokens": last.prompt_tokens,
        "completion_tokens": last.completion_tokens,
        "cached_tokens": last.cached_tokens,
        "finish_reason": last.finish_reason,
        "error": last.error,
        "e2e_latency": round(time.perf_counter() - start, 4),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Generate once from a running worker and print the stream.")
    parser.add_argument("--addr", default="tcp://127.0.0.1:30001", help="the worker's ZMQ address")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--chat", action="store_true", help="apply the model's chat template")
    parser.add_argument("--tokenizer", default=DEFAULT_MODEL, help="the served model's path or name")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each output")
    return parser


def main(argv: list[str] | None = None) -> int:
    from pdserve.shared.tokenizer import get_tokenizer

    ns = build_parser().parse_args(argv)
    tokenizer = get_tokenizer(ns.tokenizer)
    params = {"max_new_tokens": ns.max_new_tokens, "temperature": ns.temperature}
    with WorkerClient(ns.addr) as client:
        meta = generate_text(
            client, tokenizer, prompt_ids(tokenizer, ns.prompt, ns.chat), params, timeout_s=ns.timeout
        )
    print(json.dumps({"meta_info": meta}))
    return 1 if meta["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
