"""The MoE routing and gated shared-expert kernels compile for an H100 (sm_90) on this machine, with
no GPU: Triton's compiler, in a process without TRITON_INTERPRET, down to a cubin, for every dtype
and each branch of their constexprs. The interpreter runs the kernels' numbers; this catches what
only the compiler refuses (types, layouts, unsupported ops)."""

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
    print("compiled", compiled)
    """
)


def test_kernels_compile_for_sm90(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE], check=False, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "compiled 7" in done.stdout, done.stdout
