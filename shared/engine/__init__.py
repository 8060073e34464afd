"""pdserve.shared.engine: the engine: paged KV pool, radix prefix cache, scheduler, sampler, model
runner, CUDA graphs, the batch pipeline and `Engine`.

May import: pdserve.shared.models, pdserve.kernels, pdserve.shared's protocol and args. Never the
roles, the worker process or the router. The scheduler and the KV cache bookkeeping import no
torch (a contract in pyproject.toml).
"""
