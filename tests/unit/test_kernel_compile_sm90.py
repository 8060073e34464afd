"""Kernels compile for an H100 (sm_90) on this machine, with no GPU: the MoE routing, gated
shared-expert and combine kernels, the kernels that write fp8 (whose GPU build differs from the
interpreter's) and the GEMMs whose instruction choice matters (fp8 skinny GEMM, grouped MoE GEMM). Triton's compiler, in a process without TRITON_INTERPRET, down to a cubin, for
every dtype and each branch of their constexprs. The interpreter runs the kernels' numbers; this
catches what only the compiler refuses (types, layouts, unsupported ops)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

_COMPILE = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from pdserve.kernels.moe_routing import _moe_routing_kernel
    from pdserve.kernels.shared_expert_gate import _gated_shared_kernel
    from pdserve.kernels.moe_combine import _moe_combine_kernel

    target = GPUTarget("cuda", 90, 32)
    def cubin(fn, signature, constexprs):
        signature = {**signature, **{name: "constexpr" for name in constexprs}}
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target)
        assert kernel.asm["cubin"], fn
    compiled = 0
    # each dtype, both ends of top-k and of the expert block, each branch of RENORMALIZE and ROUND_TO
    for dtype, top_k, block_e, renormalize, round_to in (
        ("fp32", 1, 4, False, 0), ("fp16", 4, 64, True, 1), ("bf16", 8, 256, True, 2), ("bf16", 6, 64, False, 0)
    ):
        signature = {"logits_ptr": "*" + dtype, "weights_ptr": "*fp32", "ids_ptr": "*i32",
                     "num_experts": "i32", "stride_row": "i32"}
        constexprs = {"TOP_K": top_k, "BLOCK_K": triton.next_power_of_2(top_k), "RENORMALIZE": renormalize,
                      "ROUND_TO": round_to, "BLOCK_E": block_e}
        cubin(_moe_routing_kernel, signature, constexprs)
        compiled += 1
    for dtype in ("fp32", "fp16", "bf16"):
        pointers = ("routed_ptr", "shared_ptr", "gate_ptr", "out_ptr")
        signature = {**{p: "*" + dtype for p in pointers},
                     **{n: "i32" for n in ("hidden", "stride_routed", "stride_shared", "stride_gate")}}
        cubin(_gated_shared_kernel, signature, {"BLOCK": 1024})
        compiled += 1
    for dtype, has_shared in (("bf16", True), ("fp16", False)):
        signature = {"down_ptr": "*fp32", "ids_ptr": "*i32", "shared_ptr": "*" + dtype, "gate_ptr": "*" + dtype,
                     "out_ptr": "*" + dtype, **{n: "i32" for n in ("hidden", "top_k", "expert_lo", "num_experts",
                                                                   "stride_shared", "stride_gate")}}
        cubin(_moe_combine_kernel, signature, {"HAS_SHARED": has_shared, "BLOCK": 1024})
        compiled += 1
    print("compiled", compiled)
    """
)


def _run_without_interpreter(script: str, tmp_path: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", script], check=False, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def test_kernels_compile_for_sm90(tmp_path: Path):
    out = _run_without_interpreter(_COMPILE, tmp_path)
    assert "compiled 9" in out, out


_COMPILE_FP8_AND_GEMMS = textwrap.dedent(
    """
    import re
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from pdserve.kernels.fp8_quant import _per_token_quant_kernel
    from pdserve.kernels.kv_store import _store_kv_kernel
    from pdserve.kernels.rmsnorm_fp8 import _rmsnorm_fp8_kernel
    from pdserve.kernels.rope import _rope_kernel
    from pdserve.kernels.silu_mul_fp8 import _silu_mul_fp8_kernel

    target = GPUTarget("cuda", 90, 32)
    def ptx(fn, pointers, constexprs, num_warps=4):
        # arguments not named in pointers are int32 scalars (strides, sizes)
        signature = {name: pointers.get(name, "i32") for name in fn.arg_names if name not in constexprs}
        signature = {**signature, **{name: "constexpr" for name in constexprs}}
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target,
                                options={"num_warps": num_warps})
        assert kernel.asm["cubin"], fn
        return kernel.asm["ptx"]
    def ops(text, op):
        return len(re.findall(r"^\\s+" + re.escape(op) + r"\\b", text, re.M))
    row = {"x": "*bf16", "q": "*fp8e4nv", "scales": "*fp32"}
    quantizing = {
        "per_token": ptx(_per_token_quant_kernel, row, {"MIN_AMAX_C": 1e-12, "SOFT_ROUND": False, "BLOCK": 4096}),
        "silu_mul": ptx(_silu_mul_fp8_kernel, row, {"MIN_AMAX_C": 1e-12, "SOFT_ROUND": False, "BLOCK": 16384}, 16),
        "rmsnorm": ptx(_rmsnorm_fp8_kernel, {**row, "residual": "*bf16", "weight": "*bf16", "eps": "fp32"},
                       {"HAS_RESIDUAL": True, "MIN_AMAX_C": 1e-12, "SOFT_ROUND": False, "BLOCK": 4096}),
    }
    for name, text in quantizing.items():
        # the hardware rounds, and the row's reciprocal is its one IEEE division
        assert ops(text, "cvt.rn.satfinite.e4m3x2.f32") > 0, name
        assert ops(text, "div.rn.f32") == 1, (name, ops(text, "div.rn.f32"))
    for fmt, e5m2, fp8_max in (("fp8e4nv", False, 448.0), ("fp8e5", True, 57344.0)):
        cache = {"k_cache": "*" + fmt, "v_cache": "*" + fmt, "slots": "*i64", "k_scale": "*fp32", "v_scale": "*fp32"}
        fp8 = {"FP8_MAX_C": fp8_max, "E5M2": e5m2, "SOFT_ROUND": False}
        stores = (
            ptx(_store_kv_kernel, {**cache, "k": "*bf16", "v": "*bf16"}, {"BLOCK_H": 8, "BLOCK_D": 128, **fp8}),
            ptx(_rope_kernel, {**cache, "q": "*bf16", "k": "*bf16", "v": "*bf16", "positions": "*i64",
                               "inv_freq": "*fp32", "attention_scaling": "fp32"},
                {"HALF": 64, "BLOCK_HQ": 32, "BLOCK_HKV": 8, "BLOCK_HALF": 64, "STORE_KV": True, **fp8}),
        )
        for text in stores:
            assert ops(text, "cvt.rn.satfinite." + ("e5m2x2" if e5m2 else "e4m3x2") + ".f32") > 0, fmt
    # the skinny fp8 GEMM at its default tiles: e4m3 warpgroup MMAs, no fp8 value widened first
    from pdserve.kernels.fp8_gemm import _fp8_gemm_kernel
    gemm = {"a": "*fp8e4nv", "a_scale": "*fp32", "w": "*fp8e4nv", "w_scale": "*fp32", "bias": "*bf16", "out": "*bf16",
            "partials": "*fp32", "counters": "*i32"}
    for split, has_bias in ((False, False), (True, True)):
        text = ptx(_fp8_gemm_kernel, gemm,
                   {"HAS_BIAS": has_bias, "SPLIT": split, "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256})
        wgmma = [line for line in text.splitlines() if "wgmma.mma_async" in line]
        assert wgmma and all(".e4m3.e4m3" in line for line in wgmma), "no fp8 wgmma"
        assert "cvt.rn.f16x2.e4m3x2" not in text, "fp8 operands widened to float16"
        if split:  # the tile counter orders the slabs' stores before the last program's loads
            assert re.search(r"atom\\.[a-z.]*acq_rel[a-z.]*\\.add", text), "split-K counter without acq_rel"
        if not (split or has_bias):  # its only float32 adds: each dot's sum promoted into the accumulator
            assert re.search(r"\\badd\\.(rn\\.)?f32", text), "fp8 MMA sums left in the MMA's accumulator"
    # the fused MoE's grouped GEMM at decode's and prefill's tiles: warpgroup MMAs on the weights
    from pdserve.kernels.fused_moe import _grouped_gemm_kernel
    for w_type, tiles, num_warps, gated in (("fp8e4nv", (16, 64, 128), 4, True), ("fp8e4nv", (16, 64, 128), 4, False),
                                            ("bf16", (16, 64, 128), 4, True), ("bf16", (64, 128, 64), 8, True)):
        fp8 = w_type == "fp8e4nv"
        pointers = {"a_ptr": "*" + w_type, "b_ptr": "*" + w_type, "c_ptr": "*bf16", "sorted_pairs_ptr": "*i32",
                    "block_experts_ptr": "*i32", "pair_weights_ptr": "*fp32", "b_scale_ptr": "*fp32",
                    "a_scale_ptr": "*fp32"}
        constexprs = {"A_ROWS_PER_PAIR": 1, "GATED": gated, "MUL_ROUTED_WEIGHT": not gated, "BLOCK_M": tiles[0],
                      "BLOCK_N": tiles[1], "BLOCK_K": tiles[2], "DOT_PRECISION": "tf32", "FP8_W": fp8}
        text = ptx(_grouped_gemm_kernel, pointers, constexprs, num_warps)
        wgmma = [line for line in text.splitlines() if "wgmma.mma_async" in line]
        assert wgmma and all((".e4m3.e4m3" if fp8 else ".bf16.bf16") in line for line in wgmma), (w_type, tiles)
        assert "cvt.rn.f16x2.e4m3x2" not in text, "fp8 operands widened to float16"
    print("compiled fp8 writers and gemms")
    """
)


def test_fp8_writers_and_gemms_compile_for_sm90_as_intended(tmp_path: Path):
    """Compiled for a GPU, the kernels that write fp8 leave the rounding to the hardware's conversion
    (the interpreter's software rounding is compiled out) and quantize a row with one division; the
    skinny fp8 GEMM and the fused MoE's grouped GEMM run warpgroup MMAs on their operands as
    stored (fp8 never widened to float16), and the fp8 GEMM adds each dot's sum into its float32
    accumulator (without `max_num_imprecise_acc`, none: the whole K loop stays in the MMA's
    shortened accumulator)."""
    out = _run_without_interpreter(_COMPILE_FP8_AND_GEMMS, tmp_path)
    assert "compiled fp8 writers and gemms" in out, out
