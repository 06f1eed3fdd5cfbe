"""Hashes that identify what was loaded, for run manifests: tokenizer, chat template, model config.

Each is a sha256 hex digest; `mechdiff.models.load.load_model` records them in `LoadedModel.info`.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

# Config keys that do not change the model's function (left out of config_hash).
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "_model_name_or_path", "transformers_version", "_commit_hash",
                         "dtype", "torch_dtype", "quantization_config", "use_cache", "architectures"}


def _sha256(data: "str | bytes") -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def tokenizer_hash(tok: Any) -> str:
    """sha256 of the tokenizer's full serialisation (vocab, merges, normaliser, added tokens).

    Fast tokenizers hash `backend_tokenizer.to_str()`; others the sorted vocabulary plus added tokens.
    Padding side and pad token are not part of it (they do not change the token ids of a text).
    """
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        d = json.loads(backend.to_str())
        d.pop("padding", None)
        d.pop("truncation", None)
        return _sha256(json.dumps(d, sort_keys=True, ensure_ascii=False))
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    return _sha256(json.dumps(vocab, ensure_ascii=False))


def chat_template_hash(tok: Any) -> str | None:
    """sha256 of the chat template (None when the tokenizer has none)."""
    tpl = getattr(tok, "chat_template", None)
    if not tpl:
        return None
    return _sha256(tpl if isinstance(tpl, str) else json.dumps(tpl, sort_keys=True))


def config_hash(config: Any) -> str:
    """sha256 of the model config without volatile keys (paths, versions, dtype, quantisation)."""
    d = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return _sha256(json.dumps(d, sort_keys=True, default=str))
