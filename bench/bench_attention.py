"""Attention kernel micro-benchmarks on a CUDA GPU, against the GPU's own limits and against
`torch.nn.functional.scaled_dot_product_attention` (flash), all measured in the same run.

    python -m pdserve.bench.bench_attention [--json-out FILE]

- Baselines: copy bandwidth (`dst.copy_(src)` of 2 GiB, bytes read + written per second) and the
  bf16 matmul rate (8192^3), so each kernel is a fraction of what this GPU does, not of a datasheet.
- Decode (kernels.decode_attention, Llama-3.1-8B heads: 32 q / 8 kv, head_dim 128, page 16, pages
  in random order): GB/s over the KV bytes it must read (every K and V of every sequence, once per
  kv head group), as a fraction of copy bandwidth. SDPA gets the same K/V laid out contiguously
  ([B, Hkv, ctx, D], `enable_gqa`), i.e. without paging, which only helps it.
- Decode over an fp8_e4m3 pool against the same pool in bf16 (BLOCK_N swept): time against the
  fp8 bytes at the copy rate.
- Extend (kernels.extend_attention): causal prefill of whole prompts and a chunk over a cached
  prefix; TFLOP/s counts 4 * D * Hq per visible (query, key) pair, as a fraction of the matmul rate.
  SDPA: the same prompts padded into one [B, Hq, T, D] batch, `is_causal=True`, prefix-free cases
  only (a chunk over a prefix is not causal in SDPA's sense).

Times are medians of `triton.testing.do_bench` (L2 flushed between runs).
"""

from __future__ import annotations

import argparse
import json
import math
import random

import torch
import torch.nn.functional as F

from pdserve.kernels.decode_attention import decode_attention, decode_workspace_numel, num_kv_splits_for
from pdserve.kernels.extend_attention import extend_attention

HQ, HKV, HEAD_DIM, PAGE = 32, 8, 128, 16
DTYPE = torch.bfloat16


def _bench_ms(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def copy_bandwidth_gbs() -> float:
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    src.fill_(1)
    ms = _bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def matmul_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, dtype=DTYPE, device="cuda")
    b = torch.randn(n, n, dtype=DTYPE, device="cuda")
    ms = _bench_ms(lambda: a @ b)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def _paged(seq_lens: list[int], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k/v pages holding every sequence in random page order, and the page table."""
    pages_per = [math.ceil(s / PAGE) for s in seq_lens]
    num_pages = sum(pages_per) + 1  # page 0 stays unused, as in the engine
    k = torch.randn(num_pages, PAGE, HKV, HEAD_DIM, dtype=DTYPE, device="cuda", generator=gen)
    v = torch.randn(num_pages, PAGE, HKV, HEAD_DIM, dtype=DTYPE, device="cuda", generator=gen)
    order = list(range(1, num_pages))
    random.Random(0).shuffle(order)
    table = torch.zeros(len(seq_lens), max(pages_per), dtype=torch.int32)
    at = 0
    for i, n in enumerate(pages_per):
        table[i, :n] = torch.tensor(order[at : at + n], dtype=torch.int32)
        at += n
    return k, v, table.cuda()


def _contiguous(k_pages: torch.Tensor, table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[B, Hkv, seq_len, D] copy of every row's first seq_len tokens (for SDPA)."""
    rows = k_pages[table.long()].flatten(1, 2)[:, :seq_len]  # [B, pages*PAGE, Hkv, D]
    return rows.transpose(1, 2).contiguous()


def bench_decode(batch: int, ctx: int, copy_gbs: float, num_sms: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(batch * 100003 + ctx)
    seq_lens = [ctx] * batch
    k, v, table = _paged(seq_lens, gen)
    q = torch.randn(batch, HQ, HEAD_DIM, dtype=DTYPE, device="cuda", generator=gen)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    splits = num_kv_splits_for(batch, HKV, num_sms)
    ws = torch.empty(decode_workspace_numel(batch, HQ, HEAD_DIM, splits), dtype=torch.float32, device="cuda")
    out = torch.empty_like(q)
    scale = HEAD_DIM**-0.5
    ours_ms = _bench_ms(
        lambda: decode_attention(q, k, v, table, lens, scale, out=out, num_kv_splits=splits, workspace=ws)
    )
    kc, vc = _contiguous(k, table, ctx), _contiguous(v, table, ctx)
    q4 = q.unsqueeze(2)  # [B, Hq, 1, D]
    sdpa_ms = _bench_ms(lambda: F.scaled_dot_product_attention(q4, kc, vc, scale=scale, enable_gqa=True))
    want = F.scaled_dot_product_attention(q4, kc, vc, scale=scale, enable_gqa=True).squeeze(2)
    got = decode_attention(q, k, v, table, lens, scale, num_kv_splits=splits, workspace=ws)
    max_err = float((got.float() - want.float()).abs().max())
    kv_bytes = 2 * batch * ctx * HKV * HEAD_DIM * k.element_size()
    ours_gbs = kv_bytes / (ours_ms * 1e-3) / 1e9
    return {
        "kind": "decode", "batch": batch, "ctx": ctx, "splits": splits,
        "ours_us": ours_ms * 1e3, "sdpa_us": sdpa_ms * 1e3,
        "ours_gbs": ours_gbs, "sdpa_gbs": kv_bytes / (sdpa_ms * 1e-3) / 1e9,
        "fraction_of_copy": ours_gbs / copy_gbs, "max_abs_err_vs_sdpa": max_err,
    }  # fmt: skip


def bench_decode_fp8(batch: int, ctx: int, copy_gbs: float, num_sms: int) -> dict:
    """Decode over an fp8_e4m3 pool (scales 1.0) against the same pool in bf16, same run: the fp8
    kernel reads half the bytes, so at the copy rate it takes half the time. BLOCK_N swept: a
    64-key fp8 tile is half the bytes in flight of a bf16 one."""
    gen = torch.Generator(device="cuda").manual_seed(batch * 7 + ctx)
    k, v, table = _paged([ctx] * batch, gen)
    k8, v8 = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)
    one = torch.ones(1, dtype=torch.float32, device="cuda")
    q = torch.randn(batch, HQ, HEAD_DIM, dtype=DTYPE, device="cuda", generator=gen)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    splits = num_kv_splits_for(batch, HKV, num_sms)
    ws = torch.empty(decode_workspace_numel(batch, HQ, HEAD_DIM, splits), dtype=torch.float32, device="cuda")
    out = torch.empty_like(q)
    scale = HEAD_DIM**-0.5

    def run(kp, vp, block_n=None, **scales):
        return decode_attention(
            q,
            kp,
            vp,
            table,
            lens,
            scale,
            out=out,
            num_kv_splits=splits,
            workspace=ws,
            block_n=block_n,
            **scales,
        )

    bf16_ms = _bench_ms(lambda: run(k, v))
    fp8_us = {
        bn: _bench_ms(lambda bn=bn: run(k8, v8, bn, k_scale=one, v_scale=one)) * 1e3 for bn in (32, 64, 128)
    }
    fp8_bytes = 2 * batch * ctx * HKV * HEAD_DIM
    want = run(k8.to(DTYPE), v8.to(DTYPE)).float()  # the same values in bf16
    got = run(k8, v8, k_scale=one, v_scale=one).float()
    return {
        "kind": "decode_fp8", "batch": batch, "ctx": ctx, "splits": splits, "bf16_us": bf16_ms * 1e3,
        "fp8_us": fp8_us, "fp8_roofline_us": fp8_bytes / (copy_gbs * 1e9) * 1e6,
        "max_abs_err_vs_bf16_of_fp8_values": float((got - want).abs().max()),
    }  # fmt: skip


def bench_extend(batch: int, new_len: int, prefix_len: int, matmul: float) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(batch * 7919 + new_len + prefix_len)
    seq_len = prefix_len + new_len
    k, v, table = _paged([seq_len] * batch, gen)
    q = torch.randn(batch * new_len, HQ, HEAD_DIM, dtype=DTYPE, device="cuda", generator=gen)
    seq = torch.full((batch,), seq_len, dtype=torch.int32, device="cuda")
    ext = torch.full((batch,), new_len, dtype=torch.int32, device="cuda")
    start = torch.arange(0, batch * new_len, new_len, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    scale = HEAD_DIM**-0.5
    ours_ms = _bench_ms(lambda: extend_attention(q, k, v, table, seq, ext, start, new_len, scale, out=out))
    # visible (query, key) pairs: each new token sees the prefix and itself causally
    pairs = batch * (new_len * prefix_len + new_len * (new_len + 1) // 2)
    flops = 4 * HEAD_DIM * HQ * pairs
    row = {
        "kind": "extend", "batch": batch, "new": new_len, "prefix": prefix_len,
        "ours_us": ours_ms * 1e3, "ours_tflops": flops / (ours_ms * 1e-3) / 1e12,
    }  # fmt: skip
    row["fraction_of_matmul"] = row["ours_tflops"] / matmul
    if prefix_len == 0:
        q4 = q.view(batch, new_len, HQ, HEAD_DIM).transpose(1, 2).contiguous()
        kc, vc = _contiguous(k, table, seq_len), _contiguous(v, table, seq_len)
        sdpa_ms = _bench_ms(
            lambda: F.scaled_dot_product_attention(q4, kc, vc, is_causal=True, scale=scale, enable_gqa=True)
        )
        want = F.scaled_dot_product_attention(q4, kc, vc, is_causal=True, scale=scale, enable_gqa=True)
        got = extend_attention(q, k, v, table, seq, ext, start, new_len, scale)
        row["sdpa_us"] = sdpa_ms * 1e3
        row["sdpa_tflops"] = flops / (sdpa_ms * 1e-3) / 1e12
        row["max_abs_err_vs_sdpa"] = float(
            (got.view(batch, new_len, HQ, HEAD_DIM).transpose(1, 2).float() - want.float()).abs().max()
        )
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json-out", default=None)
    ns = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention needs a CUDA GPU")
    props = torch.cuda.get_device_properties(0)
    copy_gbs, mm = copy_bandwidth_gbs(), matmul_tflops()
    print(f"{props.name}: copy {copy_gbs:,.0f} GB/s (read + write), bf16 matmul {mm:,.0f} TFLOP/s")
    rows = [
        bench_decode(b, ctx, copy_gbs, props.multi_processor_count)
        for b, ctx in ((1, 1280), (1, 8192), (8, 4096), (64, 1280), (64, 4096))
    ]
    rows += [
        bench_decode_fp8(b, ctx, copy_gbs, props.multi_processor_count) for b, ctx in ((1, 8192), (64, 1280))
    ]
    rows += [bench_extend(b, n, pre, mm) for b, n, pre in ((8, 1024, 0), (1, 4096, 0), (4, 512, 3584))]
    print("\n| decode | splits | ours µs | SDPA µs | ours GB/s | of copy | SDPA GB/s | max err |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in (r for r in rows if r["kind"] == "decode"):
        print(
            f"| bs {r['batch']} x ctx {r['ctx']} | {r['splits']} | {r['ours_us']:.1f} | {r['sdpa_us']:.1f} | "
            f"{r['ours_gbs']:,.0f} | {r['fraction_of_copy']:.0%} | {r['sdpa_gbs']:,.0f} | "
            f"{r['max_abs_err_vs_sdpa']:.1e} |"
        )
    print(
        "\n| decode, fp8_e4m3 KV | bf16 KV µs | fp8 µs, BLOCK_N 32 / 64 / 128 | fp8 roofline µs | max err |"
    )
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in (r for r in rows if r["kind"] == "decode_fp8"):
        fp8 = " / ".join(f"{us:.1f}" for us in r["fp8_us"].values())
        print(
            f"| bs {r['batch']} x ctx {r['ctx']} | {r['bf16_us']:.1f} | {fp8} | {r['fp8_roofline_us']:.1f} | "
            f"{r['max_abs_err_vs_bf16_of_fp8_values']:.1e} |"
        )
    print("\n| extend | ours µs | SDPA µs | ours TFLOP/s | of matmul | SDPA TFLOP/s | max err |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in (r for r in rows if r["kind"] == "extend"):
        sdpa = f"{r['sdpa_us']:.1f}" if "sdpa_us" in r else "-"
        sdpa_tf = f"{r['sdpa_tflops']:.0f}" if "sdpa_tflops" in r else "-"
        err = f"{r['max_abs_err_vs_sdpa']:.1e}" if "max_abs_err_vs_sdpa" in r else "-"
        print(
            f"| bs {r['batch']} x {r['new']} new, prefix {r['prefix']} | {r['ours_us']:.1f} | {sdpa} | "
            f"{r['ours_tflops']:.0f} | {r['fraction_of_matmul']:.0%} | {sdpa_tf} | {err} |"
        )
    if ns.json_out:
        with open(ns.json_out, "w") as f:
            json.dump(
                {"gpu": props.name, "copy_gbs": copy_gbs, "matmul_tflops": mm, "rows": rows}, f, indent=1
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
