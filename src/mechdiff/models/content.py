"""Content fingerprints of what a model load read (weights, adapter, tokenizer files), for resume keys.

A run directory keys every cached step on these (see ``RunDir.inputs``), so replacing the weights
of a model directory or editing an adapter in place makes the next run recompute instead of
reporting the old numbers.

Cheap by construction: a file's digest is cached in ``cache_dir()/file-hashes.json`` under its
resolved path, size, mtime and inode (the first check: an unchanged file is not read again). A file
up to ``FULL_HASH_LIMIT`` bytes is hashed whole; a larger one by its size, mtime, its first 1 MiB
(the safetensors / GGUF header) and 16 blocks of 1 MiB spread over it (an in-place write changes
its mtime, which is part of that digest).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

from mechdiff.atomic import atomic_write_text
from mechdiff.paths import cache_dir

FULL_HASH_LIMIT = 2 << 30
_BLOCK = 1 << 20
#: Files in a model or adapter directory that a load reads (weights, configs, tokenizer, code).
_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".json", ".model", ".txt", ".gguf", ".py", ".tiktoken",
             ".jinja", ".msgpack", ".h5"}


def _file_digest(path: Path, st: os.stat_result) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if st.st_size <= FULL_HASH_LIMIT:
            for chunk in iter(lambda: fh.read(8 * _BLOCK), b""):
                h.update(chunk)
            return h.hexdigest()
        h.update(f"size={st.st_size};mtime={st.st_mtime_ns};".encode())
        for i in range(17):
            fh.seek(0 if i == 0 else (st.st_size - _BLOCK) * i // 16)
            h.update(fh.read(_BLOCK))
    return "sampled:" + h.hexdigest()


def _cache_path() -> Path:
    return cache_dir() / "file-hashes.json"


def _read_cache() -> dict:
    try:
        data = json.loads(_cache_path().read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def file_hashes(paths: Iterable[Path]) -> dict[str, str]:
    """{resolved path: digest} of ``paths`` (digests reused from the cache while size/mtime/inode hold)."""
    cache = _read_cache()
    out, changed = {}, False
    for p in paths:
        real = Path(p).resolve()
        st = real.stat()
        key = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
        rec = cache.get(str(real))
        if not (isinstance(rec, dict) and rec.get("key") == key):
            rec = {"key": key, "sha": _file_digest(real, st)}
            cache[str(real)] = rec
            changed = True
        out[str(real)] = rec["sha"]
    if changed:
        cache = {k: v for k, v in cache.items() if os.path.exists(k)}     # forget deleted files
        try:
            atomic_write_text(_cache_path(), json.dumps(cache, sort_keys=True))
        except OSError:     # a read-only cache only costs the rehash next time
            pass
    return out


def model_files(path: str | os.PathLike) -> list[Path]:
    """The files a load of ``path`` reads: the file itself, or a directory's weight, config and
    tokenizer files (top level, symlinks followed; hidden files left out)."""
    p = Path(os.path.expanduser(str(path)))
    if p.is_file():
        return [p]
    if not p.is_dir():
        return []
    return sorted(f for f in p.iterdir() if not f.name.startswith(".") and f.is_file()
                  and (f.suffix in _SUFFIXES or f.name in ("tokenizer", "vocab", "merges")))


def content_hash(paths: Iterable[str | os.PathLike | None]) -> str | None:
    """One sha256 over the files of every path in ``paths`` (names relative to each path, so a
    copied directory keeps its fingerprint); None when none of them is on disk."""
    h, seen = hashlib.sha256(), False
    for i, path in enumerate(paths):
        if path is None:
            continue
        files = model_files(path)
        digests = file_hashes(files)
        for f in files:
            seen = True
            h.update(f"{i}:{f.name}={digests[str(f.resolve())]}\n".encode())
    return h.hexdigest() if seen else None
