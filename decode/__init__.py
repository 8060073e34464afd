"""pdserve.decode: the decode role of a disaggregated cluster: its scheduler (pages pre-allocated
for a remote prefill, then continuous batching), its engine (the KV receive queue beside the shared
engine) and its worker process.

May import: pdserve.shared (engine, protocol, args), pdserve.kvtransfer's interface (base.py), and
for its process main pdserve.shared.worker. Never pdserve.prefill or pdserve.router.
"""
