"""pdserve.prefill: the prefill role of a disaggregated cluster: its scheduler role (prefill_role.py:
chunked prefill that holds a request's pages until its transfer is final), its engine
(prefill_engine.py: a KV sender per request, fed as chunks complete; one PrefillDone per request)
and its worker loop (prefill_worker.py).

May import: pdserve.shared (engine, protocol, args, the worker loop), pdserve.kvtransfer's interface
(base.py). Never pdserve.decode, the launch package or pdserve.router.
"""
