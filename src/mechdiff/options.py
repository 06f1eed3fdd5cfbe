"""Stage options: one declaration per option, one parser for the command line and the TOML run config.

An option is a field of a stage's options dataclass (or of ``experiments.stage.Common``) declared with
:func:`opt`: its name (``n_prompts``: the TOML key; ``--n-prompts``: the flag), its type (the field's
annotation) or a :class:`Kind` that reads it, its default and its help. ``mechdiff STAGE --flag TEXT``
and ``[STAGE] name = value`` in a run config both go through :func:`parse_value`, so a value means the
same in both and a bad value gets the same message (only the place it names differs: ``--flag`` or
``run config [STAGE] name``). :func:`check_values` applies the same rule to options built in Python.

The two strengths are kinds of their own (one name, one meaning each):

- :data:`MAPPED_ALPHA` (``mapped-patch --mapped-alpha``, ``[mapped-patch] mapped_alpha``): numbers > 0
  and/or ``auto``; a mapped patch writes ``mu + alpha (M(x) - mu)`` (``auto``: the alpha whose mapped
  states match the tuned train states' norm). Kept as text (``"0.5"``, ``"auto"``; numbers in their
  float spelling), the form the sweep's tables label rows with.
- :data:`STEER_ALPHA` (``steer --steer-alpha``, ``[steer] steer_alpha``): numbers > 0, each handle's
  strength in its mode's formula (``analyses.steering``: steer ``h + alpha (h U) U^T``, add
  ``h + alpha s u``, ablate ``h + alpha ((r - h) U) U^T``; ablation uses the values <= 1).
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

from mechdiff.errors import ConfigError

__all__ = ["opt", "Kind", "MAPPED_ALPHA", "STEER_ALPHA", "flag_of", "spellings", "kind_of", "parse_value",
           "check_values", "renamed_error"]


@dataclass(frozen=True)
class Kind:
    """How one option's value is read. ``item(v)`` turns one TOML value or one piece of command-line
    text into the field's value (or its list's item), raising ``ValueError`` when it cannot;
    ``what`` names the accepted values in messages, ``example`` is a command-line example for lists."""

    what: str
    item: Callable[[Any], Any]
    many: bool = False
    example: str = ""
    metavar: str = "TEXT"

    def expected(self) -> str:
        if not self.many:
            return self.what
        toml = ", ".join(x if _is_number(x) else f'"{x}"' for x in self.example.split(","))
        return f"a comma list of {self.what} (e.g. {self.example}; in TOML [{toml}])"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _number(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ValueError
    return float(v)


def _integer(v: Any) -> int:
    if isinstance(v, bool) or isinstance(v, float):
        raise ValueError
    if isinstance(v, str):
        return int(v.strip())
    if isinstance(v, int):
        return v
    raise ValueError


def _text(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise ValueError
    return str(v)


def _boolean(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    raise ValueError


def _positive(v: Any) -> float:
    x = _number(v)
    if not (math.isfinite(x) and x > 0):
        raise ValueError
    return x


def _mapped_alpha(v: Any) -> str:
    if isinstance(v, str) and v.strip().lower() == "auto":
        return "auto"
    return repr(_positive(v))


MAPPED_ALPHA = Kind("finite numbers > 0 and/or 'auto'", _mapped_alpha, many=True, example="0.5,1.0,auto",
                    metavar="ALPHAS")
STEER_ALPHA = Kind("finite numbers > 0", _positive, many=True, example="0.5,1,2", metavar="NUMBERS")

_BY_TYPE = {int: ("an integer", _integer, "INTEGER", "10,20,24"), float: ("a number", _number, "NUMBER", "0.5,1,2"),
            str: ("text", _text, "TEXT", "a,b"), bool: ("true or false", _boolean, "BOOLEAN", "")}
_PLURAL = {int: "integers", float: "numbers", str: "names", bool: "booleans"}


def opt(default: Any = None, help: str = "", *, flag: str | None = None, factory=None,  # noqa: A002
        kind: Kind | None = None, was: tuple[str, ...] = ()) -> Any:
    """A stage option field: its default and help; ``flag`` overrides the command-line spelling,
    ``kind`` the type-derived parser, ``was`` lists former spellings that now get a message naming
    this one."""
    meta = {"help": help, **({"flag": flag} if flag else {}), **({"kind": kind} if kind else {}),
            **({"was": tuple(was)} if was else {})}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def flag_of(f: dataclasses.Field) -> str:
    """The command-line spelling of a field (``--n-prompts``, or its ``flag``)."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def spellings(f: dataclasses.Field) -> list[str]:
    """Every accepted TOML key / flag name of a field (without dashes): its name, hyphenated, its flag."""
    out = [f.name, f.name.replace("_", "-"), flag_of(f).lstrip("-")]
    out += [s.replace("-", "_") for s in out]
    return list(dict.fromkeys(out))


def renamed_error(f: dataclasses.Field, old: str, table: str | None = None) -> ConfigError:
    """The message for a former spelling ``old`` of field ``f``: on the command line (``table`` None,
    ``old`` like ``--alpha``) or as a key of run config table ``table``."""
    now = (f"use {flag_of(f)} (run config key {f.name})" if table is None else
           f"use {f.name} (command line {flag_of(f)})")
    where = old if table is None else f"run config [{table}] {old}"
    return ConfigError(f"{where} was renamed: {now}: {f.metadata.get('help', '')}")


def _optional(hint) -> tuple[Any, bool]:
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    args = [a for a in typing.get_args(hint) if a is not type(None)] if union else [hint]
    return args[0], union and type(None) in typing.get_args(hint)


def kind_of(f: dataclasses.Field, hint) -> tuple[Kind, bool]:
    """The :class:`Kind` of a field (its ``kind`` or one from its annotation) and whether None is allowed."""
    base, optional = _optional(hint)
    if "kind" in f.metadata:
        return f.metadata["kind"], optional
    many = typing.get_origin(base) is list
    item = typing.get_args(base)[0] if many else base
    what, parse, metavar, example = _BY_TYPE.get(item, ("a value", lambda v: v, "VALUE", ""))
    if many:
        return Kind(_PLURAL.get(item, "values"), parse, True, example, metavar + "S"), optional
    return Kind(what, parse, metavar=metavar), optional


def parse_value(f: dataclasses.Field, hint, value: Any) -> Any:
    """``value`` (command-line text, a TOML value, or an already typed value) as field ``f``'s value.

    Lists: a comma-separated string or a list; each item read by the kind. Optional fields: None, or
    the empty string, is None. ConfigError(``"expected ..., got ..."``) otherwise; the caller prefixes
    the place (``--flag`` or ``run config [stage] key``)."""
    kind, optional = kind_of(f, hint)
    if value is None or (optional and value == ""):
        if optional:
            return None
        raise ConfigError(f"a value is required: {kind.expected()}")
    if not kind.many:
        return _one(kind, value)
    if isinstance(value, str):
        items = [x for x in value.replace(" ", "").split(",") if x]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [value]
    return [_one(kind, x) for x in items]


def _one(kind: Kind, v: Any) -> Any:
    try:
        return kind.item(v)
    except (TypeError, ValueError):
        raise ConfigError(f"expected {kind.expected()}, got {_shown(v)}") from None


def _shown(v: Any) -> str:
    """A bad value as written: the same text for ``-1`` typed on the command line and ``-1`` in TOML."""
    if isinstance(v, str):
        return v.strip() if _is_number(v) else repr(v)
    return repr(v)


def check_values(opts: Any) -> None:
    """Every list option (and every option of its own :class:`Kind`) of an options dataclass built in
    Python read through :func:`parse_value`, the rule the command line and the run config apply, and
    stored as read (``steer_alpha=[1]`` -> ``[1.0]``); ConfigError naming the flag otherwise."""
    hints = typing.get_type_hints(type(opts))
    for f in dataclasses.fields(opts):
        if f.name.startswith("_"):
            continue
        v = getattr(opts, f.name)
        kind, _ = kind_of(f, hints[f.name])
        if "kind" not in f.metadata and not kind.many:
            continue                     # scalars of a plain type: the stage's own checks
        try:
            setattr(opts, f.name, parse_value(f, hints[f.name], v))
        except ConfigError as e:
            raise ConfigError(f"{flag_of(f)}: {e}") from None
