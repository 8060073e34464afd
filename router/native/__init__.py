"""pdserve.router.native: SGLang's native HTTP API on the router, every route of the seeds
(routes.py registers them): `/generate` (parse.py, sample_view.py, generate.py), `/tokenize` and
`/detokenize`, model and server info, health, load and metrics (info.py), the admin and control
routes that fan out to every worker (fanout.py: admin.py, weights.py, pause.py, profile.py,
runtime.py; aborts across router processes, sibling_abort.py), SageMaker's `/ping` and
`/invocations`, and a clear 400 for the routes pdserve does not serve (unsupported.py).

May import: pdserve.router.openai (`/invocations` is a chat completion), pdserve.router.http,
pdserve.router.serving, pdserve.router.cluster, pdserve.router.text, the router's state and
process roles (router/state.py, router/processes.py), and what pdserve.router may import. Never
pdserve.router.openapi, router/app.py or router/cli.py.
"""
