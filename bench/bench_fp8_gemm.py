"""fp8 GEMMs at Llama-3.1-8B's linear shapes on a CUDA GPU: kernels.fp8_gemm (Triton, skinny M),
torch._scaled_mm (cuBLASLt fp8) and the bf16 matmul they replace, against the memory roofline of the
weights each must read.

    python -m pdserve.bench.bench_fp8_gemm [--rows 1,16,64] [--json-out FILE] [--sweep]

- Roofline: the weight bytes (fp8: N*K; bf16: 2*N*K) at the device-to-device copy rate measured in
  the same run (bench_fused_moe.copy_bandwidth_gbs). At decode's M the GEMM is that read.
- Times: medians of CUDA graph replays with CUDA events, L2 flushed before each
  (bench_fused_moe.graph_time_us): what a decode step pays, without Python's launch cost.
  The activation's per-token quantization is timed apart (it runs once per linear).
- `--sweep` times the Triton kernel over (BLOCK_N, BLOCK_K, split-K), and at M = 1 also warps and
  pipeline stages, to check the defaults and auto_split_k's pick.
On a machine without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from triton.runtime.errors import OutOfResources

from pdserve.bench.bench_fused_moe import copy_bandwidth_gbs, graph_time_us
from pdserve.kernels.fp8_gemm import auto_split_k, fp8_gemm, fp8_gemm_ref
from pdserve.kernels.fp8_quant import per_channel_quant_fp8, per_token_quant_fp8

# (name, N, K) of Llama-3.1-8B's linears: merged qkv, o, merged gate/up, down
SHAPES = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]
SWEEP = [(bn, bk, sk, 4, 4) for bn in (64, 128) for bk in (128, 256) for sk in (1, 2, 4, 8)]
# at M = 1 the weight stream is all there is: deeper pipelines and other warp counts too
SWEEP_M1 = [(bn, bk, sk, nw, ns) for bn in (64, 128) for bk in (256, 512) for sk in (1, 2) for nw in (4, 8)
            for ns in (3, 5)]  # fmt: skip


def bench_shape(name: str, n: int, k: int, m: int, copy_gbs: float, sweep: bool) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(n + k + m)
    x = torch.randn(m, k, generator=gen, device="cuda").to(torch.bfloat16)
    w16 = (torch.randn(n, k, generator=gen, device="cuda") / k**0.5).to(torch.bfloat16)
    w8, ws = per_channel_quant_fp8(w16.float())
    q, qs = per_token_quant_fp8(x)
    split = auto_split_k(k, 256)
    triton_us = graph_time_us(lambda: fp8_gemm(q, qs, w8, ws, None, torch.bfloat16))
    scaled_us = graph_time_us(
        lambda: torch._scaled_mm(q, w8.t(), scale_a=qs, scale_b=ws[None, :], out_dtype=torch.bfloat16)
    )
    bf16_us = graph_time_us(lambda: F.linear(x, w16))
    quant_us = graph_time_us(lambda: per_token_quant_fp8(x))
    got = fp8_gemm(q, qs, w8, ws, None, torch.bfloat16).float()
    want = fp8_gemm_ref(q, qs, w8, ws, None, torch.float32)
    row = {
        "shape": name, "m": m, "n": n, "k": k, "split_k": split,
        "triton_us": triton_us, "scaled_mm_us": scaled_us, "bf16_us": bf16_us, "quant_us": quant_us,
        "fp8_roofline_us": n * k / (copy_gbs * 1e9) * 1e6, "bf16_roofline_us": 2 * n * k / (copy_gbs * 1e9) * 1e6,
        "max_rel_err_vs_ref": float((got - want).abs().max() / want.abs().max()),
    }  # fmt: skip
    if sweep:
        sweep_us: dict[str, float] = {}
        for bn, bk, sk, nw, ns in SWEEP_M1 if m == 1 else SWEEP:
            try:
                sweep_us[f"{bn}x{bk}x{sk} w{nw} s{ns}"] = graph_time_us(
                    lambda bn=bn, bk=bk, sk=sk, nw=nw, ns=ns: fp8_gemm(
                        q, qs, w8, ws, None, torch.bfloat16, bn, bk, sk, num_warps=nw, num_stages=ns
                    )
                )
            except OutOfResources:  # deep pipelines of wide tiles outgrow shared memory: not a candidate
                pass
        row["sweep_us"] = sweep_us
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="1,16,64", help="comma-separated M (tokens in the batch)")
    p.add_argument("--json-out", default=None, help="append one JSON line per row")
    p.add_argument("--sweep", action="store_true")
    ns = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_fp8_gemm: no CUDA GPU here, nothing to measure (run it on a GPU machine)")
        return 0
    gpu = torch.cuda.get_device_name(0)
    copy_gbs = copy_bandwidth_gbs()
    rows = [bench_shape(*s, int(m), copy_gbs, ns.sweep) for m in ns.rows.split(",") for s in SHAPES]
    print(f"{gpu}: copy {copy_gbs:,.0f} GB/s (read + write); Llama-3.1-8B linears\n")
    print(
        "| linear | M | split-K | triton fp8 µs | _scaled_mm µs | bf16 µs | fp8 roofline µs | quant µs | rel err |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['shape']} | {r['m']} | {r['split_k']} | {r['triton_us']:.1f} | {r['scaled_mm_us']:.1f} | "
            f"{r['bf16_us']:.1f} | {r['fp8_roofline_us']:.1f} | {r['quant_us']:.1f} | {r['max_rel_err_vs_ref']:.1e} |"
        )
    for r in rows:
        if "sweep_us" in r:
            best = min(r["sweep_us"], key=r["sweep_us"].get)
            print(
                f"{r['shape']} M={r['m']}: best {best} {r['sweep_us'][best]:.1f} µs (auto {r['triton_us']:.1f})"
            )
    if ns.json_out:
        with open(ns.json_out, "a") as f:
            for r in rows:
                f.write(json.dumps({"gpu": gpu, "copy_gbs": copy_gbs, **r}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
