"""Model specs and pairs: what to load, and how two models are compared.

A `ModelSpec` names one model in one of five forms:

=============  ==========================================  ====================================
kind           string form (`ModelSpec.parse`)             TOML table form
=============  ==========================================  ====================================
``hub``        ``org/name`` or ``org/name@revision``       ``{hub = "org/name", revision = ".."}``
``local``      ``/path/to/dir``, ``./dir``, ``~/dir``,     ``{path = "/path/to/dir"}``
               or any existing directory
``gguf``       ``/path/to/file.gguf``                      ``{gguf = "/path/file.gguf"}`` or
                                                           ``{hub|path = .., gguf = "file.gguf"}``
``testbed``    ``smollm2-135m``, ``gemma3-270m``,          ``{testbed = "smollm2-135m"}``
               ``planted-cultural:base|tuned``,
               ``planted-cognitive:base|tuned``
adapter        ``BASE+ADAPTER`` (e.g.                      ``{hub = .., adapter = "/lora"}`` or
               ``org/base@rev+/path/to/lora``)             ``{base = "org/base", adapter = ..}``
=============  ==========================================  ====================================

Any form can carry a PEFT ``adapter`` (a local directory or a hub id); the loader applies it to the
base and merges it (`mechdiff.models.load.load_model`).

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
import re
import sys
from dataclasses import asdict, dataclass, field, replace
from importlib.resources import files
from pathlib import Path
from typing import Any, Mapping

from mechdiff.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: Offline real-weight models (see `mechdiff.models.testbed`).
TESTBED_NAMES: tuple[str, ...] = ("smollm2-135m", "gemma3-270m")
#: Planted pairs with known ground truth (see `mechdiff.models.planted`).
PLANTED_NAMES: tuple[str, ...] = ("planted-cultural", "planted-cognitive")
PLANTED_SIDES: tuple[str, ...] = ("base", "tuned")

TOKENIZER_POLICIES: tuple[str, ...] = ("shared_vocab_required", "shared_vocab_recommended")
DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")
SPEC_KINDS: tuple[str, ...] = ("hub", "local", "gguf", "testbed")
DATASET_SOURCE_KEYS: tuple[str, ...] = ("hub", "path", "builtin")

PKG_PLACEHOLDER = "{pkg}"
_HUB_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_PLANTED_RE = re.compile(r"^(planted-[a-z0-9\-]+):(base|tuned)$")


def expand_pkg(s: str) -> str:
    """Replace ``{pkg}`` with the mechdiff package directory (where its package data lives)."""
    if PKG_PLACEHOLDER not in s:
        return s
    return s.replace(PKG_PLACEHOLDER, str(Path(__file__).resolve().parent.parent))


def _looks_like_path(s: str) -> bool:
    return (
        s.startswith(("/", "./", "../", "~", ".\\"))
        or (len(s) > 1 and s[1] == ":" and s[0].isalpha())  # C:\...
        or os.path.exists(os.path.expanduser(s))
    )


@dataclass(frozen=True)
class ModelSpec:
    """One model to load. Build with `ModelSpec.parse` (string) or `ModelSpec.from_toml` (table).

    kind:     "hub" | "local" | "gguf" | "testbed".
    id:       hub id (kind hub, or hub-hosted GGUF) or testbed name (kind testbed).
    revision: hub branch / tag / commit (hub only).
    path:     local directory (kind local), or the .gguf file / its directory (kind gguf).
    gguf_file: GGUF file name inside `path` or the hub repo `id` (kind gguf).
    adapter:  PEFT adapter (local dir or hub id) applied on top and merged.
    """

    kind: str
    id: str | None = None
    revision: str | None = None
    path: str | None = None
    gguf_file: str | None = None
    adapter: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in SPEC_KINDS:
            raise ConfigError(f"unknown model spec kind {self.kind!r}; expected one of {SPEC_KINDS}")
        if self.kind == "hub" and not self.id:
            raise ConfigError("a hub model spec needs an id like 'org/name'")
        if self.kind == "local" and not self.path:
            raise ConfigError("a local model spec needs a directory path")
        if self.kind == "gguf" and not self.gguf_file:
            raise ConfigError("a GGUF model spec needs a .gguf file name")
        if self.kind == "gguf" and not (self.path or self.id):
            raise ConfigError("a GGUF model spec needs a directory (path) or hub id holding the file")
        if self.kind == "testbed" and not is_testbed_name(self.id or ""):
            raise ConfigError(
                f"unknown testbed model {self.id!r}; known: {', '.join(testbed_names())}"
            )
        if self.revision is not None and self.kind not in ("hub", "gguf"):
            raise ConfigError(f"a revision ({self.revision!r}) only applies to hub models")

    # ------------------------------------------------------------------ parsing
    @classmethod
    def parse(cls, text: "str | os.PathLike | ModelSpec") -> "ModelSpec":
        """Parse a string: hub id[@rev], a directory, a .gguf file, a testbed name, or BASE+ADAPTER."""
        if isinstance(text, ModelSpec):
            return text
        s = expand_pkg(os.fspath(text).strip())
        if not s:
            raise ConfigError("empty model spec; give a hub id, a directory, a .gguf file or a testbed name")
        if "+" in s and not os.path.exists(os.path.expanduser(s)):
            base_s, _, adapter = s.rpartition("+")
            if not base_s or not adapter:
                raise ConfigError(f"bad adapter spec {s!r}; write BASE+ADAPTER, e.g. org/base+/path/to/lora")
            base = cls.parse(base_s)
            if base.adapter:
                raise ConfigError(f"only one adapter per spec is supported: {s!r}")
            return replace(base, adapter=adapter.strip())
        if is_testbed_name(s):
            return cls(kind="testbed", id=s)
        if s.startswith("planted-"):
            raise ConfigError(
                f"unknown planted model {s!r}; write NAME:base or NAME:tuned with NAME in "
                f"{', '.join(PLANTED_NAMES)}"
            )
        if s.lower().endswith(".gguf"):
            p = Path(os.path.expanduser(s))
            return cls(kind="gguf", path=str(p.parent), gguf_file=p.name)
        if _looks_like_path(s):
            return cls(kind="local", path=os.path.expanduser(s))
        hub_id, sep, rev = s.partition("@")
        if sep and not rev:
            raise ConfigError(f"empty revision in {s!r}; write org/name@revision")
        if not _HUB_RE.match(hub_id):
            raise ConfigError(
                f"cannot read model spec {s!r}: not a hub id (org/name[@rev]), an existing directory, "
                f"a .gguf file, or a testbed name ({', '.join(testbed_names())})"
            )
        return cls(kind="hub", id=hub_id, revision=rev or None)

    @classmethod
    def from_toml(cls, value: "str | Mapping[str, Any]", *, where: str = "model") -> "ModelSpec":
        """Build from a TOML value: a spec string or a table (see the module docstring)."""
        if isinstance(value, str):
            return cls.parse(value)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a string or a table, got {type(value).__name__}")
        allowed = {"hub", "revision", "path", "gguf", "testbed", "adapter", "base"}
        unknown = set(value) - allowed
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
        value = {k: expand_pkg(v) if isinstance(v, str) and k in ("path", "gguf", "adapter") else v
                 for k, v in value.items()}
        adapter = value.get("adapter")
        if "base" in value:
            if set(value) - {"base", "adapter"}:
                raise ConfigError(f"{where}: with 'base', only 'adapter' may be given")
            spec = cls.from_toml(value["base"], where=f"{where}.base")
            return replace(spec, adapter=adapter) if adapter else spec
        sources = [k for k in ("hub", "path", "testbed") if k in value]
        gguf = value.get("gguf")
        if len(sources) > 1:
            raise ConfigError(f"{where}: give only one of hub / path / testbed, got {sources}")
        if "testbed" in value:
            spec = cls.parse(value["testbed"])
            if spec.kind != "testbed":
                raise ConfigError(f"{where}: unknown testbed {value['testbed']!r}; known: {testbed_names()}")
        elif gguf is not None:
            g = Path(os.path.expanduser(str(gguf)))
            if "hub" in value:
                spec = cls(kind="gguf", id=value["hub"], revision=value.get("revision"), gguf_file=str(gguf))
            elif "path" in value:
                spec = cls(kind="gguf", path=os.path.expanduser(value["path"]), gguf_file=str(gguf))
            else:
                spec = cls(kind="gguf", path=str(g.parent), gguf_file=g.name)
        elif "hub" in value:
            spec = cls(kind="hub", id=value["hub"], revision=value.get("revision"))
        elif "path" in value:
            spec = cls(kind="local", path=os.path.expanduser(value["path"]))
        else:
            raise ConfigError(f"{where}: a model table needs one of hub / path / gguf / testbed / base")
        if "revision" in value and spec.kind not in ("hub", "gguf"):
            raise ConfigError(f"{where}: 'revision' only applies to hub models")
        return replace(spec, adapter=adapter) if adapter else spec

    # ------------------------------------------------------------------ views
    @property
    def planted(self) -> tuple[str, str] | None:
        """(pair name, side) for a planted testbed spec, else None."""
        if self.kind != "testbed":
            return None
        m = _PLANTED_RE.match(self.id or "")
        return (m.group(1), m.group(2)) if m else None

    @property
    def gguf_path(self) -> str | None:
        """Full local path of a local GGUF file (None for hub-hosted GGUF or other kinds)."""
        if self.kind != "gguf" or self.path is None:
            return None
        return str(Path(self.path) / self.gguf_file)

    def __str__(self) -> str:
        if self.kind == "hub":
            s = self.id + (f"@{self.revision}" if self.revision else "")
        elif self.kind == "local":
            s = str(self.path)
        elif self.kind == "gguf":
            s = self.gguf_path or f"{self.id}{'@' + self.revision if self.revision else ''}:{self.gguf_file}"
        else:
            s = str(self.id)
        return s + (f"+{self.adapter}" if self.adapter else "")

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def testbed_names() -> list[str]:
    """All names a testbed spec accepts."""
    return list(TESTBED_NAMES) + [f"{p}:{s}" for p in PLANTED_NAMES for s in PLANTED_SIDES]


def is_testbed_name(s: str) -> bool:
    m = _PLANTED_RE.match(s)
    return s in TESTBED_NAMES or (m is not None and m.group(1) in PLANTED_NAMES)


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
        return {k: v for k, v in asdict(self).items() if v is not None and k != "name"}


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
        return Pair.from_dict(d, source=str(p))
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
