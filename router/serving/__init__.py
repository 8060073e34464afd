"""pdserve.router.serving: the request path under the HTTP handlers, no aiohttp in it.

generator_api.py is the interface the APIs call (a GenerateInput in, SampleEvents out,
GenerationError); generator.py is the router's generator behind it: the request's checks, a slot
of the admission queue (admission.py, admission_gate.py), dispatch to a worker or a prefill/decode
pair with retries and a deadline (dispatch.py, attempt.py, inbox.py), and each sample's text
(sample_tracker.py: detokenizing and stop strings into SampleEvents). metrics.py,
sglang_metrics.py and request_metrics.py count and log what it serves.

May import: pdserve.router.cluster, pdserve.router.text, the router's state (router/state.py,
for types only) and process roles (router/processes.py), and what pdserve.router may import.
Never aiohttp itself, nor pdserve.router.http, .native, .openai or .openapi (they sit above it).
"""
