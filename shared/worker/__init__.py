"""pdserve.shared.worker: a worker's loop and its parts: the ZMQ front, request intake and refusals,
owners of requests, weight updates, control routes, the profiler, metrics and the health HTTP port,
and a small client. The roles' workers (prefill/prefill_worker.py, decode/decode_worker.py) build on its loop.

May import: pdserve.shared (engine, models, protocol, cluster) and pdserve.kvtransfer. Never the
roles, the launch package or pdserve.router.
"""
