"""pdserve.shared: what every process shares: args, the msgpack protocol, the tokenizer, Redis
membership and KV events, the models, the engine, and the process mains (worker, serve).

May import: pdserve.kernels; its launch packages (shared.worker, shared.serve) also the roles
(pdserve.prefill, pdserve.decode), pdserve.kvtransfer and, for serve, the router's command line.
The layers are contracts in pyproject.toml (launch > roles > engine > models > kernels).
"""
