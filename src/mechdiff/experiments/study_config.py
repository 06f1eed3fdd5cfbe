"""A study's run configuration: which stages run, in what order, and with which options.

:func:`study_stages` turns ``--stages`` (names or a comma list) into registered stages in study order
(derived from each stage's ``requires``); :func:`read_config` reads a TOML run config (one table per stage, keys the
stage's option names as in ``mechdiff STAGE --help``) or a mapping, and :func:`stage_options` checks
every table and key and builds each stage's options dataclass (defaults with the config on top), so a
bad config is a ConfigError before any model work. Values are read by the command line's parser
(:func:`mechdiff.options.parse_value`): a value means the same in both, and a bad one gets the same
message. The way back out: :func:`config_toml` writes every
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
from mechdiff.options import flag_of, parse_value, renamed_error, spellings

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
    """Every accepted spelling of each option -> its field name (:func:`mechdiff.options.spellings`)."""
    return {alias: f.name for f in dataclasses.fields(cls) if not f.name.startswith("_") for alias in spellings(f)}


def _renamed(cls, key: str):
    """The field a former spelling ``key`` of an option now names (``opt(was=...)``), else None."""
    return next((f for f in dataclasses.fields(cls) if key in f.metadata.get("was", ())
                 or key.replace("-", "_") in f.metadata.get("was", ())), None)


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
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key, v in table.items():
            if key not in names:
                was = _renamed(cls, key)
                if was is not None:
                    raise renamed_error(was, key, stage_name)
                valid = ", ".join(f.name for f in dataclasses.fields(cls) if not f.name.startswith("_"))
                raise ConfigError(f"run config [{stage_name}]: unknown option {key!r}; options: {valid}")
            try:
                values[names[key]] = parse_value(fields[names[key]], hints[names[key]], v)
            except ConfigError as e:
                raise ConfigError(f"run config [{stage_name}] {key}: {e}") from None
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
        flag = flag_of(f)
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

