"""SGLang's weight and pause routes through the router, checked on the workers' real behaviour.

Two real tiny-Llama workers behind one router (round robin, an admin key;
tests/helpers/sglang_routes_stack.py), in order:
1. weight version: `/update_weight_version` reaches `/get_weight_version`, `/get_model_info` and
   the next response's meta_info; bad bodies are 400s;
2. `/get_weights_by_name` returns SGLang's truncated parameter; `/update_weights_from_tensor`
   (a ForkingPickler payload of shared CPU tensors, as SGLang's clients send) changes it on both
   workers, moves the version and changes greedy output; misfits, fd-shared tensors and a pickle
   that names anything but tensors are 400s that change nothing;
3. `/pause_generation` (abort, SGLang's default): the running request ends with finish_reason
   abort, a new one waits while paused and finishes after `/continue_generation`; a tensor update
   while paused runs at once;
4. `/pause_generation` in place: a running stream gets no token while paused, then finishes with
   exactly the tokens of an undisturbed run; a weights update meanwhile is refused, saying why.
"""

from __future__ import annotations

import base64
import contextlib
import pickle
import time
from pathlib import Path

import pytest
import requests
import torch
import torch.multiprocessing

from tests.helpers.cluster_waits import run_in_thread, wait_until
from tests.helpers.router_http import assert_error
from tests.helpers.sglang_control import serialize_named_tensors as serialize
from tests.helpers.sglang_control import stream_with_arrivals

# the fixtures come from the helper module: test arguments that name them are not redefinitions
# ruff: noqa: F811
from tests.helpers.sglang_routes_stack import (  # noqa: F401 (fixtures)
    GREEDY,
    PROMPT,
    admin,
    generate,
    model_dir,
    on_both,
    router,
    workers,
)

pytestmark = [pytest.mark.slow, pytest.mark.untimed]

NORM = "model.norm.weight"  # 64 floats in the tiny Llama
K_PROJ = "model.layers.0.self_attn.k_proj.weight"  # [32, 64]: rows of the merged qkv_proj


@contextlib.contextmanager
def paused(url: str, mode: str | None = None):
    resp = admin(url, "/pause_generation", {"mode": mode} if mode else None)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"message": "Generation paused successfully.", "status": "ok"}
    try:
        yield
    finally:
        resp = admin(url, "/continue_generation")
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"message": "Generation continued successfully.", "status": "ok"}


def assert_values(values: list, expected: torch.Tensor) -> None:
    torch.testing.assert_close(torch.tensor(values), expected.float(), rtol=0, atol=0)


def get_weights(url: str, name: str, truncate_size: int | None = None) -> list:
    body = {"name": name} if truncate_size is None else {"name": name, "truncate_size": truncate_size}
    resp = admin(url, "/get_weights_by_name", body)
    assert resp.status_code == 200, resp.text
    return resp.json()


# ---------------------------------------------------------------------- 1. weight version


def test_weight_version_update_is_seen_everywhere(router):
    assert requests.get(router + "/get_weight_version", timeout=10).json() == {"weight_version": "default"}
    resp = admin(router, "/update_weight_version", {"new_version": "rl-step-3"})
    assert resp.status_code == 200, resp.text
    assert resp.json() == {
        "success": True,
        "message": "Weight version updated to rl-step-3",
        "new_version": "rl-step-3",
    }
    assert requests.get(router + "/get_weight_version", timeout=10).json() == {"weight_version": "rl-step-3"}
    assert requests.get(router + "/get_model_info", timeout=10).json()["weight_version"] == "rl-step-3"
    assert {generate(router)["meta_info"]["weight_version"] for _ in range(2)} == {"rl-step-3"}

    assert_error(admin(router, "/update_weight_version", {}), 400, "new_version must be a non-empty string")
    assert_error(admin(router, "/update_weight_version", {"new_version": ""}), 400, "non-empty")
    assert_error(
        admin(router, "/update_weight_version", {"new_version": "x", "abort_all_requests": "yes"}),
        400,
        "abort_all_requests must be a boolean",
    )


# ---------------------------------------------------------------------- 2. tensors in, parameters out


def test_get_weights_by_name_returns_the_truncated_parameter(router, model_dir):
    from safetensors.torch import load_file

    checkpoint = load_file(str(Path(model_dir) / "model.safetensors"))
    assert_values(get_weights(router, NORM), checkpoint[NORM])  # 64 elements: fewer than 100
    rows = get_weights(router, K_PROJ, truncate_size=3)  # a part of the merged qkv_proj, by its own name
    assert_values(rows, checkpoint[K_PROJ][:3])
    own_name = get_weights(router, "model.layers.0.self_attn.qkv_proj.weight", truncate_size=1)
    assert_values(own_name, checkpoint["model.layers.0.self_attn.q_proj.weight"][:1])

    assert_error(admin(router, "/get_weights_by_name", {"name": "model.nope"}), 400, "model.nope")
    assert_error(admin(router, "/get_weights_by_name", {}), 400, "name must be")
    assert_error(
        admin(router, "/get_weights_by_name", {"name": NORM, "truncate_size": 0}), 400, "truncate_size"
    )


def test_update_weights_from_tensor_changes_parameters_on_every_worker(router):
    before = on_both(router)
    assert before[0] == before[1]
    version = requests.get(router + "/get_weight_version", timeout=10).json()["weight_version"]
    new_norm = torch.linspace(-1.0, 1.0, 64)
    new_k = torch.full((32, 64), 0.25)
    payload = serialize([(NORM, new_norm), (K_PROJ, new_k)])
    resp = admin(router, "/update_weights_from_tensor", {"serialized_named_tensors": [payload]})
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"success": True, "message": "Success"}

    assert_values(get_weights(router, NORM), new_norm)
    assert_values(get_weights(router, K_PROJ, truncate_size=2), new_k[:2])
    after = on_both(router)
    assert after[0] == after[1] != before[0]  # both workers serve the new weights
    new_version = requests.get(router + "/get_weight_version", timeout=10).json()["weight_version"]
    assert new_version != version

    resp = admin(
        router,
        "/update_weights_from_tensor",
        {"serialized_named_tensors": [serialize([(NORM, new_norm * 2)])], "weight_version": "tensor-v2"},
    )
    assert resp.json() == {"success": True, "message": "Success Weight version updated to tensor-v2."}
    assert generate(router)["meta_info"]["weight_version"] == "tensor-v2"
    del payload  # the workers copied the values: the shared segments may go now


def test_bad_tensor_updates_are_400s_that_change_nothing(router):
    norm = get_weights(router, NORM)

    def refused(body: dict, *words: str) -> None:
        assert_error(admin(router, "/update_weights_from_tensor", body), 400, *words)

    def update(named, **kw) -> requests.Response:
        return admin(
            router, "/update_weights_from_tensor", {"serialized_named_tensors": [serialize(named)], **kw}
        )

    resp = update([(NORM, torch.zeros(64)), ("model.layers.0.nope.weight", torch.zeros(3))])
    assert resp.status_code == 400 and "no parameter model.layers.0.nope.weight" in resp.json()["message"]
    resp = update([(NORM, torch.zeros(65))])
    assert resp.status_code == 400 and "has shape [65]" in resp.json()["message"]
    resp = update([(NORM, torch.zeros(64))], load_format="flattened_bucket")
    assert resp.status_code == 400 and "flattened_bucket" in resp.json()["message"]

    fd_shared = serialize([(NORM, torch.zeros(64))], strategy="file_descriptor")
    resp = admin(router, "/update_weights_from_tensor", {"serialized_named_tensors": [fd_shared]})
    assert resp.status_code == 400 and "file_system" in resp.json()["message"]

    class Evil:  # a pickle that would run a command if the worker unpickled it blindly
        def __reduce__(self):
            return (print, ("pwned",))

    evil = base64.b64encode(pickle.dumps([(NORM, Evil())])).decode()
    resp = admin(router, "/update_weights_from_tensor", {"serialized_named_tensors": [evil]})
    assert resp.status_code == 400 and "builtins.print" in resp.json()["message"]

    refused({}, "serialized_named_tensors")
    resp = admin(router, "/update_weights_from_tensor", {"serialized_named_tensors": [fd_shared] * 2})
    assert resp.status_code == 400 and "one entry per tensor-parallel rank" in resp.json()["message"]
    resp = admin(router, "/update_weights_from_tensor", {"serialized_named_tensors": ["not base64!"]})
    assert resp.status_code == 400 and "not base64" in resp.json()["message"]  # SGLang's {success, message}
    refused({"serialized_named_tensors": [fd_shared], "flush_cache": "no"}, "flush_cache must be a boolean")
    assert get_weights(router, NORM) == norm  # nothing changed on any worker


# ---------------------------------------------------------------------- 3-4. pause and continue


def test_pause_aborts_what_runs_holds_what_comes_and_continue_releases_it(router):
    results: dict = {}
    arrivals: list = []
    long_params = {"temperature": 0.0, "max_new_tokens": 900, "ignore_eos": True}
    running = run_in_thread(
        lambda: stream_with_arrivals(router, PROMPT, long_params, arrivals), results, "running"
    )
    wait_until(lambda: bool(arrivals), what="the stream to start")
    with paused(router):
        running.join(30)
        reason = results["running"]["meta_info"]["finish_reason"]
        assert reason["type"] == "abort" and "paused" in reason["message"], reason
        waiting = run_in_thread(lambda: generate(router), results, "waiting")
        time.sleep(1.5)
        assert waiting.is_alive() and "waiting" not in results  # held on the worker, not refused
        # no requests in the engines: a tensor update needs no drain and runs while paused
        payload = serialize([(NORM, torch.ones(64))])
        resp = admin(router, "/update_weights_from_tensor", {"serialized_named_tensors": [payload]})
        assert resp.status_code == 200, resp.text
    waiting.join(60)
    assert results["waiting"]["meta_info"]["completion_tokens"] == GREEDY["max_new_tokens"]


def test_pause_in_place_holds_a_stream_and_continue_finishes_it_unchanged(router):
    params = {"temperature": 0.0, "max_new_tokens": 700, "ignore_eos": True}
    reference = generate(router, params)["output_ids"]
    arrivals: list = []
    results: dict = {}
    stream = run_in_thread(lambda: stream_with_arrivals(router, PROMPT, params, arrivals), results, "stream")
    wait_until(lambda: arrivals and arrivals[-1][1] >= 20, what="the stream to start")
    with paused(router, "in_place"):
        paused_at = time.monotonic()
        time.sleep(1.5)
        quiet = [n for t, n in arrivals if t > paused_at + 0.3]  # outputs already sent may still land
        assert not quiet, f"tokens arrived while paused: {quiet}"
        held_at = arrivals[-1][1]
        assert held_at < params["max_new_tokens"]
        resp = admin(
            router,
            "/update_weights_from_tensor",
            {"serialized_named_tensors": [serialize([(NORM, torch.ones(64))])]},
        )
        assert resp.status_code == 400 and "paused with requests held in place" in resp.json()["message"]
    stream.join(120)
    last = results["stream"]
    assert last["meta_info"]["finish_reason"]["type"] == "length"
    assert last["output_ids"] == reference  # resumed where it was, its KV untouched
    assert any(n > held_at for _, n in arrivals)


def test_pause_modes_and_admin_key(router):
    assert_error(admin(router, "/pause_generation", {"mode": "retract"}), 400, "retract", "in_place")
    assert_error(admin(router, "/pause_generation", {"mode": "sleep"}), 400, "mode must be one of")
    assert_error(admin(router, "/pause_generation", [1]), 400, "JSON object")
    for path in (
        "/pause_generation",
        "/continue_generation",
        "/update_weights_from_tensor",
        "/start_profile",
    ):
        assert_error(requests.post(router + path, json={}, timeout=10), 401, "admin API key")
    assert generate(router)["meta_info"]["finish_reason"]["type"] == "length"  # nothing was paused
