"""One static batch through the model runner: prefill latency and tok/s, median decode step and tok/s.

    python -m pdserve.bench.bench_one_batch --batch-size 1 64 --input-len 1024 --output-len 256

Flags follow SGLang's bench_one_batch (`--model-path`, `--load-format dummy`, `--batch-size`,
`--input-len`, `--output-len` as lists; every combination runs). The default model is the
Llama-3.1-8B config in bench/configs with dummy bf16 weights. No scheduler and no server: one
prefill of all prompts at once, then `output_len - 1` decode steps, each timed with a device sync
(the sampled token ids come back to the host every step, as they do when serving). What is timed
is the engine's step: building the batch, the forward (CUDA graph replay for decode), sampling.
A warm-up case runs first so compilation and first launches stay out of the numbers.
With `--tp N` this process is rank 0 of N ranks (one GPU each from --device's, as a worker's:
shared/launch/tp_ranks.py) and times rank 0's steps, which wait on every rank's collectives.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.engine import Engine
from pdserve.shared.engine.request import Req
from pdserve.shared.engine.sampling_params import SamplingParams
from pdserve.shared.engine.scheduled_batch import BatchKind, ScheduledBatch
from pdserve.shared.launch.tp_ranks import TensorParallelRanks, exit_worker

DEFAULT_CONFIG = str(Path(__file__).parent / "configs" / "llama-3.1-8b.json")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(
    engine: Engine,
    batch_size: int,
    input_len: int,
    output_len: int,
    seed: int,
    around_decode: Callable[[], AbstractContextManager] = nullcontext,
) -> dict:
    """Prefills batch_size random prompts of input_len tokens, then decodes output_len - 1 steps
    (inside `around_decode()`: a profiler, say)."""
    runner, kv, ps = engine.runner, engine.kv, engine.args.page_size
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    reqs, held = [], []
    for i in range(batch_size):
        req = Req(
            rid=f"bench-{i}",
            input_ids=[rng.randrange(vocab) for _ in range(input_len)],
            params=SamplingParams(max_new_tokens=output_len, temperature=0.0, ignore_eos=True),
        )
        pages = kv.allocate(-(-(input_len + output_len) // ps))
        if pages is None:
            raise SystemExit(f"KV pool too small for batch {batch_size} x {input_len + output_len} tokens")
        req.pages = pages
        held.append(pages)
        reqs.append(req)
    try:
        _sync(runner.device)
        t0 = time.perf_counter()
        tokens = runner.run(
            ScheduledBatch(BatchKind.EXTEND, reqs, [0] * batch_size, [input_len] * batch_size)
        )
        _sync(runner.device)
        prefill_s = time.perf_counter() - t0
        for req, tok in zip(reqs, tokens):
            req.output_ids.append(tok)
            req.num_computed = input_len
        step_s = []
        with around_decode():
            _decode_steps(runner, reqs, output_len - 1, step_s)
    finally:
        for pages in held:
            kv.release([], pages, None, cache=False)
    median = statistics.median(step_s) if step_s else float("nan")
    total_s = prefill_s + sum(step_s)
    return {
        "batch_size": batch_size,
        "input_len": input_len,
        "output_len": output_len,
        "prefill_latency_s": prefill_s,
        "prefill_throughput_tok_s": batch_size * input_len / prefill_s,
        "median_decode_latency_s": median,
        "median_decode_throughput_tok_s": batch_size / median,
        "p90_decode_latency_s": sorted(step_s)[int(0.9 * (len(step_s) - 1))] if step_s else float("nan"),
        "total_latency_s": total_s,
        "overall_throughput_tok_s": batch_size * (input_len + output_len) / total_s,
    }


def _decode_steps(runner, reqs: list[Req], steps: int, step_s: list[float]) -> None:
    """`steps` decode steps of all reqs, each timed with a device sync into step_s."""
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = ScheduledBatch(BatchKind.DECODE, reqs, [r.seq_len - 1 for r in reqs], [1] * len(reqs))
        tokens = runner.run(batch)
        _sync(runner.device)
        step_s.append(time.perf_counter() - t0)
        for req, tok in zip(reqs, tokens):
            req.output_ids.append(tok)
            req.num_computed += 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-path", default=DEFAULT_CONFIG)
    p.add_argument("--load-format", default="dummy", choices=["auto", "safetensors", "dummy"])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, nargs="+", default=[1])
    p.add_argument("--input-len", type=int, nargs="+", default=[1024])
    p.add_argument("--output-len", type=int, nargs="+", default=[16])
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--mem-fraction-static", type=float, default=0.85)
    p.add_argument("--max-total-tokens", type=int, default=None)
    p.add_argument("--cuda-graph-max-bs", type=int, default=160)
    p.add_argument("--disable-cuda-graph", action="store_true")
    p.add_argument(
        "--enable-torch-compile", action="store_true", help="decode graphs of a torch.compile'd forward"
    )
    p.add_argument("--attention-backend", default="auto", choices=["auto", "triton", "torch"])
    p.add_argument("--quantization", default=None, choices=["fp8"])
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8_e5m2", "fp8_e4m3"])
    p.add_argument("--tp", "--tp-size", dest="tp", type=int, default=1, help="tensor-parallel ranks")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--result-filename", default=None, help="append one JSON line per case")
    p.add_argument("--run-name", default="")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cases = [(b, i, o) for b in ns.batch_size for i in ns.input_len for o in ns.output_len]
    args = EngineArgs(
        model_path=ns.model_path,
        load_format=ns.load_format,
        dtype=ns.dtype,
        device=ns.device,
        page_size=ns.page_size,
        mem_fraction_static=ns.mem_fraction_static,
        max_total_tokens=ns.max_total_tokens,
        max_running_requests=max(ns.batch_size),
        cuda_graph_max_bs=ns.cuda_graph_max_bs,
        disable_cuda_graph=ns.disable_cuda_graph,
        enable_torch_compile=ns.enable_torch_compile,
        attention_backend=ns.attention_backend,
        quantization=ns.quantization,
        kv_cache_dtype=ns.kv_cache_dtype,
        chunked_prefill_size=max(8192, max(b * i for b, i, _ in cases)),
        max_prefill_tokens=max(16384, max(b * i for b, i, _ in cases)),
        random_seed=ns.seed,
        tp_size=ns.tp,
    )
    ranks = TensorParallelRanks(args, on_rank_exit=exit_worker) if ns.tp > 1 else None
    try:
        return _run_cases(ns, args, cases)
    finally:
        if ranks is not None:
            ranks.close()


def _run_cases(ns: argparse.Namespace, args: EngineArgs, cases: list[tuple[int, int, int]]) -> int:
    engine = Engine(args)
    print(
        f"model {ns.model_path} ({engine.model_config.dtype}), device {ns.device}, "
        f"KV pool {engine.max_total_num_tokens} tokens, attention {type(engine.runner.attn_backend).__name__}, "
        f"cuda graphs {'off' if engine.runner.graphs is None else engine.runner.graphs.buckets[-1]}, "
        f"torch.compile {'on' if ns.enable_torch_compile else 'off'}, weights {ns.quantization or 'as loaded'}, "
        f"KV cache {engine.runner.kv_dtype}, tp {ns.tp}"
    )
    run_case(engine, min(ns.batch_size), min(ns.input_len), 4, ns.seed)  # warm-up
    rows = []
    for b, i, o in cases:
        r = run_case(engine, b, i, o, ns.seed)
        r["run_name"] = ns.run_name
        r["tp"] = ns.tp
        rows.append(r)
        print(
            f"bs={b} in={i} out={o} | Prefill. latency: {r['prefill_latency_s']:.5f} s, "
            f"throughput: {r['prefill_throughput_tok_s']:,.0f} token/s | Decode. median latency: "
            f"{r['median_decode_latency_s'] * 1e3:.3f} ms, median throughput: "
            f"{r['median_decode_throughput_tok_s']:,.0f} token/s | Total. latency: {r['total_latency_s']:.3f} s",
            flush=True,
        )
        if ns.result_filename:
            with open(ns.result_filename, "a") as f:
                f.write(json.dumps(r) + "\n")
    print()
    print(
        "| tp | bs | in | out | prefill ms | prefill tok/s | decode median ms | decode p90 ms | decode tok/s |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {ns.tp} | {r['batch_size']} | {r['input_len']} | {r['output_len']} | {r['prefill_latency_s'] * 1e3:.2f} | "
            f"{r['prefill_throughput_tok_s']:,.0f} | {r['median_decode_latency_s'] * 1e3:.3f} | "
            f"{r['p90_decode_latency_s'] * 1e3:.3f} | {r['median_decode_throughput_tok_s']:,.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
