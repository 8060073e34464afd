"""pdserve.decode: the decode role of a disaggregated cluster: its scheduler role (decode_role.py:
pages pre-allocated for a remote prefill, then continuous batching), its engine (decode_engine.py:
the KV receive queue beside the shared engine) and its worker loop (decode_worker.py).

May import: pdserve.shared (engine, protocol, args, the worker loop), pdserve.kvtransfer's interface
(base.py). Never pdserve.prefill, the launch package or pdserve.router.
"""
