"""pdserve.shared.launch: the process mains: `worker` (its flags, then the role's engine, loop,
warm-up and registration), starting a worker process from Python and waiting for it, the one-worker
demo, and `serve` (Redis, router and workers on one machine, supervised).

May import: everything below it, the roles (pdserve.prefill, pdserve.decode) whose engines and loops
it builds, and the router's command line (serve). It is the top layer: nothing imports it but tests
and benchmarks.
"""
