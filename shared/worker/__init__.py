"""The worker process: ZMQ front, engine loop, health/metrics HTTP port."""
