"""pdserve.router: the HTTP face: SGLang's native API and the OpenAI API over ZMQ workers, with
dispatch, pairing of prefill and decode workers, policies, the prefix index, detokenizing, stop
strings and metrics.

May import: pdserve.shared's torch-free modules (protocol, args, cluster and KV event types, page
hashes, the tokenizer, and the engine's sampling parameters, request validation and latency
buckets). Never torch (a contract in pyproject.toml), the model runner, pdserve.prefill,
pdserve.decode or pdserve.kvtransfer.
"""
