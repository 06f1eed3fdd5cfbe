"""A study's run configuration: which stages run, in what order, and with which options.

:func:`study_stages` turns ``--stages`` (names or a comma list) into registered stages in study order
(derived from each stage's ``requires``); :func:`read_config` reads a TOML run config (one table per stage, keys the
stage's option names as in ``mechdiff STAGE --help``) or a mapping, and :func:`stage_options` checks
every table and key and builds each stage's options dataclass (defaults with the config on top), so a
bad config is a ConfigError before any model work. The way back out: :func:`config_toml` writes every
option of every stage as TOML (``run_config.toml``) and :func:`stage_command` the ``mechdiff STAGE``
command line that reproduces one stage's options. :mod:`mechdiff.experiments.study` runs a study
with these and re-exports them.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence

from mechdiff.errors import ConfigError
from mechdiff.experiments.stage import STAGES, study_order

__all__ = ["study_stages", "read_config", "stage_options", "default_stages", "stage_command", "config_toml"]


# ---------------------------------------------------------------------------------- stages
def default_stages() -> list[str]:
    """The stages ``mechdiff run`` runs without ``--stages``: every registered stage marked
    ``in_default_study`` (``maps`` is not: mapped-patch fits the maps itself), in study order."""
    return study_order([s for s, st in STAGES.items() if st.in_default_study])


def study_stages(stages: "Sequence[str] | str | None" = None) -> list[str]:
    """The stages to run, in study order (:func:`~mechdiff.experiments.stage.study_order`: after the
    stages they require). None: :func:`default_stages`; named ones must be registered (ConfigError
    otherwise)."""
    if stages is None:
        return default_stages()
    names = [s.strip() for s in (stages.split(",") if isinstance(stages, str) else stages) if s and s.strip()]
    if not names:
        raise ConfigError("--stages is empty; name one or more of " + ", ".join(_registered()))
    bad = [s for s in names if s not in STAGES]
    if bad:
        raise ConfigError(f"--stages: unknown stage(s) {', '.join(map(repr, bad))}; registered stages: "
                          f"{', '.join(_registered())}")
    return study_order(names)


def _registered() -> list[str]:
    return study_order()


# ---------------------------------------------------------------------------------- config
def read_config(config: "str | os.PathLike | Mapping | None") -> dict[str, dict]:
    """``{stage: {key: value}}`` from a TOML file or a mapping (None: empty). Top-level keys that are
    not tables are a ConfigError (options live under their stage's table)."""
    if config is None:
        return {}
    where = "run config"
    if isinstance(config, Mapping):
        data = dict(config)
    else:
        path = Path(config)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"run config {path} does not exist")
        try:
            import tomllib
        except ImportError:                            # pragma: no cover (python < 3.11)
            import tomli as tomllib
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
    loose = [k for k, v in data.items() if not isinstance(v, Mapping)]
    if loose:
        raise ConfigError(f"{where}: {', '.join(map(repr, loose))} must sit under a stage table such as "
                          f"[rq1]; tables: {', '.join(_registered())}")
    return {str(k): dict(v) for k, v in data.items()}


def _field_names(cls) -> dict[str, str]:
    """Every accepted spelling of each option -> its field name (name, hyphenated, CLI flag)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name.startswith("_"):
            continue
        for alias in (f.name, f.name.replace("_", "-"), (f.metadata.get("flag") or "").lstrip("-")):
            if alias:
                out[alias] = f.name
                out[alias.replace("-", "_")] = f.name
    return out


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """A TOML value as the field's type (ints for floats, numbers for 'auto'-style string lists);
    ConfigError naming ``where`` otherwise."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = type(None) in typing.get_args(hint)
    base = args[0] if (args and typing.get_origin(hint) is not list) else hint
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: a value is required")
    if typing.get_origin(base) is list:
        item = typing.get_args(base)[0]
        if isinstance(value, str) and item in (int, float):
            raise ConfigError(f"{where}: expected a TOML list such as [1, 2] (in brackets), got the string {value!r}")
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [x for x in str(value).replace(" ", "").split(",") if x] if isinstance(value, str) else [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if base is str:
        if value == "" and optional:
            return None                                # "" spells None for an optional string
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def stage_options(config: Mapping[str, Mapping], stages: Sequence[str]) -> dict[str, Any]:
    """Options dataclass per stage in ``stages``: the defaults with ``config[stage]`` on top. Every
    table and key of ``config`` is checked (also tables of stages not run now): an unknown stage or
    key, or a value of the wrong type, is a ConfigError before any model work."""
    registered = _registered()
    norm: dict[str, Mapping] = {}
    for name, table in config.items():
        stage = name if name in STAGES else name.replace("_", "-")
        if stage not in STAGES:
            raise ConfigError(f"run config: unknown stage [{name}]; stages: {', '.join(registered)}")
        if stage in norm:
            raise ConfigError(f"run config: stage [{stage}] is given twice")
        norm[stage] = table
    out = {}
    for stage_name, table in norm.items():
        cls = STAGES[stage_name].options
        names, hints = _field_names(cls), typing.get_type_hints(cls)
        values = {}
        for key, v in table.items():
            if key not in names:
                valid = ", ".join(f.name for f in dataclasses.fields(cls) if not f.name.startswith("_"))
                raise ConfigError(f"run config [{stage_name}]: unknown option {key!r}; options: {valid}")
            values[names[key]] = _coerce(v, hints[names[key]], f"run config [{stage_name}] {key}")
        try:
            out[stage_name] = cls(**values)
        except TypeError as e:
            raise ConfigError(f"run config [{stage_name}]: {e}") from None
    for name in stages:
        if name not in out:
            out[name] = STAGES[name].options()
    return {name: out[name] for name in stages}


# ---------------------------------------------------------------------------------- commands
def _value_text(v: Any) -> str:
    return ",".join(str(x) for x in v) if isinstance(v, (list, tuple)) else str(v)


def stage_command(stage_name: str, opts: Any, head: Sequence[str]) -> list[str]:
    """argv of ``mechdiff STAGE`` with ``head`` (pair/out/common options) and every option that
    differs from its default (``--flag value``; booleans ``--flag`` / ``--no-flag``)."""
    argv = ["mechdiff", stage_name, *head]
    for f in dataclasses.fields(opts):
        if f.name.startswith("_"):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        v = getattr(opts, f.name)
        if v == default:
            continue
        if v is None:
            v = ""                                     # an optional string turned off
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        if isinstance(v, bool):
            argv.append(flag if v else "--no-" + flag[2:])
        else:
            argv += [flag, _value_text(v)]
    return argv


def _toml_value(v: Any) -> str:
    import json
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v) if v == v and abs(v) != float("inf") else '"nan"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v), ensure_ascii=False)      # a TOML basic string


def config_toml(options: Mapping[str, Any], header: str = "") -> str:
    """Every option of every stage as TOML (None values, which TOML cannot spell, as comments)."""
    lines = [f"# {line}" for line in header.splitlines()] + ([""] if header else [])
    for stage_name, opts in options.items():
        lines.append(f"[{stage_name}]")
        for f in dataclasses.fields(opts):
            if f.name.startswith("_"):
                continue
            v = getattr(opts, f.name)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if v is None and default is not None:
                lines.append(f'{f.name} = ""  # none')
            else:
                lines.append(f"# {f.name}: none (the default rule)" if v is None else f"{f.name} = {_toml_value(v)}")
        lines.append("")
    return "\n".join(lines)

