"""pdserve.prefill: the prefill role of a disaggregated cluster: its scheduler (chunked prefill that
holds a request's pages until its transfer is final), its engine (a KV sender per request, fed as
chunks complete) and its worker process.

May import: pdserve.shared (engine, protocol, args), pdserve.kvtransfer's interface (base.py), and
for its process main pdserve.shared.worker. Never pdserve.decode or pdserve.router.
"""
