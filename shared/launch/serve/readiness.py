"""Is the cluster ready for a client: the router's /health is 200 and it lists every worker as live.

Rules:
- /health turns 200 as soon as one worker can serve; a client right after `serve`'s ready line
  must see them all, so `serve` also reads the router's /get_server_info (router/native/info.py)
  and waits until each started worker is there and live: matched by the ZMQ address from its
  ready line against the `workers` entries' `zmq_addr`, live when its id is in `live_workers`.
- /get_server_info needs the API key when the router has one (router/http/auth.py): sent as a Bearer.
- `missing_workers` is pure; `fetch_server_info` is the one HTTP call.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

SERVER_INFO_PATH = "/get_server_info"


def missing_workers(server_info: dict[str, Any], zmq_addrs: dict[str, str]) -> list[str]:
    """The names (of `zmq_addrs`: name -> ZMQ address) the router does not list as live."""
    live = {wid for ids in (server_info.get("live_workers") or {}).values() for wid in ids}
    live_addrs = {w.get("zmq_addr") for w in server_info.get("workers") or [] if w.get("worker_id") in live}
    return [name for name, addr in zmq_addrs.items() if addr not in live_addrs]


def fetch_server_info(base_url: str, api_key: str | None, timeout_s: float = 2.0) -> dict[str, Any] | None:
    """The router's server info, or None when it does not answer 200 with JSON."""
    request = urllib.request.Request(base_url + SERVER_INFO_PATH)
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            data = json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
