"""`bench_serving`: SGLang's online serving benchmark client and printout, against any SGLang- or
OpenAI-compatible server (pdserve's router first).

    bench_serving --backend sglang --num-prompts 100 --random-input-len 256 --random-output-len 64
    bench_serving --backend sglang-oai-chat --dataset-name sharegpt --dataset-path sharegpt.json \
        --request-rate 8 --max-concurrency 32 --output-file runs.jsonl

A run: find the model (`--model`, else /v1/models, else /get_model_info) and the tokenizer
(`--tokenizer`, else the server's tokenizer_path, else the model), build the dataset
(serving_datasets), send `--warmup-requests` copies of the first prompt (their output capped at 32
tokens; the run stops if all fail), flush the server's cache (`--flush-cache`), then send every row
with Poisson arrivals at `--request-rate` (inf: all at once) under at most `--max-concurrency` in
flight, with a tqdm bar; print the result block and append one JSON line to `--output-file`.
Exit status: 0 when every request succeeded (or some did and `--allow-failures`), 1 otherwise.
Datasets and flags mean what they mean in SGLang's client (random-ids sends text unless
`--tokenize-prompt`; random samples ShareGPT prompts' ids). Differences: nothing is downloaded
(sharegpt, and random's ShareGPT ids, need `--dataset-path`; without it random uses random ids),
and the output file is written only when asked for.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from datetime import datetime, timezone
from typing import Any

import aiohttp
import numpy as np
import requests
from tqdm.asyncio import tqdm
from typing_extensions import Self  # typing.Self needs Python 3.11

from pdserve.bench import serving_datasets as ds
from pdserve.bench.serving_backends import BACKENDS, ROUTES, RequestInput, RequestResult, send_request
from pdserve.bench.serving_metrics import compute_metrics, format_report

WARMUP_OUTPUT_LEN = 32
HTTP_TIMEOUT_S = 6 * 60 * 60


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Benchmark an online serving endpoint (SGLang's bench_serving).")
    p.add_argument("--backend", choices=BACKENDS, default="sglang")
    p.add_argument("--base-url", default=None, help="e.g. http://127.0.0.1:30000 (overrides --host/--port)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--model", default=None, help="default: the server's (/v1/models, /get_model_info)")
    p.add_argument("--tokenizer", default=None, help="default: the server's tokenizer path, else the model")
    p.add_argument("--dataset-name", choices=ds.DATASET_NAMES, default="random")
    p.add_argument("--dataset-path", default="", help="a local ShareGPT JSON file (sharegpt, random)")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--sharegpt-output-len", type=int, default=None, help="fixed output length for sharegpt")
    p.add_argument("--sharegpt-context-len", type=int, default=None, help="skip longer conversations")
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=1024)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--gsp-num-groups", type=int, default=64)
    p.add_argument("--gsp-prompts-per-group", type=int, default=16)
    p.add_argument("--gsp-system-prompt-len", type=int, default=2048)
    p.add_argument("--gsp-question-len", type=int, default=128)
    p.add_argument("--gsp-output-len", type=int, default=256)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s, Poisson (inf)")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--warmup-requests", type=int, default=1)
    p.add_argument("--output-file", default=None, help="append one JSON line with the run's metrics")
    p.add_argument("--output-details", action="store_true", help="add per-request lists to the line")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--disable-stream", action="store_true")
    p.add_argument(
        "--extra-request-body", default=None, help="JSON merged into each request, e.g. '{\"top_k\": 1}'"
    )
    p.add_argument("--apply-chat-template", action="store_true")
    p.add_argument(
        "--tokenize-prompt", action="store_true", help="random datasets: send token ids, not their text"
    )
    p.add_argument(
        "--flush-cache", action="store_true", help="flush the server's prefix cache after the warm-up"
    )
    p.add_argument("--allow-failures", action="store_true", help="exit 0 even if some requests failed")
    return p


# ---------------------------------------------------------------------- server discovery


def base_url_of(ns: argparse.Namespace) -> str:
    return (ns.base_url or f"http://{ns.host}:{ns.port}").rstrip("/")


def auth_headers() -> dict[str, str]:
    key = os.environ.get("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def _get_json(url: str) -> dict[str, Any] | None:
    try:
        resp = requests.get(url, headers=auth_headers(), timeout=10)
        return resp.json() if resp.status_code == 200 else None
    except (requests.RequestException, ValueError):
        return None


def discover_model(base_url: str, model: str | None, tokenizer: str | None) -> tuple[str, str]:
    """(model name, tokenizer path): the flags where given, else what the server says."""
    info = _get_json(base_url + "/get_model_info") or {}
    if model is None:
        models = _get_json(base_url + "/v1/models") or {}
        listed = [m.get("id") for m in models.get("data", []) if isinstance(m, dict)]
        model = listed[0] if listed else info.get("model_path")
    if model is None:
        raise SystemExit(f"no --model given and {base_url} names none (/v1/models, /get_model_info)")
    if tokenizer is None:
        served = info.get("tokenizer_path")
        tokenizer = served if served and os.path.exists(served) else info.get("model_path") or model
    return model, tokenizer


# ---------------------------------------------------------------------- dataset


def build_dataset(ns: argparse.Namespace, tokenizer) -> list[ds.DatasetRow]:
    rng = np.random.default_rng(ns.seed)
    name = ns.dataset_name
    if name == "random" and ns.dataset_path:
        rows = ds.sharegpt_token_rows(
            tokenizer, ns.dataset_path, ns.num_prompts, ns.random_input_len, ns.random_output_len,
            ns.random_range_ratio, rng, as_ids=ns.tokenize_prompt,
        )  # fmt: skip
    elif name in ("random", "random-ids"):
        if name == "random":
            print("note: --dataset-name random takes its ids from ShareGPT prompts (--dataset-path); "
                  "without a file they are random ids, as with random-ids")  # fmt: skip
        rows = ds.random_rows(
            tokenizer, ns.num_prompts, ns.random_input_len, ns.random_output_len,
            ns.random_range_ratio, rng, as_ids=ns.tokenize_prompt,
        )  # fmt: skip
    elif name == "generated-shared-prefix":
        rows = ds.generated_shared_prefix_rows(
            tokenizer, ns.gsp_num_groups, ns.gsp_prompts_per_group, ns.gsp_system_prompt_len,
            ns.gsp_question_len, ns.gsp_output_len, rng,
        )  # fmt: skip
    else:
        if not ns.dataset_path:
            raise SystemExit("--dataset-name sharegpt needs --dataset-path (a local ShareGPT JSON file)")
        rows = ds.sharegpt_rows(
            tokenizer, ns.dataset_path, ns.num_prompts, rng, ns.sharegpt_output_len, ns.sharegpt_context_len
        )
        if len(rows) < ns.num_prompts:
            print(f"note: {ns.dataset_path} gave {len(rows)} usable prompts of {ns.num_prompts} asked")
    if ns.tokenize_prompt and ns.backend == "sglang-oai-chat":
        raise SystemExit("--tokenize-prompt sends token ids: use --backend sglang, sglang-oai or vllm")
    if ns.apply_chat_template:
        if ns.tokenize_prompt:
            raise SystemExit("--apply-chat-template needs text prompts: not with --tokenize-prompt")
        rows = ds.apply_chat_template(rows, tokenizer, send_templated=ns.backend != "sglang-oai-chat")
    return rows


def arrival_offsets(n: int, request_rate: float, rng: np.random.Generator) -> list[float]:
    """Send times (s after the start) of n requests: Poisson at request_rate, all 0 for inf.

    The first request goes at 0; each later one an exponential gap (mean 1/rate) after the last."""
    if request_rate == float("inf"):
        return [0.0] * n
    if request_rate <= 0:
        raise SystemExit(f"--request-rate must be > 0, got {request_rate}")
    gaps = rng.exponential(1.0 / request_rate, size=max(n - 1, 0))
    return [0.0, *np.cumsum(gaps).tolist()][:n]


# ---------------------------------------------------------------------- the run


class Runner:
    """One benchmark's HTTP session and request settings."""

    def __init__(self, ns: argparse.Namespace, base_url: str, model: str):
        self.url = base_url + ROUTES[ns.backend]
        self.backend = ns.backend
        self.model = model
        self.stream = not ns.disable_stream
        self.extra = json.loads(ns.extra_request_body) if ns.extra_request_body else None
        self.headers = auth_headers()
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
        self.session = aiohttp.ClientSession(connector=connector, timeout=timeout, read_bufsize=2**20)
        return self

    async def __aexit__(self, *exc) -> None:
        assert self.session is not None
        await self.session.close()

    async def send(self, req: RequestInput) -> RequestResult:
        assert self.session is not None
        return await send_request(
            self.session, self.url, self.backend, req, self.model, self.stream, self.extra, self.headers
        )

    async def warmup(self, row: ds.DatasetRow, count: int) -> None:
        if count <= 0:
            return
        req = RequestInput(row.prompt, row.prompt_len, min(row.output_len, WARMUP_OUTPUT_LEN))
        results = await asyncio.gather(*(self.send(req) for _ in range(count)))
        if not any(r.success for r in results):
            raise SystemExit(f"warm-up failed: check the benchmark's arguments. Error: {results[0].error}")

    async def run(
        self, rows: list[ds.DatasetRow], offsets: list[float], max_concurrency: int | None, disable_tqdm: bool
    ) -> tuple[list[RequestResult], float]:
        """Sends rows at their offsets; returns the results in row order and the run's duration (s)."""
        limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        bar = tqdm(total=len(rows), disable=disable_tqdm)

        async def one(row: ds.DatasetRow) -> RequestResult:
            req = RequestInput(row.prompt, row.prompt_len, row.output_len)
            if limit is None:
                res = await self.send(req)
            else:
                async with limit:
                    res = await self.send(req)
            bar.update(1)
            return res

        start = time.perf_counter()
        tasks = []
        for row, offset in zip(rows, offsets):
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(row)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        bar.close()
        return list(results), duration


def flush_cache(base_url: str) -> None:
    """Best effort: a server without /flush_cache (or with requests running) just keeps its cache."""
    try:
        requests.post(base_url + "/flush_cache", headers=auth_headers(), timeout=30)
    except requests.RequestException:
        pass


def result_line(
    ns: argparse.Namespace,
    model: str,
    tokenizer_path: str,
    metrics: dict[str, Any],
    results: list[RequestResult],
) -> dict[str, Any]:
    """The output file's JSON line: the run's settings, then every metric."""
    line: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backend": ns.backend,
        "base_url": base_url_of(ns),
        "model": model,
        "tokenizer": tokenizer_path,
        "dataset_name": ns.dataset_name,
        "num_prompts": len(results),
        "request_rate": "inf" if ns.request_rate == float("inf") else ns.request_rate,
        "max_concurrency": ns.max_concurrency,
        "random_input_len": ns.random_input_len,
        "random_output_len": ns.random_output_len,
        "random_range_ratio": ns.random_range_ratio,
        "stream": not ns.disable_stream,
        "seed": ns.seed,
        **metrics,
    }
    if ns.output_details:
        line["input_lens"] = [r.prompt_len for r in results]
        line["output_lens"] = [r.output_len for r in results]
        line["ttfts"] = [r.ttft for r in results]
        line["latencies"] = [r.latency for r in results]
        line["itls"] = [r.itl for r in results]
        line["generated_texts"] = [r.generated_text for r in results]
        line["errors"] = [r.error for r in results]
    return line


async def run_benchmark(ns: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Runs the benchmark and prints its block; returns (metrics, the output file's line)."""
    from pdserve.shared.tokenizer import get_tokenizer

    base_url = base_url_of(ns)
    model, tokenizer_path = discover_model(base_url, ns.model, ns.tokenizer)
    tokenizer = get_tokenizer(tokenizer_path)
    rows = build_dataset(ns, tokenizer)
    if not rows:
        raise SystemExit("the dataset is empty")
    offsets = arrival_offsets(len(rows), ns.request_rate, np.random.default_rng(ns.seed + 1))
    print(f"#Input tokens: {sum(r.prompt_len for r in rows)}")
    print(f"#Output tokens: {sum(r.output_len for r in rows)}")
    async with Runner(ns, base_url, model) as runner:
        await runner.warmup(rows[0], ns.warmup_requests)
        if ns.flush_cache:
            flush_cache(base_url)
        results, duration = await runner.run(rows, offsets, ns.max_concurrency, ns.disable_tqdm)
    metrics = compute_metrics(results, duration, tokenizer)
    print(format_report(metrics, ns.backend, ns.request_rate, ns.max_concurrency))
    return metrics, result_line(ns, model, tokenizer_path, metrics, results)


def main(argv: list[str] | None = None) -> int:
    import uvloop

    ns = build_parser().parse_args(argv)
    metrics, line = uvloop.run(run_benchmark(ns))
    if ns.output_file:
        with open(ns.output_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
    if metrics["completed"] == 0:
        return 1
    return 0 if metrics["failed"] == 0 or ns.allow_failures else 1


if __name__ == "__main__":
    sys.exit(main())
