"""Offline spec kinds: where the weights of a testbed name or a planted pair side live.

``load.py`` asks :func:`resolve_offline`; the builders (``testbed.py``, ``planted.py``) register a
resolver for their kind with :func:`register_kind` when they are imported. ``load.py`` imports
neither: a provider module is imported the first time a spec of its kind is loaded.

A resolver takes the :class:`~mechdiff.pairs.spec.ModelSpec` and returns ``(directory, info)``:
a ``save_pretrained`` directory (built if needed) and extra JSON-ready manifest fields.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable

from mechdiff.errors import ConfigError
from mechdiff.pairs.spec import ModelSpec

Resolver = Callable[[ModelSpec], "tuple[Path, dict[str, Any]]"]

_RESOLVERS: dict[str, Resolver] = {}
#: Modules that register a kind when imported (imported on first use of that kind).
PROVIDERS: dict[str, str] = {"testbed": "mechdiff.models.testbed", "planted": "mechdiff.models.planted"}


def register_kind(kind: str) -> Callable[[Resolver], Resolver]:
    """Decorator: ``resolver(spec) -> (directory, info)`` serves specs of ``kind``."""
    def deco(fn: Resolver) -> Resolver:
        _RESOLVERS[kind] = fn
        return fn
    return deco


def offline_kind(spec: ModelSpec) -> str | None:
    """``"planted"`` (a planted pair side), ``"testbed"`` (an offline model) or None (hub, local,
    GGUF: loaded directly)."""
    if spec.kind != "testbed":
        return None
    return "planted" if spec.planted else "testbed"


def resolve_offline(spec: ModelSpec) -> tuple[Path, dict[str, Any]]:
    """The model directory and manifest fields of an offline spec (see :func:`offline_kind`)."""
    kind = offline_kind(spec)
    if kind is None:
        raise ConfigError(f"{spec} is not an offline testbed or planted spec")
    if kind not in _RESOLVERS and kind in PROVIDERS:
        importlib.import_module(PROVIDERS[kind])  # registers the kind
    if kind not in _RESOLVERS:
        raise ConfigError(f"no resolver is registered for {kind} specs such as {spec}")
    return _RESOLVERS[kind](spec)
