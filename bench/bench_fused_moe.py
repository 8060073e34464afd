"""kernels.fused_moe on a CUDA GPU at Qwen1.5-MoE-A2.7B's shape (H 2048, I 1408, 60 experts, top-4,
bfloat16), against the memory roofline of the weights it must read and against fused_moe_ref.

    python -m pdserve.bench.bench_fused_moe [--tokens 1,64] [--json-out FILE] [--sweep] [--fp8]

- Roofline: the bytes of the distinct experts the routing selects (their w13 and w2 rows, each read
  once), at the device-to-device copy rate measured in the same run (`dst.copy_(src)` of 1 GiB,
  bytes read + written per second). Decode is bound by that read.
- Times are medians of many single launches timed with CUDA events after a warm-up, the L2 cache
  overwritten before each one, so every launch reads its weights from HBM. `ours_us` replays the
  call from a CUDA graph (as a decode step does); `eager_us` launches it from Python, where the
  align ops' launches alone cost ~0.5 ms.
- Routing: select_experts over random logits (renormalized), so T = 64 selects nearly every expert.
- `--sweep` also times each (BLOCK_M, BLOCK_N, BLOCK_K) of a small grid, to check the block table.
- `--fp8`: the experts as float8_e4m3fn with per-row scales (the `--quantization fp8` path; the
  activations stay bfloat16 and are quantized per row inside the kernel); the roofline counts 1 byte
  a weight.
On a machine without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from pdserve.kernels.fp8_quant import per_channel_quant_fp8
from pdserve.kernels.fused_moe import fused_moe, fused_moe_ref, moe_block_config, select_experts

HIDDEN, INTER, EXPERTS, TOP_K = 2048, 1408, 60, 4
DTYPE = torch.bfloat16
SWEEP = [
    (16, 32, 128),
    (16, 64, 64),
    (16, 64, 128),
    (16, 128, 64),
    (32, 64, 128),
    (64, 64, 64),
    (64, 128, 64),
]


def time_us(fn, iters: int = 100, warmup: int = 10) -> float:
    """Median of `iters` launches, each timed alone with CUDA events after flushing L2."""
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for start, end in zip(starts, ends):
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3


def graph_time_us(fn, iters: int = 100) -> float:
    """Like time_us, but fn captured once in a CUDA graph and replayed: what a decode step (always a
    graph replay) pays, without the Python and launch cost of fn's several small ops."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_us(graph.replay, iters=iters)


def copy_bandwidth_gbs() -> float:
    src = torch.ones(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = time_us(lambda: dst.copy_(src), iters=30)
    return 2 * src.numel() / (us * 1e-6) / 1e9


def bench_tokens(
    tokens: int, w13: torch.Tensor, w2: torch.Tensor, copy_gbs: float, sweep: bool, scales: dict
) -> dict:
    """One row; `scales` ({} or w13_scale/w2_scale) goes to every call, so fp8 experts run fp8."""
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, HIDDEN, generator=gen, device="cuda").to(DTYPE)
    logits = torch.randn(tokens, EXPERTS, generator=gen, device="cuda")
    weights, ids = select_experts(logits, TOP_K, renormalize=True)
    distinct = int(torch.unique(ids).numel())
    expert_bytes = (w13[0].numel() + w2[0].numel()) * w13.element_size()
    weight_bytes = distinct * expert_bytes
    ours_us = graph_time_us(lambda: fused_moe(x, w13, w2, weights, ids, **scales))
    eager_us = time_us(lambda: fused_moe(x, w13, w2, weights, ids, **scales))
    ref_us = time_us(lambda: fused_moe_ref(x, w13, w2, weights, ids, **scales), iters=10, warmup=2)
    got, want = (
        fused_moe(x, w13, w2, weights, ids, **scales),
        fused_moe_ref(x, w13, w2, weights, ids, **scales),
    )
    roofline_us = weight_bytes / (copy_gbs * 1e9) * 1e6
    row = {
        "shape": "qwen1.5-moe-a2.7b" + ("-fp8" if scales else ""), "tokens": tokens, "distinct_experts": distinct,
        "weight_mb": weight_bytes / 1e6, "tiles": list(moe_block_config(tokens * TOP_K, EXPERTS, DTYPE)),
        "ours_us": ours_us, "roofline_us": roofline_us, "fraction_of_roofline": roofline_us / ours_us,
        "ours_gbs": weight_bytes / (ours_us * 1e-6) / 1e9, "eager_us": eager_us, "ref_us": ref_us,
        "max_abs_err_vs_ref": float((got.float() - want.float()).abs().max()),
    }  # fmt: skip
    if sweep:
        sweep_us: dict[str, float] = {}
        for tiles in SWEEP:
            run = lambda tiles=tiles: fused_moe(x, w13, w2, weights, ids, block_sizes=tiles, **scales)
            sweep_us["x".join(map(str, tiles))] = graph_time_us(run)
        row["sweep_us"] = sweep_us
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", default="1,64", help="comma-separated token counts")
    p.add_argument("--json-out", default=None, help="append one JSON line per row")
    p.add_argument("--sweep", action="store_true", help="also time a grid of block sizes")
    p.add_argument("--fp8", action="store_true", help="fp8 expert weights with per-row scales")
    ns = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_fused_moe: no CUDA GPU here, nothing to measure (run it on a GPU machine)")
        return 0
    gpu = torch.cuda.get_device_name(0)
    gen = torch.Generator(device="cuda").manual_seed(0)
    w13 = (torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=gen, device="cuda") / HIDDEN**0.5).to(DTYPE)
    w2 = (torch.randn(EXPERTS, HIDDEN, INTER, generator=gen, device="cuda") / INTER**0.5).to(DTYPE)
    scales: dict = {}
    if ns.fp8:
        q13, s13 = per_channel_quant_fp8(w13.reshape(-1, HIDDEN))
        q2, s2 = per_channel_quant_fp8(w2.reshape(-1, INTER))
        w13, w2 = q13.reshape(w13.shape), q2.reshape(w2.shape)
        scales = {"w13_scale": s13.reshape(EXPERTS, -1), "w2_scale": s2.reshape(EXPERTS, -1)}
    copy_gbs = copy_bandwidth_gbs()
    rows = [bench_tokens(int(t), w13, w2, copy_gbs, ns.sweep, scales) for t in ns.tokens.split(",")]
    weights_kind = "fp8 experts" if ns.fp8 else "bf16"
    print(f"{gpu}: copy {copy_gbs:,.0f} GB/s (read + write); Qwen1.5-MoE-A2.7B layer, {weights_kind}\n")
    print(
        "| T | experts read | MB | tiles (M, N, K, warps) | ours µs (graph) | eager µs | roofline µs | of roofline | ref µs | max err |"
    )
    print("| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['tokens']} | {r['distinct_experts']} | {r['weight_mb']:.1f} | {tuple(r['tiles'])} | "
            f"{r['ours_us']:.1f} | {r['eager_us']:.0f} | {r['roofline_us']:.1f} | {r['fraction_of_roofline']:.0%} | "
            f"{r['ref_us']:.0f} | {r['max_abs_err_vs_ref']:.1e} |"
        )
    for r in rows:
        if "sweep_us" in r:
            best = min(r["sweep_us"], key=r["sweep_us"].get)
            sweep = ", ".join(f"{k} {v:.1f}" for k, v in r["sweep_us"].items())
            print(f"\nT={r['tokens']} sweep (µs): {sweep}; best {best}")
    if ns.json_out:
        with open(ns.json_out, "a") as f:
            for r in rows:
                f.write(json.dumps({"gpu": gpu, "copy_gbs": copy_gbs, **r}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
