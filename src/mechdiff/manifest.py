"""The run manifest: what was run (pair, models, seeds, options) and where (versions, device)."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import sys
from typing import Any, Mapping

import torch

from mechdiff.atomic import to_jsonable
from mechdiff.errors import ConfigError

__all__ = ["build_manifest", "utc_now", "MANIFEST_SCHEMA", "MANIFEST_PACKAGES", "manifest_differences",
           "check_resume"]

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


#: Manifest keys that must be equal for a run directory to be resumed.
MANIFEST_MATCH_KEYS = ("pair", "models", "seeds", "options")
#: Options that may change between a run and its resume without changing results.
RESUME_SAFE_OPTIONS = frozenset(
    {"batch_size", "device", "device_map", "num_workers", "out", "resume", "verbose", "quiet",
     "progress", "max_memory", "max_rows"}
)


def manifest_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The resume rule, the one every resume goes through: ``"key.path: old then, new now"`` for every
    difference between the recorded manifest ``old`` and ``new`` (the parts known now: any of
    :data:`MANIFEST_MATCH_KEYS`) in what determines results. Empty: the run directory may be resumed.

    pair, models and seeds must be equal. options (per stage, ``{stage: {option: value}}``, or one
    flat table) are compared where both sides have them: a stage not run there yet, or an option
    added or retired since, does not block the resume, and :data:`RESUME_SAFE_OPTIONS` (batch size,
    device, ...) may differ."""
    new = to_jsonable(dict(new))
    diffs: list[str] = []
    for key in MANIFEST_MATCH_KEYS:
        if key not in new:
            continue
        if key == "options":
            _diff_shared(key, old.get(key) or {}, new.get(key) or {}, diffs)
        else:
            _diff(key, old.get(key), new.get(key), diffs)
    return diffs


def check_resume(path: Any, old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> None:
    """ConfigError naming every :func:`manifest_differences` of ``new`` from the manifest ``old`` of
    run directory ``path`` (None: a fresh directory, nothing to check)."""
    diffs = manifest_differences(old, new) if old else []
    if diffs:
        shown = "\n  ".join(diffs[:12]) + ("\n  ..." if len(diffs) > 12 else "")
        raise ConfigError(f"run directory {path} belongs to a different configuration (other options, pair, models "
                          f"or seed):\n  {shown}\nrerun with the same ones (--batch-size, --max-rows, --device may "
                          "differ) or use a new --out directory")


def _diff_shared(prefix: str, a: Mapping, b: Mapping, out: list[str]) -> None:
    """Differences of the keys both ``a`` and ``b`` hold (nested tables: the same rule inside), except
    the resume-safe options."""
    for k in sorted(set(a) & set(b)):
        if k in RESUME_SAFE_OPTIONS:
            continue
        if isinstance(a[k], dict) and isinstance(b[k], dict):
            _diff_shared(f"{prefix}.{k}", a[k], b[k], out)
        else:
            _diff(f"{prefix}.{k}", a[k], b[k], out)


def _short(v: Any, n: int = 80) -> str:
    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= n else s[: n - 3] + "..."


def _diff(prefix: str, a: Any, b: Any, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            _diff(f"{prefix}.{k}", a.get(k, _MISSING), b.get(k, _MISSING), out)
        return
    if a != b:
        fa = "<missing>" if a is _MISSING else _short(a)
        fb = "<missing>" if b is _MISSING else _short(b)
        out.append(f"{prefix}: {fa} then, {fb} now")


class _Missing:
    def __repr__(self) -> str:  # pragma: no cover
        return "<missing>"


_MISSING = _Missing()
