"""compose/docker-compose.yml: every service command is one that pdserve's own parsers accept.

Docker is not available on the CI machine, so the file is checked the way compose reads it: YAML
with `${VAR}` / `${VAR:-default}` / `${VAR:?message}` substitution, then each pdserve command line
through the real argparse parser of its program."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from pdserve.router.cli import build_parser as router_parser
from pdserve.shared.worker.cli import build_parser as worker_parser

COMPOSE = Path(__file__).resolve().parents[2] / "compose" / "docker-compose.yml"
ENV = {"MODEL": "/models/llama"}


def _substitute(text: str, env: dict[str, str]) -> str:
    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if name in env:
            return env[name]
        if op == ":?":
            raise AssertionError(f"{name} is required: {arg}")
        return arg if op == ":-" else ""

    return re.sub(r"\$\{(\w+)(:-|:\?)?([^}]*)\}", one, text)


def _services() -> dict:
    return yaml.safe_load(_substitute(COMPOSE.read_text(), ENV))["services"]


def test_every_pdserve_command_parses():
    services = _services()
    roles = {}
    for name, svc in services.items():
        cmd = svc.get("command")
        if name == "redis":
            continue
        program, args = cmd[0], cmd[1:]
        parser = {"router": router_parser, "worker": worker_parser}[program]()
        ns = parser.parse_args(args)  # exits (SystemExit) on an unknown flag or a bad value
        if program == "worker":
            roles[name] = ns.role
            assert ns.model_path == ENV["MODEL"] and ns.redis_url == "redis://redis:6379"
            assert ns.advertise_host == svc["hostname"] == ns.worker_id, name
            gpus = svc["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
            assert len(gpus) == 1
        else:
            assert ns.redis_url == "redis://redis:6379" and ns.host == "0.0.0.0"
    assert sorted(roles.values()) == ["decode", "prefill"]
    gpus = [services[n]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"][0] for n in roles]
    assert len(set(gpus)) == len(gpus), "each worker has a GPU of its own"


def test_model_is_required():
    try:
        _substitute(COMPOSE.read_text(), {})
    except AssertionError as e:
        assert "MODEL" in str(e)
    else:
        raise AssertionError("compose must refuse to start without MODEL")
