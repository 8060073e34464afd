"""pdserve.router.cluster: the workers as the router sees them. The pool (worker_pool.py:
membership, liveness, load, a circuit breaker each, circuit_breaker.py), one ZMQ connection per
worker and the hand-out of its outputs (worker_conn.py, output_delivery.py, output_merge.py),
membership from Redis (cluster_view.py), worker choice (policies.py) over the approximate prefix
tree of the prompts the router sent (approx_prefix_tree.py) or the precise prefix index folded
from the workers' KV events (precise_prefix_index.py), and the pairing of prefill and decode
workers (pairing.py).

May import: pdserve.shared's protocol, cluster and KV event types and page hashes (and what
pdserve.router may import). Nothing else of pdserve.router (not even router/state.py), and never
aiohttp: it knows workers, not HTTP requests.
"""
