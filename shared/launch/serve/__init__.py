"""pdserve.shared.launch.serve: `serve`: Redis, router and workers on one machine in one command, with
supervision (restarts with back-off) and the flags it passes on.

May import: anything the processes it starts need to be described (the worker's and router's
command lines, the embedded Redis). Nothing but tests imports it.
"""
