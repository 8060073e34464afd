"""SGLang's native API seed flows through the router, on SmolLM2-135M-Instruct: real `worker` and
`router` processes on loopback (one worker, one router, no keys), with the seed's own assertions
(get_model_info, server_info, health, health_generate, flush_cache, tokenize / detokenize round
trip, update_weights_from_disk, the routes of other model kinds), the special token flags of
tokenize / detokenize, and stop strings on real text. Generation is kept to a few tokens: the CI
machine is small. The tiny-model stack of the native API is in test_router_native_*.py.
"""

from __future__ import annotations

import pytest
import requests

from tests.helpers.router_http import assert_error, sse_chunks

pytestmark = [pytest.mark.slow, pytest.mark.untimed]

SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def smol(worker_launcher, router_launcher) -> str:
    worker = worker_launcher("--max-total-tokens", "2048", "--log-level", "warning")
    return router_launcher("--worker-addr", worker.zmq_address).url


# ---------------------------------------------------------------------- seed flows (SmolLM2)


def test_seed_get_model_info(smol):
    response_json = requests.get(f"{smol}/get_model_info").json()
    assert response_json["model_path"] == SMOL
    assert response_json["is_generation"] is True
    assert response_json["tokenizer_path"] == SMOL
    assert response_json["preferred_sampling_params"] is None
    assert response_json.keys() == {
        "model_path",
        "is_generation",
        "tokenizer_path",
        "preferred_sampling_params",
        "weight_version",
        "has_image_understanding",
        "has_audio_understanding",
        "model_type",
        "architectures",
    }
    assert response_json["model_type"] == "llama"
    assert response_json["architectures"] == ["LlamaForCausalLM"]
    assert response_json["has_image_understanding"] is False


def test_seed_server_info(smol):
    for path in ("/server_info", "/get_server_info"):
        info = requests.get(smol + path).json()
        assert info["model_path"] == SMOL and info["version"]
        assert info["max_total_num_tokens"] == 2048
        assert info["live_workers"]["mixed"] and not info["live_workers"]["prefill"]
        (worker,) = info["workers"]
        assert worker["args"]["model_path"] == SMOL and worker["args"]["max_total_tokens"] == 2048
        assert info["memory_pool_sizes"][worker["worker_id"]]["max_total_num_tokens"] == 2048
        assert info["policy"] == "cache_aware" and info["api_key"] is None


def test_seed_generate_health_and_flush(smol):
    # the seed's request, with a token limit: a full default-length answer takes long on this CPU
    data = {"text": "What is the capital of France?", "sampling_params": {"max_new_tokens": 4}}
    out = requests.post(f"{smol}/generate", json=data).json()
    assert isinstance(out["text"], str) and len(out["output_ids"]) == out["meta_info"]["completion_tokens"]
    meta = out["meta_info"]
    assert meta["prompt_tokens"] == 7 and 1 <= meta["completion_tokens"] <= 4
    assert {"id", "finish_reason", "cached_tokens", "e2e_latency"} <= meta.keys()

    response = requests.get(f"{smol}/health_generate")
    assert response.status_code == 200 and response.text == ""
    response = requests.get(f"{smol}/health")
    assert response.status_code == 200 and response.text == ""
    response = requests.post(f"{smol}/flush_cache")
    assert response.status_code == 200 and response.text.startswith("Cache flushed.")
    response = requests.post(f"{smol}/flush_cache?timeout=30")
    assert response.status_code == 200


def test_seed_tokenize_detokenize_round_trip(smol):
    input_text = "SGLang provides efficient tokenization endpoints."
    tokenize_payload = {"model": SMOL, "prompt": input_text, "add_special_tokens": False}
    tokenization_result = requests.post(f"{smol}/tokenize", json=tokenize_payload).json()
    token_ids = tokenization_result.get("tokens")
    assert token_ids and tokenization_result["count"] == len(token_ids)
    assert tokenization_result["max_model_len"] == 8192
    detokenize_payload = {"model": SMOL, "tokens": token_ids, "skip_special_tokens": True}
    reconstructed = requests.post(f"{smol}/detokenize", json=detokenize_payload).json()["text"]
    assert reconstructed == input_text
    # the /v1 aliases and batches
    batch = requests.post(f"{smol}/v1/tokenize", json={"prompt": ["a b", "c"]}).json()
    assert batch["count"] == [len(t) for t in batch["tokens"]]
    texts = requests.post(f"{smol}/v1/detokenize", json={"tokens": batch["tokens"]}).json()["text"]
    assert texts == ["a b", "c"]
    bad = requests.post(f"{smol}/detokenize", json={"tokens": [1, 10**9]})
    assert_error(bad, 400, "tokens")


def test_tokenize_and_detokenize_special_token_flags_on_smollm2(smol):
    # SmolLM2 adds no BOS/EOS to a text (its post-processor is empty), so add_special_tokens changes
    # nothing there, as in SGLang (tokenizer.encode); a special token written in the text is parsed
    # as that token either way. skip_special_tokens drops <|im_start|> (1) and <|im_end|> (2) or keeps them.
    ids = {}
    for flag in (True, False):
        for text in ("hello world", "<|im_start|>user"):
            out = requests.post(f"{smol}/tokenize", json={"prompt": text, "add_special_tokens": flag}).json()
            ids[(text, flag)] = out["tokens"]
    assert ids[("hello world", True)] == ids[("hello world", False)] == [28120, 905]
    assert ids[("<|im_start|>user", True)] == ids[("<|im_start|>user", False)] == [1, 4093]
    wrapped = [1, 28120, 905, 2]
    for skip, expected in ((True, "hello world"), (False, "<|im_start|>hello world<|im_end|>")):
        body = {"tokens": wrapped, "skip_special_tokens": skip}
        assert requests.post(f"{smol}/detokenize", json=body).json()["text"] == expected
        batch = requests.post(f"{smol}/detokenize", json={**body, "tokens": [wrapped, [2]]}).json()["text"]
        assert batch == [expected, "" if skip else "<|im_end|>"]
    assert requests.post(f"{smol}/detokenize", json={"tokens": wrapped}).json()["text"] == "hello world"


def test_seed_update_weights_from_disk(smol):
    before = requests.get(f"{smol}/get_model_info").json()["weight_version"]
    response = requests.post(f"{smol}/update_weights_from_disk", json={"model_path": SMOL})
    assert response.json()["success"] is True
    assert response.json()["message"] == "Succeeded to update model weights."
    after = requests.get(f"{smol}/get_model_info").json()["weight_version"]
    assert after != before

    data = {"model_path": f"{SMOL}-wrong"}
    response = requests.post(f"{smol}/update_weights_from_disk", json=data)
    response_json = response.json()
    assert response.status_code == 400
    assert response_json["success"] is False
    assert response_json["message"] == (
        f"Failed to get weights iterator: {SMOL}-wrong (repository not found)."
    )
    assert requests.get(f"{smol}/get_model_info").json()["weight_version"] == after
    # generation still works on the (re)loaded weights
    out = requests.post(f"{smol}/generate", json={"text": "Hi", "sampling_params": {"max_new_tokens": 2}})
    assert out.status_code == 200 and out.json()["meta_info"]["weight_version"] == after


def test_seed_routes_of_other_model_kinds_answer_400(smol):
    bodies = {
        "/encode": {"model": SMOL, "text": "Once upon a time"},
        "/classify": {"model": SMOL, "text": ["a", "b"]},
        "/v1/rerank": {"model": SMOL, "query": "what is panda?", "documents": ["hi"]},
    }
    needs = {"/encode": "embedding", "/classify": "reward", "/v1/rerank": "rerank"}
    for path, body in bodies.items():
        assert_error(requests.post(smol + path, json=body), 400, SMOL, needs[path])
    for path in ("/start_expert_distribution_record", "/stop_expert_distribution_record"):
        assert_error(requests.post(smol + path), 400, "mixture-of-experts")
    assert_error(requests.post(smol + "/dump_expert_distribution_record"), 400, "LlamaForCausalLM")


def test_stop_strings_on_real_text(smol):
    base = {"text": "The capital of France is", "sampling_params": {"temperature": 0, "max_new_tokens": 6}}
    full = requests.post(f"{smol}/generate", json=base).json()
    assert full["text"].startswith(" Paris.")
    stopped = requests.post(
        f"{smol}/generate", json={**base, "sampling_params": {**base["sampling_params"], "stop": ["."]}}
    ).json()
    assert stopped["text"] == " Paris"
    assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": "."}
    assert stopped["output_ids"] == full["output_ids"][:2]
    kept = {**base["sampling_params"], "stop": ".", "no_stop_trim": True}
    assert (
        requests.post(f"{smol}/generate", json={**base, "sampling_params": kept}).json()["text"] == " Paris."
    )
    # streaming: no chunk ever shows (the start of) the stop string, or text after it
    params = {**base["sampling_params"], "stop": ["\n\nThe"]}
    chunks = sse_chunks(
        requests.post(f"{smol}/generate", json={**base, "sampling_params": params, "stream": True})
    )
    texts = [c["text"] for c in chunks[:-1]]
    assert texts[-1] == " Paris."
    assert all("\n" not in t for t in texts)
    assert chunks[-2]["meta_info"]["finish_reason"] == {"type": "stop", "matched": "\n\nThe"}
    assert chunks[-2]["output_ids"] == full["output_ids"][:5]
