"""Atomic file writes and strict JSON.

Every write goes to a temporary file in the target's directory, is fsync'ed, then ``os.replace``d
over the target (and the directory is fsync'ed): a crash or an exception during serialisation
leaves the previous file (or none) and no temporary file behind. JSON is strict: sorted keys,
non-finite floats as ``null``, numpy / torch scalars and small arrays as numbers / lists.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import dataclasses
import enum
import hashlib
import json
import math
import os
import shutil
import time
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch

__all__ = ["atomic_write_bytes", "atomic_write_text", "replace_dir", "sha256_file", "to_jsonable",
           "dumps_json"]


def _fsync_dir(directory: Path) -> None:
    """Persist a rename: fsync the directory entry (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover (e.g. Windows)
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _atomic_target(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success fsync it and `os.replace` it over `path`.

    On any exception the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_umask())     # mkstemp makes 0600; an artifact gets the mode open() would give
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (temp file in the same dir, fsync, os.replace)."""
    path = Path(path)
    with _atomic_target(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 `text` to `path` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- JSON

def to_jsonable(obj: Any) -> Any:
    """Convert `obj` to plain JSON types: non-finite floats -> None, numpy/torch scalars -> numbers,
    arrays/tensors -> (nested) lists, Path -> str, dataclasses -> dicts, sets -> sorted lists,
    Enum -> value, dict keys -> str. Raises TypeError for anything else."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        if t.dtype == torch.bfloat16 or t.dtype == torch.float16:
            t = t.float()
        return to_jsonable(t.item() if t.ndim == 0 else t.tolist())
    if isinstance(obj, Mapping):
        return {_json_key(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        items = [to_jsonable(v) for v in obj]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, enum.Enum):
        return to_jsonable(obj.value)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, (_dt.datetime, _dt.date)):
        return obj.isoformat()
    raise TypeError(f"cannot write {type(obj).__name__} to JSON: convert it to dict/list/number/str "
                    f"first")


def _json_key(k: Any) -> str:
    if isinstance(k, str):
        return k
    if isinstance(k, (bool, int, float, np.generic)) or k is None:
        return json.dumps(to_jsonable(k))
    if isinstance(k, tuple):  # e.g. site keys ("resid_post", 12) -> "resid_post.12"
        return ".".join(str(p) for p in k)
    if isinstance(k, enum.Enum):
        return str(k.value)
    raise TypeError(f"cannot use {type(k).__name__} as a JSON key")


def dumps_json(obj: Any) -> str:
    """Strict JSON text (sorted keys, indent 2, NaN/Inf -> null, trailing newline)."""
    return json.dumps(to_jsonable(obj), sort_keys=True, indent=2, allow_nan=False,
                      ensure_ascii=False) + "\n"


def replace_dir(tmp: Path, out: Path, is_complete: Callable[[Path], bool]) -> Path:
    """Move the finished directory ``tmp`` to ``out`` in one rename (an older ``out`` is moved aside
    and deleted first). If another process completed ``out`` meanwhile (``is_complete(out)``), keep
    that copy and drop ``tmp``."""
    if out.exists():
        trash = out.parent / f".{out.name}.old-{os.getpid()}-{time.time_ns()}"
        os.replace(out, trash)
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.replace(tmp, out)
    except OSError:
        if not is_complete(out):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return out
