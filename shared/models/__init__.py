"""pdserve.shared.models: model definitions (plain nn.Modules built from Hugging Face configs),
weight sources (safetensors, SmolLM2's GGUF) and loading, the fast path that swaps in the kernels,
and `ForwardBatch`, what one forward pass reads (the engine builds it; models and attention
backends read it).

May import: pdserve.kernels. Never the engine, the roles or the router.
"""
