"""The router and worker flags `serve` accepts and passes on, read from their own parsers.

Rules:
- Every flag of `router` (router/cli.py build_parser) and of `worker` (shared/launch/worker_cli.py
  build_parser) is one of: set by `serve` itself (`ROUTER_SET_BY_SERVE`, `WORKER_SET_BY_SERVE`,
  each with the reason), an engine flag (shared/args.py: `serve` has them all and passes the
  changed ones to every worker, plan.py `engine_flags`), or passed on. So a flag added to either
  parser is accepted by `serve` and passed on without touching serve.
- A flag passed on is given to its child only when its value differs from that child's default
  (`serve` and the child then behave as if it had not been given). A flag both parsers have is
  one `serve` flag passed to both; a router flag that is also an engine flag (`--model-path`)
  takes the engine flag's value.
- Kinds passed on: a value (`store`), a switch (`store_true`/`store_false`), a repeatable value
  (`append`). A flag of another kind is listed in `unsupported` (a unit test keeps it empty).
- Reading a parser's flags uses argparse's `_actions` list: argparse has no public way to list them.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from dataclasses import dataclass

from pdserve.shared.args import EngineArgs

ROUTER_SET_BY_SERVE = {
    "host": "serve's --host",
    "port": "serve's --port",
    "redis_url": "the embedded Redis, or serve's --redis-url",
    "worker_addrs": "the router learns the workers from Redis",
    "log_level": "serve's --log-level",
    "ready_when_serving": "always: the router's ready line then means it serves (launcher.py)",
    "help": "argparse's own",
}
WORKER_SET_BY_SERVE = {
    "role": "from the plan (--workers, --prefill, --decode)",
    "host": "loopback: only the router talks to workers",
    "port": "a free port (0), so workers never race for one",
    "http_port": "a free port, next to the ZMQ one",
    "redis_url": "the embedded Redis, or serve's --redis-url",
    "worker_id": "unique per worker: the worker's default (role@host:port)",
    "advertise_host": "loopback, as --host",
    "log_level": "serve's --log-level",
    "device": "from the plan: serve's --device lists several",
    "help": "argparse's own",
}
_KINDS = {
    argparse._StoreAction: "value",
    argparse._StoreTrueAction: "switch",
    argparse._StoreFalseAction: "switch",
    argparse._AppendAction: "append",
}


@dataclass(frozen=True)
class PassedFlag:
    option: str  # the long option, e.g. --max-body-bytes
    dest: str  # its attribute in serve's namespace
    kind: str  # value | switch | append
    router_default: object = None
    worker_default: object = None
    to_router: bool = False
    to_worker: bool = False


def _actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return list(parser._actions)


def _long_option(action: argparse.Action) -> str:
    return next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0])


def router_parser() -> argparse.ArgumentParser:
    from pdserve.router.cli import build_parser  # aiohttp only: no torch

    return build_parser()


def worker_parser() -> argparse.ArgumentParser:
    from pdserve.shared.launch.worker_cli import build_parser  # imports torch (its metrics import the engine)

    return build_parser()


@dataclass
class PassThrough:
    """The flags passed on (by option), the actions `serve` adds for them, and what it cannot pass."""

    flags: dict[str, PassedFlag]
    router_actions: list[argparse.Action]
    worker_actions: list[argparse.Action]
    unsupported: list[str]

    def router_args(self, ns: argparse.Namespace) -> list[str]:
        return _args([f for f in self.flags.values() if f.to_router], ns, "router_default")

    def worker_args(self, ns: argparse.Namespace) -> list[str]:
        return _args([f for f in self.flags.values() if f.to_worker], ns, "worker_default")


def _args(flags: list[PassedFlag], ns: argparse.Namespace, default_field: str) -> list[str]:
    out: list[str] = []
    for f in flags:
        value = getattr(ns, f.dest, None)
        if value == getattr(f, default_field):
            continue
        if f.kind == "switch":
            out.append(f.option)  # a switch differs from its default only when given
        elif f.kind == "append":
            for item in value or []:
                out += [f.option, str(item)]
        else:
            out += [f.option, str(value)]
    return out


def derive(
    router: argparse.ArgumentParser | None = None, worker: argparse.ArgumentParser | None = None
) -> PassThrough:
    """What `serve` passes on, from the two parsers (built here when not given)."""
    router = router or router_parser()
    worker = worker or worker_parser()
    engine_dests = {f.name for f in dataclasses.fields(EngineArgs)}
    flags: dict[str, PassedFlag] = {}
    added: dict[str, list[argparse.Action]] = {"router": [], "worker": []}
    unsupported: list[str] = []
    sources = (
        ("router", router, ROUTER_SET_BY_SERVE),
        ("worker", worker, WORKER_SET_BY_SERVE),
    )
    for side, parser, set_by_serve in sources:
        for action in _actions(parser):
            if action.dest in set_by_serve or (side == "worker" and action.dest in engine_dests):
                continue
            option = _long_option(action)
            kind = _KINDS.get(type(action))
            if kind is None:
                unsupported.append(f"{side} {option}")
                continue
            known = flags.get(option)
            if known is None:
                if not (side == "router" and action.dest in engine_dests):  # else the engine flag's
                    added[side].append(copy.copy(action))  # a copy: the child's parser keeps its own
                known = PassedFlag(option, action.dest, kind)
            flags[option] = dataclasses.replace(
                known, **{f"to_{side}": True, f"{side}_default": action.default}
            )
    return PassThrough(flags, added["router"], added["worker"], unsupported)


def add_to_parser(group: argparse._ArgumentGroup, actions: list[argparse.Action]) -> None:
    """Adds the child's own flag definitions (type, choices, default, help) to serve's parser."""
    for action in actions:
        group._add_action(action)
