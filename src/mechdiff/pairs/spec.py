"""Pairs: a base and a tuned model, and how the two are compared.

The model side (`ModelSpec`: the five spec forms, ``{pkg}`` expansion, testbed names) lives in
`mechdiff.pairs.model_spec`; its names are re-exported here so ``from mechdiff.pairs.spec import
ModelSpec`` keeps working.

``{pkg}`` in a spec string, a table's path / gguf / adapter, or a dataset path stands for the
installed ``mechdiff`` package directory (`expand_pkg`), so a built-in pair can use package data,
e.g. ``tuned = "smollm2-135m+{pkg}/finetune/adapters/smollm2-math-lora"``.

A `Pair` is a base and a tuned spec plus the comparison settings (dtype, device map, tokenizer
policy, datasets, domain). Built-in pairs live in ``pairs/builtin/*.toml``; `load_pair` also reads
any TOML file with the same keys.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, Mapping

from mechdiff.errors import ConfigError
from mechdiff.pairs.model_spec import (  # noqa: F401  (re-exported: importable from here as before)
    _HUB_RE,
    _PLANTED_RE,
    PKG_PLACEHOLDER,
    PLANTED_NAMES,
    PLANTED_SIDES,
    SPEC_KINDS,
    TESTBED_NAMES,
    ModelSpec,
    _looks_like_path,
    expand_pkg,
    is_testbed_name,
    testbed_names,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TOKENIZER_POLICIES: tuple[str, ...] = ("shared_vocab_required", "shared_vocab_recommended")
DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")
DATASET_SOURCE_KEYS: tuple[str, ...] = ("hub", "path", "builtin")


# ---------------------------------------------------------------------------------------- pairs
@dataclass(frozen=True)
class DatasetRef:
    """Where a dataset comes from: exactly one of hub / path / builtin; optional config, split, n."""

    name: str
    hub: str | None = None
    path: str | None = None
    builtin: str | None = None
    config: str | None = None
    split: str | None = None
    n: int | None = None
    #: the folder of the pair TOML that names this dataset (a relative ``path`` is looked up there first)
    root: str | None = field(default=None, compare=False)

    def local_path(self) -> Path:
        """``path`` resolved: against the pair TOML's folder, else the working directory; DataError
        naming every place looked at when it is in neither."""
        from mechdiff.errors import DataError
        p = Path(os.path.expanduser(str(self.path)))
        if p.is_absolute():
            return p
        places = ([Path(self.root) / p] if self.root else []) + [Path.cwd() / p]
        for c in places:
            if c.exists():
                return c
        raise DataError(f"dataset {self.name!r}: file {self.path} not found; looked in "
                        + " and ".join(str(c) for c in places)
                        + (" (a relative path is taken from the pair TOML's folder first)" if self.root else ""))

    @classmethod
    def from_toml(cls, name: str, value: "str | Mapping[str, Any]") -> "DatasetRef":
        if isinstance(value, str):  # bare string: hub id, or a file path
            value = expand_pkg(value)
            return cls(name=name, path=value) if _looks_like_path(value) or value.endswith(".jsonl") \
                else cls(name=name, hub=value)
        if not isinstance(value, Mapping):
            raise ConfigError(f"datasets.{name}: expected a string or a table")
        allowed = set(DATASET_SOURCE_KEYS) | {"config", "split", "n"}
        unknown = set(value) - allowed
        if unknown:
            raise ConfigError(f"datasets.{name}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
        given = [k for k in DATASET_SOURCE_KEYS if k in value]
        if len(given) != 1:
            raise ConfigError(f"datasets.{name}: give exactly one of {DATASET_SOURCE_KEYS}, got {given}")
        if isinstance(value.get("path"), str):
            value = {**value, "path": expand_pkg(value["path"])}
        n = value.get("n")
        if n is not None and (not isinstance(n, int) or n <= 0):
            raise ConfigError(f"datasets.{name}: n must be a positive integer, got {n!r}")
        return cls(name=name, **{k: value[k] for k in value})

    @property
    def source(self) -> str:
        return self.hub or self.path or self.builtin  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None and k not in ("name", "root")}


@dataclass(frozen=True)
class Pair:
    """A base model, a tuned model, and how to compare them.

    dtype "auto" means bfloat16 on a GPU and float32 on CPU (see `mechdiff.models.load.resolve_dtype`).
    tokenizer_policy: "shared_vocab_required" (always filter prompts / mask logits to the shared
    vocabulary) or "shared_vocab_recommended" (same vocabulary expected; the filter is a check).
    layers: fallback layers when a layer scan is skipped (None: scan).
    device_map / max_memory: placement of each model over the GPUs of one host (accelerate; forms in
    `mechdiff.scale.devices`), e.g. ``device_map = "auto"`` and ``max_memory = { 0 = "70GiB" }``.
    trust_remote_code: let transformers run code shipped in the model directories (default False;
    the CLI's --trust-remote-code sets it too).
    """

    name: str
    base: ModelSpec
    tuned: ModelSpec
    dtype: str = "auto"
    device_map: "str | dict | None" = None
    max_memory: "dict | None" = None
    tokenizer_policy: str = "shared_vocab_recommended"
    datasets: dict[str, DatasetRef] = field(default_factory=dict)
    domain: str = "general"
    description: str = ""
    layers: tuple[int, ...] | None = None
    source: str | None = None  # the TOML file it came from
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("a pair needs a name")
        if self.tokenizer_policy not in TOKENIZER_POLICIES:
            raise ConfigError(
                f"pair {self.name!r}: tokenizer_policy {self.tokenizer_policy!r} is invalid; "
                f"use one of {', '.join(TOKENIZER_POLICIES)}"
            )
        if self.dtype not in DTYPES:
            raise ConfigError(f"pair {self.name!r}: dtype {self.dtype!r} is invalid; use one of {DTYPES}")
        if self.layers is not None and any((not isinstance(x, int)) or x < 0 for x in self.layers):
            raise ConfigError(f"pair {self.name!r}: layers must be non-negative integers")
        from mechdiff.scale.devices import parse_device_map, parse_max_memory
        object.__setattr__(self, "device_map", parse_device_map(self.device_map, f"pair {self.name!r}: device_map"))
        object.__setattr__(self, "max_memory", parse_max_memory(self.max_memory, f"pair {self.name!r}: max_memory"))
        if not isinstance(self.trust_remote_code, bool):
            raise ConfigError(f"pair {self.name!r}: trust_remote_code must be true or false, "
                              f"got {self.trust_remote_code!r}")

    def with_command_line(self, *, trust_remote_code: bool = False, device_map: Any = None,
                          max_memory: Any = None) -> "Pair":
        """This pair with the command line's --trust-remote-code (only ever turns it on, at the user's
        request) and --device-map / --max-memory (each over its TOML value when given)."""
        if not trust_remote_code and device_map is None and max_memory is None:
            return self
        return dataclasses.replace(self, trust_remote_code=self.trust_remote_code or bool(trust_remote_code),
                                   device_map=device_map or self.device_map, max_memory=max_memory or self.max_memory)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str | None = None) -> "Pair":
        where = source or "pair"
        allowed = {"name", "base", "tuned", "dtype", "device_map", "max_memory", "tokenizer_policy", "datasets",
                   "domain", "description", "layers", "trust_remote_code"}
        unknown = set(d) - allowed
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
        for key in ("name", "base", "tuned"):
            if key not in d:
                raise ConfigError(f"{where}: missing required key {key!r}")
        ds = d.get("datasets", {})
        if not isinstance(ds, Mapping):
            raise ConfigError(f"{where}: 'datasets' must be a table of name = source")
        layers = d.get("layers")
        return cls(
            name=str(d["name"]),
            base=ModelSpec.from_toml(d["base"], where=f"{where}: base"),
            tuned=ModelSpec.from_toml(d["tuned"], where=f"{where}: tuned"),
            dtype=d.get("dtype", "auto"),
            device_map=d.get("device_map"),
            max_memory=d.get("max_memory"),
            tokenizer_policy=d.get("tokenizer_policy", "shared_vocab_recommended"),
            datasets={k: DatasetRef.from_toml(k, v) for k, v in ds.items()},
            domain=d.get("domain", "general"),
            description=d.get("description", ""),
            layers=tuple(layers) if layers is not None else None,
            source=source,
            trust_remote_code=d.get("trust_remote_code", False),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for manifests)."""
        out: dict[str, Any] = {
            "name": self.name, "base": self.base.to_dict(), "tuned": self.tuned.to_dict(),
            "dtype": self.dtype, "device_map": self.device_map, "tokenizer_policy": self.tokenizer_policy,
            "datasets": {k: v.to_dict() for k, v in self.datasets.items()}, "domain": self.domain,
            "description": self.description, "layers": list(self.layers) if self.layers else None,
        }
        if self.max_memory:             # only when set (manifests written before the key still match)
            out["max_memory"] = {str(k): v for k, v in self.max_memory.items()}
        if self.trust_remote_code:      # only when set, so manifests written before the key still match
            out["trust_remote_code"] = True
        return out


def _builtin_dir():
    return files("mechdiff.pairs").joinpath("builtin")


def list_pairs() -> list[str]:
    """Names of the built-in pairs, sorted."""
    return sorted(p.name[:-5] for p in _builtin_dir().iterdir() if p.name.endswith(".toml"))


def _read_toml(text: str, where: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: invalid TOML: {e}") from e


def load_pair(name_or_path: "str | os.PathLike") -> Pair:
    """A built-in pair by name (see `list_pairs`) or a pair TOML file by path."""
    s = os.fspath(name_or_path)
    p = Path(os.path.expanduser(s))
    if s.endswith(".toml") or p.is_file():
        if not p.is_file():
            raise ConfigError(f"pair file {s} does not exist; built-in pairs: {', '.join(list_pairs())}")
        d = _read_toml(p.read_text(encoding="utf-8"), str(p))
        d.setdefault("name", p.stem)
        pair = Pair.from_dict(d, source=str(p))
        root = str(p.resolve().parent)
        return dataclasses.replace(pair, datasets={k: dataclasses.replace(v, root=root)
                                                   for k, v in pair.datasets.items()})
    res = _builtin_dir().joinpath(f"{s}.toml")
    if not res.is_file():
        raise ConfigError(
            f"unknown pair {s!r}; built-in pairs: {', '.join(list_pairs())} "
            f"(or give a path to a pair .toml file)"
        )
    d = _read_toml(res.read_text(encoding="utf-8"), f"builtin pair {s}")
    if d.get("name", s) != s:
        raise ConfigError(f"builtin pair file {s}.toml names itself {d['name']!r}")
    d.setdefault("name", s)
    return Pair.from_dict(d, source=f"builtin:{s}")


def pair_from_specs(base: "str | ModelSpec", tuned: "str | ModelSpec", *, name: str | None = None,
                    **kwargs: Any) -> Pair:
    """An ad-hoc pair from two spec strings (the CLI's --base/--tuned); kwargs set other fields."""
    b, t = ModelSpec.parse(base), ModelSpec.parse(tuned)
    return Pair(name=name or f"{b} vs {t}", base=b, tuned=t, **kwargs)
