"""shared.models.fast_moe (Triton interpreter): the fast path's MoE block against the plain block
on the same weights (Qwen2-MoE with its shared expert, renormalised or not; Mixtral), in float32
and float16; the ops it runs (routing one op, the shared gate in the router's GEMM, the tail one
op); weight loads and updates reaching the merged gate; forward hooks and the expert observer
carried over; DeepSeek-V2's block and one of too many experts left alone; torch.compile tracing
it whole.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pdserve.shared.engine.tensor_weights import apply_named_tensors, check_named_tensors
from pdserve.shared.models.config import ModelConfig
from pdserve.shared.models.deepseek_moe import DeepseekV2MoeBlock
from pdserve.shared.models.fast_moe import TritonSparseMoeBlock
from pdserve.shared.models.fast_path import use_triton_kernels
from pdserve.shared.models.loader import load_model
from pdserve.shared.models.moe_block import SparseMoeBlock
from pdserve.shared.models.weights import checkpoint_targets, load_checkpoint_weights
from tests.helpers.tiny_models import tiny_config

TOKENS = 5


class _OpLog(TorchDispatchMode):
    """The names of the non-view ops dispatched (a custom op counts once, not its insides)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _models(kind: str, dtype: torch.dtype, seed: int = 3):
    """(plain model, fast-path model) with the same weights; the router's logits made large enough
    that the routing differs from token to token."""
    config = ModelConfig.from_hf_config(tiny_config(kind), dtype=dtype)
    plain = load_model(config, None, "dummy", seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in plain.modules():
            if isinstance(block, SparseMoeBlock):
                block.gate.weight.copy_(torch.randn(block.gate.weight.shape, generator=gen) / 4)
                if block.shared_expert_gate is not None:
                    block.shared_expert_gate.weight.normal_(0, 0.3, generator=gen)
    fast = copy.deepcopy(plain)
    use_triton_kernels(fast)
    return plain, fast


def _block_pairs(plain, fast) -> list[tuple[SparseMoeBlock, TritonSparseMoeBlock]]:
    pairs = [
        (p, f)
        for p, f in zip(plain.modules(), fast.modules())
        if isinstance(p, SparseMoeBlock) and not isinstance(p, DeepseekV2MoeBlock)
    ]
    assert pairs and all(type(f) is TritonSparseMoeBlock for _, f in pairs)
    return pairs


def _hidden(config_hidden: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return torch.randn(TOKENS, config_hidden, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", ["qwen2_moe", "qwen2_moe_sparse", "mixtral"])
def test_block_equals_the_plain_block(kind, dtype):
    plain, fast = _models(kind, dtype)
    for p, f in _block_pairs(plain, fast):
        hidden = _hidden(p.gate.weight.shape[1], dtype, seed=p.layer_id)
        with torch.no_grad():
            want, got = p(hidden), f(hidden)
            (weights, ids), (want_weights, want_ids) = f.route(hidden), p.route(hidden)
        assert torch.equal(ids.long(), want_ids)  # the same experts, with weights rounded alike
        assert weights.dtype == torch.float32 and want_weights.dtype == (
            torch.float32 if kind == "mixtral" else dtype
        )
        torch.testing.assert_close(weights, want_weights.float(), rtol=1e-6, atol=0)
        assert got.dtype == dtype and got.shape == want.shape
        scale = want.abs().max().item()
        tol = 1e-5 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps
        assert (got.float() - want.float()).abs().max().item() <= tol * scale, (kind, p.layer_id)


def test_ops_of_the_block():
    """Routing is one op after the router's GEMM and feeds fused_moe with no cast between; the
    shared gate has no GEMM of its own and its tail is fused_moe's closing launch (the shared
    expert's own three ops stay)."""
    qwen = _models("qwen2_moe", torch.float16)[1]
    mixtral = _models("mixtral", torch.float16)[1]
    for model, want in (
        (qwen, ["mm", "moe_routing", "mm", "silu_and_mul", "mm", "fused_moe"]),
        (mixtral, ["mm", "moe_routing", "fused_moe"]),
    ):
        block = next(m for m in model.modules() if isinstance(m, TritonSparseMoeBlock))
        hidden = _hidden(block.gate.weight.shape[1], torch.float16)
        with torch.no_grad(), _OpLog() as log:
            block(hidden)
        assert log.ops == want


def test_weight_updates_reach_the_merged_gate():
    """Loads and updates copy into the gates' Parameters in place (a checkpoint load, then
    /update_weights_from_tensor's path): the merged weight is their storage. The checkpoint's
    names and the parameter count are those of the plain model."""
    plain, fast = _models("qwen2_moe", torch.float32)
    assert checkpoint_targets(fast).keys() == checkpoint_targets(plain).keys()
    assert sum(p.numel() for p in fast.parameters()) == sum(p.numel() for p in plain.parameters())
    gen = torch.Generator().manual_seed(11)
    gate_names = [
        name
        for name in checkpoint_targets(plain)
        if name.endswith(("mlp.gate.weight", "mlp.shared_expert_gate.weight"))
    ]
    assert len(gate_names) == 6  # three sparse layers
    for update in ("load", "from_tensor"):
        new = [
            (name, torch.randn(checkpoint_targets(plain)[name][0].shape, generator=gen))
            for name in gate_names
        ]
        load_checkpoint_weights(plain, new, ignore=lambda name: False, strict=False)
        if update == "load":
            load_checkpoint_weights(fast, new, ignore=lambda name: False, strict=False)
        else:
            apply_named_tensors(check_named_tensors(fast, new))
        for p, f in _block_pairs(plain, fast):
            assert f.merged_gate is not None
            assert f.gate.weight.data_ptr() == f.merged_gate.data_ptr()
            assert torch.equal(f.merged_gate, torch.cat([p.gate.weight, p.shared_expert_gate.weight]))
            hidden = _hidden(p.gate.weight.shape[1], torch.float32, seed=7)
            with torch.no_grad():
                torch.testing.assert_close(f(hidden), p(hidden), rtol=1e-5, atol=1e-6)


def test_hooks_and_observer_carry_over():
    config = ModelConfig.from_hf_config(tiny_config("qwen2_moe"), dtype=torch.float32)
    model = load_model(config, None, "dummy", seed=1)
    block = model.model.layers[0].mlp
    seen: list[tuple[int, torch.Tensor]] = []
    calls: list[str] = []

    class Observer:
        def on_select_experts(self, layer_id: int, topk_ids: torch.Tensor) -> None:
            seen.append((layer_id, topk_ids))

    block.observer = Observer()
    block.register_forward_hook(lambda module, args, out: calls.append(type(module).__name__))
    use_triton_kernels(model)
    fast = model.model.layers[0].mlp
    assert type(fast) is TritonSparseMoeBlock
    hidden = _hidden(config.hidden_size, torch.float32)
    with torch.no_grad():
        fast(hidden)
        ids = fast.route(hidden)[1]
    assert calls == ["TritonSparseMoeBlock"]
    assert seen[0][0] == 0 and seen[0][1].dtype == torch.int64 and torch.equal(seen[0][1], ids.long())
    assert use_triton_kernels(model) == 0  # a second pass changes nothing


def test_blocks_the_kernel_does_not_route_keep_their_routing():
    """DeepSeek-V2's block (grouped top-k, scaling) and a block of more experts than the kernel's 256."""
    deepseek = load_model(ModelConfig.from_hf_config(tiny_config("deepseek_v2")), None, "dummy")
    wide_config = tiny_config("qwen2_moe")
    wide_config.num_experts = 260
    wide = load_model(ModelConfig.from_hf_config(wide_config), None, "dummy")
    for model, kind in ((deepseek, DeepseekV2MoeBlock), (wide, SparseMoeBlock)):
        use_triton_kernels(model)
        blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
        assert blocks and all(type(m) is kind for m in blocks)


def test_torch_compile_traces_one_graph():
    """Dynamo sees the merged weight, the column views and both custom ops without a graph break
    (`--enable-torch-compile` compiles the decode step), with dynamic token counts."""
    _, fast = _models("qwen2_moe", torch.float32)
    block = next(m for m in fast.modules() if isinstance(m, TritonSparseMoeBlock))
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True, dynamic=True)
    for tokens in (3, TOKENS):
        hidden = _hidden(block.gate.weight.shape[1], torch.float32)[:tokens]
        with torch.no_grad():
            torch.testing.assert_close(compiled(hidden), block(hidden), rtol=0, atol=0)
