"""Model specs: what to load, as a string or a TOML table.

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

``{pkg}`` in a spec string, or a table's path / gguf / adapter, stands for the
installed ``mechdiff`` package directory (`expand_pkg`), so a built-in pair can use package data,
e.g. ``tuned = "smollm2-135m+{pkg}/finetune/adapters/smollm2-math-lora"``.

Pairs of specs (`Pair`, `load_pair`) live in `mechdiff.pairs.spec`.
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from mechdiff.errors import ConfigError

#: Offline real-weight models (see `mechdiff.models.testbed`).
TESTBED_NAMES: tuple[str, ...] = ("smollm2-135m", "gemma3-270m")
#: Planted pairs with known ground truth (see `mechdiff.models.planted`).
PLANTED_NAMES: tuple[str, ...] = ("planted-cultural", "planted-cognitive")
PLANTED_SIDES: tuple[str, ...] = ("base", "tuned")

SPEC_KINDS: tuple[str, ...] = ("hub", "local", "gguf", "testbed")

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
