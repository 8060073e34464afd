"""pdserve.shared.cluster: what workers and routers share through Redis: membership (a worker's
record and heartbeat, joins and leaves), the prefix cache's KV events and the page hashes they
carry, and the embedded Redis server that `serve` starts when none is given.

May import: redis, msgpack and the standard library; nothing of pdserve but itself (the router and
the workers both read it).
"""
