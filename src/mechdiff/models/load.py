"""Load one model + tokenizer from a `ModelSpec`: hub id, local dir, GGUF, base+PEFT adapter, testbed.

Every load returns a `LoadedModel`: the model in eval mode, a fast tokenizer with left padding and a
pad token, and an `info` dict that identifies exactly what was loaded (resolved source, hub commit,
config / tokenizer / chat-template hashes, dtype, depth, width) for run manifests.

Offline behaviour: when `HF_HUB_OFFLINE`/`TRANSFORMERS_OFFLINE` is set, or the hub endpoint cannot
be reached, hub ids are looked up in the local cache only; an id that is not cached fails at once
with a `ModelLoadError` that says how to point at a local copy.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from mechdiff.errors import ConfigError, ModelLoadError
from mechdiff.models.hashes import (  # noqa: F401  (re-exported: importable from here as before)
    _VOLATILE_CONFIG_KEYS,
    _sha256,
    chat_template_hash,
    config_hash,
    tokenizer_hash,
)
# The loaders below call these through this module's namespace, so a test that patches
# mechdiff.models.load.hub_offline (or _cached_file, _not_cached_error) still takes effect.
from mechdiff.models.hub import (  # noqa: F401  (re-exported: importable from here as before)
    _cached_file,
    _commit_from_cached_path,
    _endpoint_reachable,
    _env_flag,
    _not_cached_error,
    hub_offline,
)
from mechdiff.models.content import content_hash
from mechdiff.models.kinds import offline_kind, resolve_offline
from mechdiff.pairs.spec import ModelSpec

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    """A model ready for analysis. `info` is JSON-ready (goes into run manifests)."""

    model: Any
    tokenizer: Any
    spec: ModelSpec
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def n_layers(self) -> int:
        return int(self.info["n_layers"])

    @property
    def d_model(self) -> int:
        return int(self.info["d_model"])

    @property
    def vocab_size(self) -> int:
        """Rows of the input embedding (may exceed len(tokenizer) when padded)."""
        return int(self.info["vocab_size"])

    @property
    def device(self) -> torch.device:
        """Where inputs go (a sharded model: the device of its input embeddings)."""
        from mechdiff.scale.devices import input_device
        return input_device(self.model)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def name(self) -> str:
        return str(self.spec)


# ------------------------------------------------------------------------------------ helpers
def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: "str | torch.dtype", device: "str | torch.device | None" = None,
                  device_map: Any = None) -> torch.dtype:
    """"auto" -> bfloat16 on a GPU (a CUDA device, or a device_map with CUDA present), else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device is not None:
            on_gpu = torch.device(device).type == "cuda"
        else:  # placement by device_map (or not yet decided): GPU if there is one
            on_gpu = torch.cuda.is_available() and device_map not in ("cpu", {"": "cpu"})
        return torch.bfloat16 if on_gpu else torch.float32
    try:
        return _DTYPES[str(dtype)]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16") from None


def _prepare_tokenizer(tok: Any) -> Any:
    tok.padding_side = "left"
    if tok.pad_token is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        elif getattr(tok, "unk_token", None) is not None:
            tok.pad_token = tok.unk_token
        else:
            raise ModelLoadError("the tokenizer has no pad, eos or unk token to pad with; add one")
    return tok


def _text_config(config: Any) -> Any:
    try:
        return config.get_text_config()
    except Exception:  # pragma: no cover
        return config


def model_dims(model: Any) -> dict[str, Any]:
    """n_layers, d_model, n_heads, n_kv_heads, head_dim, d_mlp, vocab_size of a HF causal LM."""
    c = _text_config(model.config)
    n_layers = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer", None)
    d_model = getattr(c, "hidden_size", None) or getattr(c, "n_embd", None)
    n_heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_head", None)
    emb = model.get_input_embeddings()
    return {
        "n_layers": int(n_layers) if n_layers is not None else None,
        "d_model": int(d_model) if d_model is not None else int(emb.weight.shape[1]),
        "n_heads": int(n_heads) if n_heads is not None else None,
        "n_kv_heads": int(getattr(c, "num_key_value_heads", None) or n_heads or 0) or None,
        "head_dim": int(getattr(c, "head_dim", None) or (d_model // n_heads if d_model and n_heads else 0)) or None,
        "d_mlp": getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None),
        "vocab_size": int(emb.weight.shape[0]),
        "tied_embeddings": bool(getattr(c, "tie_word_embeddings", False)),
    }


def _from_pretrained(src: str, *, revision: str | None, local_only: bool, gguf_file: str | None,
                     torch_dtype: torch.dtype, device_map: Any, trust_remote_code: bool = False
                     ) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # A model directory's own code runs only when the user asked (--trust-remote-code or the pair
    # TOML key); the value is always passed, so transformers never asks on the terminal.
    kw: dict[str, Any] = {"revision": revision, "local_files_only": local_only,
                          "trust_remote_code": bool(trust_remote_code)}
    if gguf_file:
        kw["gguf_file"] = gguf_file
    mkw = dict(kw, dtype=torch_dtype)
    if device_map is not None:   # a scale.devices.Placement (device_map, max_memory, offload folder)
        mkw.update(device_map.kwargs() if hasattr(device_map, "kwargs") else {"device_map": device_map})
    try:
        tok = AutoTokenizer.from_pretrained(src, **kw)
        model = AutoModelForCausalLM.from_pretrained(src, **mkw)
    except ValueError as e:
        if "trust_remote_code" not in str(e) or trust_remote_code:
            raise
        raise ModelLoadError(f"{src} ships its own model code, which mechdiff does not run unless asked: pass "
                             "--trust-remote-code (or trust_remote_code = true in the pair TOML) if you trust "
                             "that code") from None
    return model, tok


def _load_hub(spec: ModelSpec, torch_dtype: torch.dtype, device_map: Any, trust_remote_code: bool = False
              ) -> tuple[Any, Any, dict]:
    repo, rev = spec.id, spec.revision
    key_file = spec.gguf_file or "config.json"
    what = "GGUF model" if spec.gguf_file else "model"
    offline = hub_offline()
    if offline and _cached_file(repo, key_file, rev) is None:
        raise _not_cached_error(what, repo, rev, key_file)
    try:
        model, tok = _from_pretrained(repo, revision=rev, local_only=offline, gguf_file=spec.gguf_file,
                                      torch_dtype=torch_dtype, device_map=device_map,
                                      trust_remote_code=trust_remote_code)
    except ModelLoadError:
        raise
    except Exception as first:  # noqa: BLE001
        if offline:
            raise ModelLoadError(f"could not load {what} {repo} from the local cache: {first}") from first
        # Online attempt failed (network trouble, auth): fall back to the cache at once.
        if _cached_file(repo, key_file, rev) is None:
            raise ModelLoadError(
                f"could not load {what} {repo}{'@' + rev if rev else ''} from the hub ({type(first).__name__}: "
                f"{first}). It is not in the local cache either; point at a local copy with "
                f"--base/--tuned /path/to/model_dir or a .gguf file, or set HF_HOME to a cache that has it."
            ) from first
        model, tok = _from_pretrained(repo, revision=rev, local_only=True, gguf_file=spec.gguf_file,
                                      torch_dtype=torch_dtype, device_map=device_map,
                                      trust_remote_code=trust_remote_code)
    cached = _cached_file(repo, key_file, rev)
    info = {"source": f"hub:{repo}", "revision": rev, "commit": _commit_from_cached_path(cached),
            "resolved_path": str(Path(cached).parent) if cached else None}
    return model, tok, info


def _load_local(path: str, torch_dtype: torch.dtype, device_map: Any, gguf_file: str | None = None,
                trust_remote_code: bool = False) -> tuple[Any, Any, dict]:
    p = Path(os.path.expanduser(path))
    if gguf_file:
        f = p / gguf_file
        if not f.is_file():
            raise ModelLoadError(f"GGUF file {f} does not exist; give the path of an existing .gguf file")
    elif not p.exists():
        raise ModelLoadError(
            f"model directory {p} does not exist; give a save_pretrained directory (with config.json), "
            f"a .gguf file, or a hub id like org/name"
        )
    elif not (p / "config.json").is_file():
        raise ModelLoadError(
            f"{p} is not a model directory (no config.json); give a save_pretrained directory or a .gguf file"
        )
    try:
        model, tok = _from_pretrained(str(p), revision=None, local_only=True, gguf_file=gguf_file,
                                      torch_dtype=torch_dtype, device_map=device_map,
                                      trust_remote_code=trust_remote_code)
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"could not load {p / gguf_file if gguf_file else p}: {type(e).__name__}: {e}") from e
    src = f"gguf:{(p / gguf_file).resolve()}" if gguf_file else f"local:{p.resolve()}"
    return model, tok, {"source": src, "revision": None, "commit": None, "resolved_path": str(p.resolve())}


def _adapter_is_path(adapter: str) -> bool:
    """An adapter written as a path (absolute, ./ ../ ~, or with a backslash / drive letter) is a local
    directory, never a hub id, whether or not it exists."""
    return adapter.startswith(("/", "./", "../", "~", ".\\", "..\\")) or "\\" in adapter or \
        (len(adapter) > 1 and adapter[1] == ":" and adapter[0].isalpha())


def check_adapter_path(adapter: str | None) -> None:
    """ModelLoadError when an adapter written as a path does not exist (checked before the base loads)."""
    if not adapter or not _adapter_is_path(adapter):
        return
    a = Path(os.path.expanduser(adapter))
    if not a.exists():
        shown = adapter if str(a) == adapter else f"{adapter} ({a.resolve()})"
        raise ModelLoadError(f"adapter path {shown} does not exist; give an existing PEFT adapter directory "
                             f"(with adapter_config.json) after the '+', e.g. BASE+/path/to/lora")


def _apply_adapter(model: Any, tok: Any, adapter: str, trust_remote_code: bool = False
                   ) -> tuple[Any, Any, dict]:
    """Load a PEFT adapter on top of `model` and merge it. A tokenizer saved with the adapter wins."""
    try:
        from peft import PeftModel
    except ImportError as e:  # pragma: no cover
        raise ModelLoadError("loading an adapter needs peft: pip install peft") from e
    from transformers import AutoTokenizer

    check_adapter_path(adapter)
    a = Path(os.path.expanduser(adapter))
    local = a.exists()
    if local and not (a / "adapter_config.json").is_file():
        raise ModelLoadError(f"{a} is not a PEFT adapter directory (no adapter_config.json)")
    if not local and hub_offline() and _cached_file(adapter, "adapter_config.json", None) is None:
        err = _not_cached_error("adapter", adapter, None, "adapter_config.json")
        raise ModelLoadError(f"no directory {a} exists here (a local adapter path that does not exist?), "
                             f"and as a hub id: {err}")
    if local and any((a / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        tok = AutoTokenizer.from_pretrained(str(a), local_files_only=True,
                                            trust_remote_code=bool(trust_remote_code))
        if len(tok) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tok))
    try:
        peft_model = PeftModel.from_pretrained(model, str(a) if local else adapter,
                                               local_files_only=hub_offline() or local)
        merged = peft_model.merge_and_unload()
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"could not apply adapter {adapter}: {type(e).__name__}: {e}") from e
    return merged, tok, {"adapter": str(a.resolve()) if local else adapter, "adapter_merged": True}


def _read_paths(spec: ModelSpec, info: dict) -> list[str | None]:
    """The files and directories a load read: the GGUF file or the model directory, then the adapter."""
    root = info.get("resolved_path")
    weights = str(Path(root) / spec.gguf_file) if spec.gguf_file and root else root
    adapter = info.get("adapter")
    if adapter and not Path(adapter).exists():      # a hub adapter: its cached snapshot
        cached = _cached_file(adapter, "adapter_config.json", None)
        adapter = str(Path(cached).parent) if cached else None
    return [weights, adapter]


def load_model(spec: "ModelSpec | str", *, dtype: "str | torch.dtype" = "auto", device_map: Any = None,
               device: "str | torch.device | None" = None, trust_remote_code: bool = False,
               max_memory: Any = None) -> LoadedModel:
    """Load a model and its tokenizer.

    dtype: "auto" (bfloat16 on GPU, float32 on CPU), "float32", "bfloat16", "float16" or a torch dtype.
    device_map: passed to from_pretrained (e.g. "auto" to spread over GPUs); else the model is moved
    to `device` (default: cuda if available, else cpu). Forms: a strategy ("auto", "balanced",
    "sequential"), a device, a user map {module: device} (see `mechdiff.scale.devices`).
    max_memory: {GPU index | "cpu": "70GiB" | bytes}, caps a device_map strategy.
    trust_remote_code: let transformers run code shipped in a model or tokenizer directory (off unless
    the user asks: --trust-remote-code or the pair TOML key).
    """
    spec = ModelSpec.parse(spec) if not isinstance(spec, ModelSpec) else spec
    if device_map is None and device is None:
        device = default_device()
    torch_dtype = resolve_dtype(dtype, device, device_map)
    from mechdiff.scale.devices import check_visible, model_devices, placement
    place = placement(device_map, max_memory)     # ConfigError for a bad map / size, before any load
    check_visible(place)
    device_map = place
    t0 = time.perf_counter()
    base_spec = replace(spec, adapter=None)
    check_adapter_path(spec.adapter)     # a missing adapter path fails before the base loads
    trc = bool(trust_remote_code)
    if offline_kind(spec) is not None:   # testbed names, planted pair sides (models/kinds.py)
        path, extra = resolve_offline(spec)
        model, tok, info = _load_local(str(path), torch_dtype, device_map)
        info.update(extra)
        info["source"] = f"testbed:{spec.id}"
    elif spec.kind == "hub" or (spec.kind == "gguf" and spec.path is None):
        model, tok, info = _load_hub(base_spec, torch_dtype, device_map, trust_remote_code=trc)
    elif spec.kind == "gguf":
        model, tok, info = _load_local(spec.path, torch_dtype, device_map, gguf_file=spec.gguf_file,
                                       trust_remote_code=trc)
    else:
        model, tok, info = _load_local(spec.path, torch_dtype, device_map, trust_remote_code=trc)
    if spec.adapter:
        model, tok, ainfo = _apply_adapter(model, tok, spec.adapter, trust_remote_code=trc)
        info.update(ainfo)
    info["content_hash"] = content_hash(_read_paths(spec, info))
    if device_map is None:
        model = model.to(device=device, dtype=torch_dtype)
    model.eval()
    model.requires_grad_(False)
    tok = _prepare_tokenizer(tok)
    info.update(model_dims(model))
    info.update({
        "spec": str(spec),
        "kind": spec.kind,
        "architecture": type(model).__name__,
        "model_type": getattr(model.config, "model_type", None),
        "config_hash": config_hash(model.config),
        "tokenizer_hash": tokenizer_hash(tok),
        "chat_template_hash": chat_template_hash(tok),
        "tokenizer_len": len(tok),
        "tokenizer_fast": bool(getattr(tok, "is_fast", False)),
        "dtype": str(torch_dtype).replace("torch.", ""),
        "device": ",".join(model_devices(model)) if device_map is not None else str(next(model.parameters()).device),
        "device_map": device_map.describe() if device_map is not None else None,
        "load_seconds": round(time.perf_counter() - t0, 3),
    })
    return LoadedModel(model=model, tokenizer=tok, spec=spec, info=info)
