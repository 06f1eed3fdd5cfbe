"""The run manifest: what was run (pair, models, seeds, options) and where (versions, device)."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import sys
from typing import Any, Mapping

import torch

from mechdiff.atomic import to_jsonable
from mechdiff.errors import ConfigError

__all__ = ["build_manifest", "utc_now", "MANIFEST_SCHEMA", "MANIFEST_PACKAGES"]

MANIFEST_SCHEMA = 1
#: Packages whose versions go into the manifest (looked up without importing them).
MANIFEST_PACKAGES = ("mechdiff", "torch", "transformers", "accelerate", "safetensors", "numpy",
                     "peft", "gguf", "matplotlib")


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _pkg_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        if name == "mechdiff":
            import mechdiff

            return getattr(mechdiff, "__version__", None)
        return None


def _device_info() -> dict[str, Any]:
    info: dict[str, Any] = {"cuda_available": False, "torch_cuda": torch.version.cuda}
    try:
        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            info.update(cuda_available=True, device_count=n,
                        devices=[torch.cuda.get_device_name(i) for i in range(n)],
                        cudnn=torch.backends.cudnn.version())
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            info["devices"] = ["mps"]
        else:
            info["devices"] = [platform.processor() or platform.machine() or "cpu"]
    except Exception as e:  # pragma: no cover (broken drivers must not break a run)
        info["error"] = f"{type(e).__name__}: {e}"
    return info


def build_manifest(pair: Mapping[str, Any], models: Mapping[str, Mapping[str, Any]],
                   seeds: Mapping[str, Any], options: Mapping[str, Any],
                   command: list[str] | None = None) -> dict[str, Any]:
    """Everything needed to know what a run was.

    `models` maps a side ("base", "tuned", ...) to {spec, revision, tokenizer_hash,
    chat_template_hash, dtype, config_hash, ...}. Adds package versions (read from metadata, not
    imported), python / platform, device (CUDA devices if any), creation time and the command line
    (`sys.argv` unless `command` is given). The result is JSON-ready.
    """
    if not isinstance(models, Mapping) or not models:
        raise ConfigError("build_manifest: `models` must map each side (e.g. 'base', 'tuned') "
                          "to its description")
    argv = list(sys.argv if command is None else command)
    return to_jsonable({
        "schema": MANIFEST_SCHEMA,
        "created": utc_now(),
        "command": shlex.join(str(a) for a in argv),
        "argv": argv,
        "cwd": os.getcwd(),
        "pair": dict(pair),
        "models": {side: dict(desc) for side, desc in models.items()},
        "seeds": dict(seeds),
        "options": dict(options),
        "environment": {
            "python": sys.version.split()[0],
            "implementation": platform.python_implementation(),
            "platform": platform.platform(),
            "packages": {name: _pkg_version(name) for name in MANIFEST_PACKAGES},
            "device": _device_info(),
        },
    })
