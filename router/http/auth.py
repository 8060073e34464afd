"""API keys: `--api-key` guards every route but the open ones; `--admin-api-key` guards admin routes.

Rules (a request carries its key as `Authorization: Bearer <key>`):
- the open routes are `/health` (probes) and `/openapi.json`, `/docs` (the API's description,
  nothing about the served model or its workers); `/metrics` needs the API key like any other route
  (a scraper sends it as a bearer token);
- admin routes (`ADMIN_PATHS`) need the admin key when one is set, else the API key when set;
- every other route needs the API key when one is set; the admin key works there too;
- a missing or wrong key is 401 in the OpenAI error shape; keys are compared in constant time;
  a header of any bytes is only a wrong key (aiohttp hands undecodable bytes over as surrogates);
- the key is checked before anything else looks at the request: an unauthenticated request is a
  401 whatever its body (router/app.py puts this middleware outside the body-size limit).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web

from pdserve.router.http.limits import http_error

OPEN_PATHS = frozenset({"/health", "/openapi.json", "/docs"})
ADMIN_PATHS = frozenset(
    {
        "/flush_cache",
        "/update_weights_from_disk",
        "/update_weights",  # SGLang's older name of the same route
        "/abort_request",
        "/start_expert_distribution_record",
        "/stop_expert_distribution_record",
        "/dump_expert_distribution_record",
        # control routes: they change what every client gets (weights, pauses, profiling, logging)
        "/update_weight_version",
        "/update_weights_from_tensor",
        "/get_weights_by_name",
        "/pause_generation",
        "/continue_generation",
        "/start_profile",
        "/stop_profile",
        "/freeze_gc",
        "/set_internal_state",
        "/configure_logging",
    }
)

KEYS_KEY = web.AppKey("pdserve_api_keys", tuple)  # (api_key | None, admin_api_key | None)


def bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _key_bytes(text: str) -> bytes:
    # surrogatepass: a header's undecodable bytes arrive as lone surrogates, which plain UTF-8 refuses
    return text.encode("utf-8", "surrogatepass")


def _matches(token: str | None, key: str | None) -> bool:
    return token is not None and key is not None and hmac.compare_digest(_key_bytes(token), _key_bytes(key))


def required_keys(path: str, api_key: str | None, admin_key: str | None) -> list[str]:
    """The keys that open `path` (empty: no key needed)."""
    if path in OPEN_PATHS:
        return []
    if path in ADMIN_PATHS:
        if admin_key:
            return [admin_key]
        return [api_key] if api_key else []
    return [k for k in (api_key, admin_key) if k] if api_key else []


@web.middleware
async def auth_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    api_key, admin_key = request.app[KEYS_KEY]
    keys = required_keys(request.path, api_key, admin_key)
    if keys:
        token = bearer_token(request)
        if not any(_matches(token, k) for k in keys):
            what = "an admin API key" if request.path in ADMIN_PATHS and admin_key else "an API key"
            reason = "no API key was given" if token is None else "the API key is wrong"
            raise http_error(
                401, f"Unauthorized: {request.path} needs {what} (Authorization: Bearer <key>); {reason}."
            )
    return await handler(request)
