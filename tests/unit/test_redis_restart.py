"""EmbeddedRedis.poll/restart: a server that died comes back on the same port (same URL)."""

from __future__ import annotations

import time

import psutil
import redis

from pdserve.shared.cluster.redis_server import EmbeddedRedis


def test_a_killed_server_restarts_on_the_same_port():
    server = EmbeddedRedis()
    try:
        assert server.poll() is None
        first_pid, port = server.pid, server.port
        psutil.Process(first_pid).kill()
        deadline = time.monotonic() + 5
        while server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.poll() == -9
        server.restart()
        assert server.poll() is None and server.pid != first_pid and server.port == port
        client = redis.Redis.from_url(server.url)
        assert client.ping() is True
        client.close()
    finally:
        server.stop()
    assert server.poll() is None  # stopped: nothing to report
