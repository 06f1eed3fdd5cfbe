"""Run directories: manifest, atomic JSON / safetensors writes, resumable steps.

One run = one directory::

    runs/rq1-20250101-120000-3fa2/
      manifest.json      what was run: pair, models (revisions, tokenizer hashes), seeds, options,
                         package versions, device, command line (see `build_manifest`)
      steps.json         finished steps with the sha256 of each output (see "Resumable steps")
      rq1.json ...       metrics (JSON; a "headline" dict / "table" rows are shown by report.py)
      tensors/*.safetensors
      figures/*.png
      report.html, report.md

Every write is atomic: the bytes go to a temporary file in the same directory, are fsync'ed, then
`os.replace`d over the target (and the directory is fsync'ed). A crash or an exception during
serialisation leaves the previous file (or no file) and no temporary files behind.

JSON is strict: keys sorted, non-finite floats written as ``null``, numpy / torch scalars and small
arrays converted to Python numbers / lists, `Path` to str, dataclasses to dicts, sets to sorted lists.

Tensors are safetensors only (never pickle). Tensors that hold NaN/Inf are refused with
`NumericsError` unless ``allow_nonfinite=True``.

Resumable steps
---------------
A step is a named unit of work whose results are files in the run directory::

    def compute():
        cka = ...                                         # heavy work
        run.write_tensors("tensors/cka.safetensors", {"cka": cka})
        run.write_json("rq1.json", {"headline": {...}})

    ran = run.cached("rq1.cka", compute, outputs=["tensors/cka.safetensors", "rq1.json"],
                     depends_on=["rq1.capture"])

`cached` skips `compute` if the step is done, else runs it and records it (`finish_step`).
A step counts as done only if `steps.json` records it AND every recorded output still exists with
the recorded sha256 AND every step it depends on is still done with the same outputs as when it was
recorded (so recomputing an upstream step invalidates the downstream ones). The lower-level pair
`step_done(name)` / `finish_step(name, outputs)` does the same by hand. Only one process should
write to a run directory (on multi-GPU runs: rank 0); `steps.json` updates take a file lock where
the platform offers `fcntl`.

Resuming
--------
`run.write_or_check_manifest(manifest)` writes manifest.json in a fresh run directory and, in an
existing one, raises `ConfigError` if the parts that determine results differ (pair, models, seeds,
options other than `RESUME_SAFE_OPTIONS`): the one resume rule, `mechdiff.manifest.check_resume`.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch

from mechdiff.atomic import _atomic_target, atomic_write_text, dumps_json, sha256_file, to_jsonable
from mechdiff.errors import ConfigError, DataError, NumericsError
from mechdiff.manifest import MANIFEST_MATCH_KEYS, RESUME_SAFE_OPTIONS, check_resume, utc_now

try:  # POSIX only; on other platforms steps.json updates are unlocked (single writer assumed).
    import fcntl as _fcntl
except ImportError:  # pragma: no cover
    _fcntl = None

__all__ = [
    "new_run_dir",
    "RunDir",
    "MANIFEST_MATCH_KEYS",
    "RESUME_SAFE_OPTIONS",
]

MANIFEST_NAME = "manifest.json"
STEPS_NAME = "steps.json"
FIGURES_DIR = "figures"
STEPS_SCHEMA = 1


# --------------------------------------------------------------------------- run directories

def new_run_dir(root: str | os.PathLike = "runs", prefix: str = "run") -> Path:
    """Create and return a fresh, unique directory `root/<prefix>-<YYYYmmdd-HHMMSS>-<hex>`."""
    if not prefix or any(c in prefix for c in "/\\") or prefix in (".", ".."):
        raise ConfigError(f"run dir prefix {prefix!r} must be a plain name without slashes")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for _ in range(100):
        path = root / f"{prefix}-{stamp}-{secrets.token_hex(2)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise ConfigError(f"could not create a unique run directory under {root}")  # pragma: no cover


class RunDir:
    """A run directory. All writes are atomic; names are paths relative to the run directory."""

    def __init__(self, path: str | os.PathLike, create: bool = True):
        self.path = Path(path)
        #: Content hashes of what the steps read (the models' files); when set, a step recorded
        #: with other inputs is not done (a model changed in place is recomputed).
        self.inputs: dict | None = None
        if create:
            self.path.mkdir(parents=True, exist_ok=True)
        elif not self.path.is_dir():
            raise ConfigError(f"run directory {self.path} does not exist")

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    # ---- paths
    def file(self, name: str | os.PathLike) -> Path:
        """Absolute path of `name` inside the run dir; refuses absolute paths and '..' escapes."""
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ConfigError(f"{name!s}: artifact names must be relative paths inside the run "
                              f"directory (no absolute paths, no '..')")
        return self.path / rel

    def exists(self, name: str | os.PathLike) -> bool:
        return self.file(name).exists()

    @property
    def figures_dir(self) -> Path:
        d = self.path / FIGURES_DIR
        d.mkdir(parents=True, exist_ok=True)
        return d

    def figure(self, filename: str) -> Path:
        """Path for a figure PNG under figures/ (the report embeds every PNG found there)."""
        return self.figures_dir / filename

    # ---- JSON
    def write_json(self, name: str, obj: Any) -> Path:
        """Atomically write strict JSON (see `dumps_json`). Serialisation happens in memory first,
        so an object that fails to encode leaves the existing file untouched."""
        text = dumps_json(obj)
        return atomic_write_text(self.file(name), text)

    def read_json(self, name: str) -> Any:
        path = self.file(name)
        try:
            with open(path, encoding="utf-8") as fh:
                return json.load(fh)
        except FileNotFoundError:
            raise DataError(f"{path} does not exist (has the step that writes it run?)") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON ({e}); delete it to recompute") from None

    # ---- tensors
    def write_tensors(self, name: str, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, Any] | None = None, *,
                      allow_nonfinite: bool = False) -> Path:
        """Atomically write `tensors` as safetensors. Tensors are moved to CPU and made contiguous.

        Metadata values that are not strings are JSON-encoded. Raises `NumericsError` naming the
        first tensor that holds NaN/Inf unless `allow_nonfinite`.
        """
        from safetensors.torch import save_file

        if not tensors:
            raise DataError(f"{name}: no tensors to write")
        prepared: dict[str, torch.Tensor] = {}
        seen_storage: set[int] = set()
        for key, t in tensors.items():
            if not isinstance(key, str):
                raise TypeError(f"{name}: tensor names must be str, got {type(key).__name__}")
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: {key!r} is a {type(t).__name__}, not a torch.Tensor")
            t = t.detach()
            if not allow_nonfinite and (t.is_floating_point() or t.is_complex()):
                bad = ~torch.isfinite(t)
                if bool(bad.any()):
                    n_nan = int(torch.isnan(t).sum())
                    raise NumericsError(
                        f"{name}: tensor {key!r} {tuple(t.shape)} has {int(bad.sum())} non-finite "
                        f"values ({n_nan} NaN); fix the computation or pass allow_nonfinite=True")
            t = t.to("cpu").contiguous()
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen_storage and t.numel() > 0:
                t = t.clone()  # safetensors refuses tensors that share memory
            seen_storage.add(t.untyped_storage().data_ptr())
            prepared[key] = t
        meta = None
        if metadata:
            meta = {str(k): v if isinstance(v, str) else json.dumps(to_jsonable(v), sort_keys=True)
                    for k, v in metadata.items()}
        path = self.file(name)
        with _atomic_target(path) as tmp:
            save_file(prepared, os.fspath(tmp), metadata=meta)
        return path

    def read_tensors(self, name: str, device: str = "cpu") -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        path = self.file(name)
        if not path.exists():
            raise DataError(f"{path} does not exist (has the step that writes it run?)")
        return load_file(os.fspath(path), device=device)

    def read_tensor_metadata(self, name: str) -> dict[str, str]:
        from safetensors import safe_open

        with safe_open(os.fspath(self.file(name)), framework="pt") as fh:
            return dict(fh.metadata() or {})

    # ---- resumable steps
    @contextlib.contextmanager
    def _steps_lock(self) -> Iterator[None]:
        if _fcntl is None:  # pragma: no cover
            yield
            return
        with open(self.path / ".steps.lock", "a") as fh:
            _fcntl.flock(fh.fileno(), _fcntl.LOCK_EX)
            try:
                yield
            finally:
                _fcntl.flock(fh.fileno(), _fcntl.LOCK_UN)

    def _read_steps(self) -> dict[str, dict]:
        path = self.path / STEPS_NAME
        if not path.exists():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return dict(data.get("steps", {}))
        except (json.JSONDecodeError, AttributeError):
            # Cannot happen through atomic writes; if it does, treat every step as not done.
            return {}

    def _write_steps(self, steps: Mapping[str, dict]) -> None:
        atomic_write_text(self.path / STEPS_NAME,
                          dumps_json({"schema": STEPS_SCHEMA, "steps": dict(steps)}))

    def steps(self) -> dict[str, dict]:
        """The raw records of steps.json: name -> {outputs: {file: sha256}, deps, finished, info}."""
        return self._read_steps()

    def _fingerprint(self, record: Mapping[str, Any]) -> str:
        outs = record.get("outputs", {})
        return hashlib.sha256(json.dumps(outs, sort_keys=True).encode()).hexdigest()

    def _step_done(self, name: str, steps: Mapping[str, dict], _stack: tuple[str, ...] = ()) -> bool:
        rec = steps.get(name)
        if rec is None or name in _stack:
            return False
        if self.inputs is not None and rec.get("inputs") != to_jsonable(self.inputs):
            return False
        outputs = rec.get("outputs")
        if not isinstance(outputs, dict):
            return False
        for rel, digest in outputs.items():
            try:
                path = self.file(rel)
            except ConfigError:
                return False
            if not path.is_file() or sha256_file(path) != digest:
                return False
        for dep, fp in (rec.get("deps") or {}).items():
            if not self._step_done(dep, steps, _stack + (name,)):
                return False
            if self._fingerprint(steps[dep]) != fp:
                return False
        return True

    def step_done(self, name: str) -> bool:
        """True iff `name` is recorded in steps.json, all its outputs exist with the recorded
        sha256, and all its dependencies are still done with the outputs they had when recorded."""
        return self._step_done(name, self._read_steps())

    def finish_step(self, name: str, outputs: Iterable[str | os.PathLike],
                    depends_on: Iterable[str] = (), info: Mapping[str, Any] | None = None) -> dict:
        """Record step `name` as finished with `outputs` (paths relative to the run dir, which must
        exist) and the steps it `depends_on` (which must be done). Returns the record."""
        outputs = [os.fspath(o) for o in outputs]
        hashes: dict[str, str] = {}
        for rel in outputs:
            path = self.file(rel)
            if not path.is_file():
                raise DataError(f"step {name!r}: declared output {rel!r} was not written "
                                f"({path} missing)")
            hashes[Path(rel).as_posix()] = sha256_file(path)
        with self._steps_lock():
            steps = self._read_steps()
            deps: dict[str, str] = {}
            for dep in depends_on:
                if not self._step_done(dep, steps):
                    raise DataError(f"step {name!r} depends on {dep!r}, which is not done "
                                    f"(run it first)")
                deps[dep] = self._fingerprint(steps[dep])
            record = {"outputs": hashes, "deps": deps, "finished": utc_now(),
                      "info": to_jsonable(dict(info or {})),
                      **({"inputs": to_jsonable(self.inputs)} if self.inputs is not None else {})}
            steps[name] = record
            self._write_steps(steps)
        return record

    def invalidate_step(self, name: str) -> None:
        """Forget step `name` (its outputs stay on disk); it will be recomputed."""
        with self._steps_lock():
            steps = self._read_steps()
            if steps.pop(name, None) is not None:
                self._write_steps(steps)

    def cached(self, name: str, compute_fn: Callable[[], Any],
               outputs: Iterable[str | os.PathLike], depends_on: Iterable[str] = (),
               info: Mapping[str, Any] | None = None) -> bool:
        """Run `compute_fn()` (which must write `outputs`) unless step `name` is done.

        Returns True if it ran, False if skipped. Results are read back from the output files, so
        the same code path works for fresh and resumed runs. When ``info`` is given (e.g. the options
        the step's result depends on), a recorded step with different ``info`` is recomputed.
        """
        outputs = list(outputs)
        depends_on = list(depends_on)
        if self.step_done(name) and (info is None or
                                     self.steps()[name].get("info") == to_jsonable(dict(info))):
            return False
        compute_fn()
        self.finish_step(name, outputs, depends_on=depends_on, info=info)
        return True

    # ---- manifest
    def write_manifest(self, manifest: Mapping[str, Any]) -> Path:
        return self.write_json(MANIFEST_NAME, manifest)

    def read_manifest(self) -> dict | None:
        return self.read_json(MANIFEST_NAME) if self.exists(MANIFEST_NAME) else None

    def check_manifest(self, manifest: Mapping[str, Any]) -> None:
        """Raise `ConfigError` if this run dir's manifest.json differs from `manifest` in a part
        that determines results: the one resume rule, :func:`mechdiff.manifest.check_resume`.
        Does nothing if the run dir has no manifest yet."""
        check_resume(self.path, self.read_manifest(), manifest)

    def write_or_check_manifest(self, manifest: Mapping[str, Any]) -> Path:
        """Fresh dir: write manifest.json. Existing manifest: `check_manifest` (keeps the old one,
        so 'created' stays the original time) and append a resume entry."""
        old = self.read_manifest()
        if old is None:
            return self.write_manifest(manifest)
        self.check_manifest(manifest)
        resumes = list(old.get("resumes", []))
        resumes.append({"time": utc_now(), "command": manifest.get("command"),
                        "options": manifest.get("options"),
                        "environment": manifest.get("environment")})
        old["resumes"] = resumes
        return self.write_manifest(old)

