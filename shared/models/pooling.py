"""How an embedding model turns a prompt's last hidden states into one vector, and which models
are embedding models.

Sentence-transformers directories say it in `modules.json` (a Transformer, then a Pooling module
whose `config.json` names the pooling mode, then `Normalize` when the vectors are unit length).
Without those files: encoders pool their CLS token, decoders their last token (e5-mistral,
gte-Qwen2), both normalized, as SGLang and vLLM default them. Max pooling is not supported.

Classifiers (cross-encoders, reward models) run the same way: their pooled row goes through their
head (shared/models/sequence_classification.py), and the scores are the answer.

A model is an embedding model when `--is-embedding` says so, when its architecture is one of the
bare encoders or decoders (`BertModel`, `Qwen2Model`, ...: no head to generate with), or when its
directory is a sentence-transformers one (`modules.json`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

POOLING_METHODS = ("mean", "cls", "last")
CROSS_ENCODER_ARCHITECTURES = ("BertForSequenceClassification", "XLMRobertaForSequenceClassification")
REWARD_ARCHITECTURES = (
    "LlamaForSequenceClassification",
    "MistralForSequenceClassification",
    "Qwen2ForSequenceClassification",
)
ENCODER_ARCHITECTURES = ("BertModel", "XLMRobertaModel", *CROSS_ENCODER_ARCHITECTURES)
EMBEDDING_ARCHITECTURES = (
    *ENCODER_ARCHITECTURES,
    "LlamaModel",
    "MistralModel",
    "Qwen2Model",
    *REWARD_ARCHITECTURES,
)
_ST_POOLING = "sentence_transformers.models.Pooling"
_ST_NORMALIZE = "sentence_transformers.models.Normalize"
# sentence-transformers' pooling_mode_* keys, by our method name
_ST_MODES = {
    "cls": "pooling_mode_cls_token",
    "mean": "pooling_mode_mean_tokens",
    "last": "pooling_mode_lasttoken",
}


@dataclass(frozen=True)
class PoolingConfig:
    method: str  # one of POOLING_METHODS
    normalize: bool

    @staticmethod
    def for_model(local_dir: str | Path | None, architectures: list[str]) -> PoolingConfig:
        """From the sentence-transformers files in `local_dir`, else the default of the architecture.
        A classifier (cross-encoder, reward model) pools its first or last token, unnormalized: its
        head scores that row (sequence_classification.py)."""
        if is_classifier(architectures):
            return PoolingConfig("cls" if is_encoder(architectures) else "last", False)
        modules = _read_json(Path(local_dir) / "modules.json") if local_dir is not None else None
        if isinstance(modules, list):
            types = {m.get("type"): m for m in modules if isinstance(m, dict)}
            pooling = types.get(_ST_POOLING)
            if pooling is not None:
                method = _st_method(Path(local_dir) / str(pooling.get("path", "")) / "config.json")  # type: ignore[arg-type]
                return PoolingConfig(method, _ST_NORMALIZE in types)
        encoder = any(a in ENCODER_ARCHITECTURES for a in architectures)
        return PoolingConfig("cls" if encoder else "last", True)


def is_classifier(architectures: list[str]) -> bool:
    return any(a in CROSS_ENCODER_ARCHITECTURES or a in REWARD_ARCHITECTURES for a in architectures)


def is_cross_encoder(architectures: list[str]) -> bool:
    """A classifier over text pairs (rerank): an encoder with a classification head."""
    return any(a in CROSS_ENCODER_ARCHITECTURES for a in architectures)


def is_encoder(architectures: list[str]) -> bool:
    return any(a in ENCODER_ARCHITECTURES for a in architectures)


def is_embedding_model(local_dir: str | Path | None, architectures: list[str], flag: bool) -> bool:
    """See the module docstring."""
    if flag or any(a in EMBEDDING_ARCHITECTURES for a in architectures):
        return True
    return local_dir is not None and Path(local_dir).is_dir() and (Path(local_dir) / "modules.json").is_file()


def pool_hidden(hidden: torch.Tensor, method: str, normalize: bool) -> torch.Tensor:
    """One request's hidden states [n, H] (its whole prompt for mean and cls; at least its last
    token for last) -> its embedding [H] in float32."""
    h = hidden.float()
    if method == "mean":
        vec = h.mean(dim=0)
    elif method == "cls":
        vec = h[0]
    elif method == "last":
        vec = h[-1]
    else:
        raise ValueError(f"pooling method {method!r} is not supported; supported: {POOLING_METHODS}")
    return F.normalize(vec, p=2.0, dim=0) if normalize else vec


def _read_json(path: Path) -> object:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def _st_method(path: Path) -> str:
    config = _read_json(path)
    if not isinstance(config, dict):  # a missing or broken file, not a wrong argument
        raise ValueError(f"sentence-transformers pooling config {path} is missing or not JSON")  # noqa: TRY004
    chosen = [method for method, key in _ST_MODES.items() if config.get(key)]
    if len(chosen) != 1:
        on = sorted(k for k, v in config.items() if k.startswith("pooling_mode") and v)
        raise ValueError(
            f"pooling modes {on} of {path} are not supported; one of {sorted(_ST_MODES.values())}"
        )
    return chosen[0]
