"""Model loading (hub | local dir | GGUF | base+PEFT | offline testbed) and planted pairs."""
from mechdiff.models.load import (
    LoadedModel,
    chat_template_hash,
    config_hash,
    hub_offline,
    load_model,
    model_dims,
    resolve_dtype,
    tokenizer_hash,
)

__all__ = [
    "LoadedModel", "chat_template_hash", "config_hash", "hub_offline", "load_model", "model_dims",
    "resolve_dtype", "tokenizer_hash",
]
