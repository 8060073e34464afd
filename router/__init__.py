"""pdserve.router: the HTTP face: SGLang's native API and the OpenAI API over ZMQ workers.

Its packages, top to bottom (each may import those below it; the layers are a contract in
pyproject.toml):
- openapi/: the OpenAPI document of every route, and its HTML page;
- native/: SGLang's native API; openai/: the OpenAI API (native's SageMaker route reuses its chat);
- http/: what both APIs share: API keys, request limits, middlewares, SSE, error bodies;
- serving/: the request path under the handlers: the generator interface the APIs call and the
  router's generator behind it (admission, dispatch with retries, each sample's text), metrics;
- cluster/: the workers: pool, connections, pairing, policies, prefix tree and index, breakers;
  text/: tokenize, detokenize, stop strings. Neither imports the other nor anything above.
The top level builds and runs them: cli.py (`router`), app.py (the aiohttp app), state.py
(RouterArgs and RouterState, the one state object; it imports serving, cluster and text only),
supervisor.py and processes.py (`router --processes N`).

May import: pdserve.shared's torch-free modules (protocol, args, cluster and KV event types, page
hashes, the tokenizer, and the engine's sampling parameters, request validation and latency
buckets). Never torch (a contract in pyproject.toml), the model runner, pdserve.prefill,
pdserve.decode or pdserve.kvtransfer.
"""
