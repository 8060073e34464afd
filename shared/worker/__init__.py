"""pdserve.shared.worker: the worker process: its ZMQ front, the engine loop, the health and
metrics HTTP port, control routes and the process main of every role.

May import: pdserve.shared (engine, models, protocol, cluster), pdserve.kvtransfer, and the roles
(pdserve.prefill, pdserve.decode) whose engines it runs. Never pdserve.router.
"""
