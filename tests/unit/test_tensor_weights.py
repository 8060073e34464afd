"""`/update_weights_from_tensor` on the worker side, without processes: SGLang's payload read by the
allow-listed unpickler (shared/engine/tensor_payload.py), and tensors checked, copied and read back
by name on a tiny Llama and a tiny tied Qwen2 (shared/engine/tensor_weights.py).
"""

from __future__ import annotations

import base64
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.multiprocessing
from safetensors.torch import load_file

from pdserve.shared.engine.tensor_payload import TensorPayloadError, decode_named_tensors
from pdserve.shared.engine.tensor_weights import apply_named_tensors, check_named_tensors, weights_by_name
from pdserve.shared.engine.weight_swap import WeightsUpdateError
from pdserve.shared.models.config import ModelConfig
from pdserve.shared.models.loader import load_model
from tests.helpers.sglang_control import serialize_named_tensors as serialize
from tests.helpers.tiny_models import make_tiny_model


def tiny(kind: str, tmp_path: Path):
    model_dir = make_tiny_model(kind, tmp_path / kind)
    config = ModelConfig.from_path(model_dir, dtype="float32", device="cpu")
    return load_model(config, model_dir), load_file(str(model_dir / "model.safetensors"))


# ---------------------------------------------------------------------- the payload


def test_shared_tensors_and_parameters_come_back_with_their_values():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    p = torch.nn.Parameter(torch.ones(2))
    named = decode_named_tensors(serialize([("a", t), ("b", p)]))
    assert [n for n, _ in named] == ["a", "b"]
    torch.testing.assert_close(named[0][1], t)
    torch.testing.assert_close(named[1][1], torch.ones(2))
    raw = base64.b64decode(serialize([("a", t)]))
    assert decode_named_tensors(raw)[0][0] == "a"  # bytes are taken as they are


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        (base64.b64encode(pickle.dumps([("a", _RunsCode())])).decode(), "names posix.system"),
        (base64.b64encode(pickle.dumps([("a", torch.ones(2))])).decode(), "torch._utils._rebuild_tensor_v2"),
        (
            serialize([("a", torch.ones(2))], strategy="file_descriptor"),
            "set_sharing_strategy('file_system')",
        ),
        (serialize({"a": torch.ones(2)}), "holds a dict"),
        (serialize([("a", 3)]), "(name, tensor) pair"),
        ("%%%", "not base64"),
        (base64.b64encode(b"not a pickle").decode(), "not a readable pickle"),
    ],
    ids=["code", "by-value", "fd-shared", "dict", "not-a-tensor", "base64", "garbage"],
)
def test_anything_but_shared_tensor_pairs_is_refused_without_running_it(entry, words, capfd):
    with pytest.raises(TensorPayloadError) as info:
        decode_named_tensors(entry)
    assert words in str(info.value)
    assert "pwned" not in capfd.readouterr().out


# ---------------------------------------------------------------------- checking, copying, reading


def test_checkpoint_names_reach_merged_parameters_and_all_or_nothing_is_copied(tmp_path):
    model, checkpoint = tiny("llama", tmp_path)
    k_name = "model.layers.0.self_attn.k_proj.weight"
    new_k = torch.full_like(checkpoint[k_name], 0.5)
    apply_named_tensors(check_named_tensors(model, [(k_name, new_k)]))
    torch.testing.assert_close(torch.tensor(weights_by_name(model, k_name, 1000)), new_k)
    q_name = "model.layers.0.self_attn.q_proj.weight"  # the other rows of the same qkv_proj kept theirs
    torch.testing.assert_close(torch.tensor(weights_by_name(model, q_name, 1000)), checkpoint[q_name])

    norm = weights_by_name(model, "model.norm.weight")
    bad = [
        ([("model.norm.weight", torch.zeros(64)), (k_name, torch.zeros(3, 3))], "has shape [3, 3]"),
        ([("model.norm.weight", torch.zeros(64)), ("model.nope", torch.zeros(1))], "no parameter model.nope"),
        ([("model.norm.weight", torch.zeros(64, dtype=torch.int64))], "not a floating-point tensor"),
        ([], "no tensors"),
    ]
    for named, words in bad:
        with pytest.raises(WeightsUpdateError, match=r"^Failed to update weights: ") as info:
            check_named_tensors(model, named)
        assert words in str(info.value)
    assert weights_by_name(model, "model.norm.weight") == norm  # nothing was copied

    own = "model.layers.0.self_attn.qkv_proj.weight"  # "direct": the model's own names
    rows = torch.zeros(2, 64)
    with pytest.raises(WeightsUpdateError, match="has no parameter"):
        check_named_tensors(model, [(k_name, new_k)], load_format="direct")
    full = torch.tensor(weights_by_name(model, own, 10_000))
    full[:2] = rows
    apply_named_tensors(check_named_tensors(model, [(own, full)], load_format="direct"))
    torch.testing.assert_close(torch.tensor(weights_by_name(model, own, 2)), rows)
    with pytest.raises(WeightsUpdateError, match="flattened_bucket"):
        check_named_tensors(model, [(own, full)], load_format="flattened_bucket")


def test_truncation_and_the_tied_lm_head(tmp_path):
    model, checkpoint = tiny("qwen2", tmp_path)  # tied embeddings: no lm_head parameter
    embed = checkpoint["model.embed_tokens.weight"]
    torch.testing.assert_close(torch.tensor(weights_by_name(model, "lm_head.weight", 3)), embed[:3])
    assert len(weights_by_name(model, "model.norm.weight", 5)) == 5  # 1-D: elements
    checked = check_named_tensors(model, [("lm_head.weight", torch.zeros_like(embed))])
    assert checked.copies == []  # skipped as a checkpoint load skips it: the embedding is untouched
    with pytest.raises(KeyError):
        weights_by_name(model, "model.missing.weight")


def test_the_scales_loading_drops_are_skipped_by_checkpoint_name_only(tmp_path):
    """KV-cache scales (and, on an fp8 model, static input scales) are dropped at load: a tensor
    update that carries them (an fp8 checkpoint's tensors as they are) updates the weights beside them."""
    model, checkpoint = tiny("llama", tmp_path)
    k_name = "model.layers.0.self_attn.k_proj.weight"
    new_k = torch.full_like(checkpoint[k_name], 0.25)
    scales = [
        ("model.layers.0.self_attn.k_scale", torch.tensor(0.5)),
        ("model.layers.1.self_attn.v_scale", torch.tensor(2.0)),
    ]
    apply_named_tensors(check_named_tensors(model, [(k_name, new_k), *scales]))
    torch.testing.assert_close(torch.tensor(weights_by_name(model, k_name, 1000)), new_k)
    with pytest.raises(WeightsUpdateError, match="no parameter model.layers.0.self_attn.k_scale"):
        check_named_tensors(model, scales, load_format="direct")
    # a 16-bit model has no input scales to drop: one is a tensor it does not have
    with pytest.raises(WeightsUpdateError, match="no parameter .*input_scale"):
        check_named_tensors(model, [("model.layers.0.self_attn.k_proj.input_scale", torch.tensor(1.0))])

    fp8_model = load_model(
        ModelConfig.from_path(tmp_path / "llama", dtype="float32", device="cpu"),
        tmp_path / "llama",
        quantization="fp8",
    )
    input_scale = ("model.layers.0.self_attn.k_proj.input_scale", torch.tensor(1.0))
    apply_named_tensors(check_named_tensors(fp8_model, [(k_name, new_k), input_scale]))
