"""pdserve.shared.models: model definitions (plain nn.Modules built from Hugging Face configs),
weight sources (safetensors, SmolLM2's GGUF) and loading, the fast path that swaps in the kernels.

May import: pdserve.kernels and pdserve.shared.engine.forward_batch (what a forward pass reads;
a baseline exception in pyproject.toml's layers contract). Never the rest of the engine, the
roles or the router.
"""
