"""pdserve.shared: what every process shares, in packages by concept: `protocol` (the typed msgpack
messages), `cluster` (Redis membership, KV events, page hashes, the embedded Redis), `models`
(configs, weight sources, model definitions), `engine` (scheduling, the KV cache, the model
runner), `worker` (a worker's loop and its parts) and `launch` (the process mains and `serve`),
beside `args.py` and `tokenizer.py`.

May import: pdserve.kernels and pdserve.kvtransfer; only `launch` imports the roles (pdserve.prefill,
pdserve.decode) and the router's command line. The layers are contracts in pyproject.toml
(launch > roles > the worker loop > engine > models > kernels).
"""
