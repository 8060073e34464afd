"""Where a decode step's time goes: GPU time per kernel, and the gap between GPU busy and wall time.

    python -m pdserve.bench.profile_decode --batch-size 1 --input-len 1024 [--disable-cuda-graph]
        [--quantization fp8] [--kv-cache-dtype fp8_e4m3] [--model-path CONFIG]

Runs bench_one_batch's case (dummy Llama-3.1-8B weights by default) once to warm up, then
again with its `--steps` decode steps (not the prefill) under torch.profiler (CUDA activities; kernels replayed from CUDA graphs are
traced too). Prints, per step: wall time, summed GPU kernel time, and the kernels grouped by name
with their share, largest first. A GPU total near the wall time means the step is bound by the
kernels; a gap means host work or launch latency.
"""

from __future__ import annotations

import argparse
import json
import logging

import torch
from torch.profiler import ProfilerActivity, profile

from pdserve.bench.bench_one_batch import DEFAULT_CONFIG, run_case
from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.engine import Engine


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-path", default=DEFAULT_CONFIG)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--disable-cuda-graph", action="store_true")
    p.add_argument("--quantization", default=None, help="fp8: profile the fp8-weight step")
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--json-out", default=None)
    ns = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    engine = Engine(
        EngineArgs(
            model_path=ns.model_path,
            load_format="dummy",
            device="cuda",
            max_running_requests=max(ns.batch_size, 1),
            cuda_graph_max_bs=max(ns.batch_size, 1),
            disable_cuda_graph=ns.disable_cuda_graph,
            quantization=ns.quantization,
            kv_cache_dtype=ns.kv_cache_dtype,
            chunked_prefill_size=max(8192, ns.batch_size * ns.input_len),
            max_prefill_tokens=max(16384, ns.batch_size * ns.input_len),
        )
    )
    run_case(engine, ns.batch_size, ns.input_len, 4, seed=1)  # warm-up
    prof = profile(activities=[ProfilerActivity.CUDA])
    row = run_case(engine, ns.batch_size, ns.input_len, ns.steps + 1, seed=2, around_decode=lambda: prof)
    decode = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, float] = {}
    for e in decode:
        by_name[e.name] = by_name.get(e.name, 0.0) + e.time_range.elapsed_us()
    total_us = sum(by_name.values()) / ns.steps
    wall_us = row["median_decode_latency_s"] * 1e6
    print(
        f"bs {ns.batch_size}, ctx {ns.input_len}, graphs {'off' if ns.disable_cuda_graph else 'on'}: "
        f"wall {wall_us:.0f} µs/step (median), GPU kernels {total_us:.0f} µs/step, "
        f"{len(decode) / ns.steps:.0f} kernels/step"
    )
    print("\n| kernel | µs/step | share |")
    print("| --- | ---: | ---: |")
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1])
    for name, us in ranked[: ns.top]:
        print(f"| {name[:90]} | {us / ns.steps:.1f} | {us / ns.steps / total_us:.1%} |")
    if ns.json_out:
        with open(ns.json_out, "w") as f:
            json.dump({"wall_us": wall_us, "gpu_us": total_us, "kernels": dict(ranked)}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
