"""The model hub and its local cache: offline detection and cache look-ups for hub ids.

When `HF_HUB_OFFLINE`/`TRANSFORMERS_OFFLINE` is set, or the hub endpoint cannot be reached,
`hub_offline` is True and `mechdiff.models.load` looks hub ids up in the local cache only
(`_cached_file`); an id that is not cached fails with `_not_cached_error`.
"""
from __future__ import annotations

import os
import socket
from functools import lru_cache
from urllib.parse import urlparse

from mechdiff.errors import ModelLoadError


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


@lru_cache(maxsize=4)
def _endpoint_reachable(host: str, port: int, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def hub_offline() -> bool:
    """True when the hub must not be contacted: offline env flags set, or the endpoint unreachable."""
    if _env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE"):
        return True
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
        endpoint = constants.ENDPOINT
    except Exception:  # pragma: no cover
        endpoint = "https://huggingface.co"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False  # a proxy decides; let the download try
    u = urlparse(endpoint)
    return not _endpoint_reachable(u.hostname or "huggingface.co", u.port or (443 if u.scheme == "https" else 80))


def _cached_file(repo_id: str, filename: str, revision: str | None) -> str | None:
    """Path of `filename` of `repo_id` in the local HF cache, or None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        p = try_to_load_from_cache(repo_id, filename, revision=revision)
    except Exception:
        return None
    return p if isinstance(p, str) else None


def _commit_from_cached_path(path: str | None) -> str | None:
    if path and "/snapshots/" in path:
        return path.split("/snapshots/", 1)[1].split("/", 1)[0]
    return None


def _not_cached_error(what: str, repo_id: str, revision: str | None, filename: str) -> ModelLoadError:
    from huggingface_hub import constants

    rev = f"@{revision}" if revision else ""
    return ModelLoadError(
        f"{what} {repo_id}{rev} is not in the local cache ({constants.HF_HUB_CACHE}; missing {filename}) "
        f"and the model hub is unreachable (offline mode or no network). Point at a local copy instead: "
        f"--base/--tuned /path/to/model_dir (a save_pretrained directory) or /path/to/model.gguf, "
        f"or set HF_HOME/HF_HUB_CACHE to a cache that holds it."
    )
