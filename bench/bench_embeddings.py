"""Embedding throughput: sequences/s through `/v1/embeddings`, against Hugging Face `AutoModel` on
the same GPU, the same model config and the same batch.

    serve --model-path /tmp/gte --load-format dummy --is-embedding --device cuda --port 30000 &
    python -m pdserve.bench.bench_embeddings --base-url http://127.0.0.1:30000 --config bench/configs/gte-qwen2-1.5b.json
    python -m pdserve.bench.bench_embeddings --hf --config bench/configs/gte-qwen2-1.5b.json      # the baseline

Client side: `--num-seqs` random-id sequences of `--input-len` tokens (ids sent as token lists, so no
tokenizer is involved), `--batch-size` of them per request, `--concurrency` requests in flight; one
warm-up request first. sequences/s = num_seqs / wall time. Every answer is checked: one unit-norm
vector per input, of the model's hidden size.

`--hf`: the same config with random bf16 weights (as `--load-format dummy` does), `AutoModel` with its
default attention (sdpa), batches of `--batch-size` x `--input-len`, last-token pooling and L2
normalisation (what a decoder embedding model serves), timed after a warm-up with CUDA syncs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import time
from pathlib import Path

DEFAULT_CONFIG = str(Path(__file__).parent / "configs" / "gte-qwen2-1.5b.json")


def random_sequences(num: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    # clear of the special ids at both ends of the vocabulary
    lo, hi = min(1000, vocab_size // 4), max(vocab_size - 1000, vocab_size * 3 // 4)
    return [[rng.randrange(lo, hi) for _ in range(length)] for _ in range(num)]


def check_answer(body: dict, expected: int, hidden_size: int) -> None:
    data = body.get("data")
    if not isinstance(data, list) or len(data) != expected:
        raise SystemExit(f"expected {expected} embeddings, got: {json.dumps(body)[:300]}")
    for item in data:
        vec = item["embedding"]
        norm = math.sqrt(sum(x * x for x in vec))
        if len(vec) != hidden_size or abs(norm - 1.0) > 1e-2:
            raise SystemExit(f"an embedding of {len(vec)} values with norm {norm:.4f}, not {hidden_size} / 1")


async def run_client(ns: argparse.Namespace, hidden_size: int, vocab_size: int) -> dict:
    import aiohttp

    seqs = random_sequences(ns.num_seqs, ns.input_len, vocab_size)
    batches = [seqs[i : i + ns.batch_size] for i in range(0, len(seqs), ns.batch_size)]
    url = ns.base_url.rstrip("/") + "/v1/embeddings"
    latencies: list[float] = []
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one(batch: list[list[int]]) -> None:
            t0 = time.perf_counter()
            async with session.post(url, json={"model": ns.model, "input": batch}) as resp:
                body = await resp.json()
                if resp.status != 200:
                    raise SystemExit(f"HTTP {resp.status}: {json.dumps(body)[:300]}")
            check_answer(body, len(batch), hidden_size)
            latencies.append(time.perf_counter() - t0)

        await one(batches[0])  # warm-up
        latencies.clear()
        queue = list(reversed(batches))

        async def lane() -> None:
            while queue:
                await one(queue.pop())

        t0 = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(ns.concurrency)))
        wall = time.perf_counter() - t0
    latencies.sort()
    return {
        "side": "pdserve",
        "num_seqs": ns.num_seqs,
        "input_len": ns.input_len,
        "batch_size": ns.batch_size,
        "concurrency": ns.concurrency,
        "seconds": wall,
        "seqs_per_s": ns.num_seqs / wall,
        "median_request_ms": 1000 * latencies[len(latencies) // 2],
    }


def run_hf(ns: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(ns.config)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModel.from_config(config, dtype=torch.bfloat16)
    model.eval()
    seqs = random_sequences(ns.num_seqs, ns.input_len, config.vocab_size)
    batches = [
        torch.tensor(seqs[i : i + ns.batch_size], device="cuda") for i in range(0, len(seqs), ns.batch_size)
    ]

    @torch.inference_mode()
    def embed(ids: torch.Tensor) -> torch.Tensor:
        hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        return torch.nn.functional.normalize(hidden[:, -1].float(), dim=-1)

    embed(batches[0])  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for ids in batches:
        out = embed(ids)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    assert out.shape[-1] == config.hidden_size
    return {
        "side": "hf",
        "num_seqs": ns.num_seqs,
        "input_len": ns.input_len,
        "batch_size": ns.batch_size,
        "seconds": wall,
        "seqs_per_s": ns.num_seqs / wall,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=DEFAULT_CONFIG, help="the model's config.json (sizes, vocabulary)")
    p.add_argument("--base-url", default="http://127.0.0.1:30000")
    p.add_argument("--model", default="default", help="the request's `model` field")
    p.add_argument("--hf", action="store_true", help="time Hugging Face AutoModel instead of a server")
    p.add_argument("--num-seqs", type=int, default=512)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--json-out", default=None, help="append the result as one JSON line")
    ns = p.parse_args(argv)
    config = json.loads(Path(ns.config).read_text())
    if ns.hf:
        result = run_hf(ns)
    else:
        result = asyncio.run(run_client(ns, int(config["hidden_size"]), int(config["vocab_size"])))
    print(
        f"| {result['side']} | {result['num_seqs']} x {result['input_len']} tokens | batch {result['batch_size']} "
        f"| {result['seqs_per_s']:.1f} seq/s | {result['seconds']:.2f} s |"
    )
    if ns.json_out:
        with open(ns.json_out, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
