"""Typed stage results: what one stage hands to the stages after it and to the report.

Every stage's ``summarise`` returns a dataclass (its *result*); :func:`mechdiff.experiments.stage.run_stage`
writes it with :func:`save_result` to ``results/<stage>.json`` in one versioned envelope::

    {"schema": "mechdiff.result", "version": 1, "stage": "rq1", "type": "Rq1Result", "result": {...}}

and a later stage reads it back with :func:`load_result` as the same dataclass (never by dict keys)::

    rq1 = load_result(study.run, Rq1Result)          # None when RQ1 has not run in this directory
    rq1.chosen_layers, rq1.control, rq1.entry

The stage's own metrics files (``rq1.json``, ``alpha_sweep.json``, ...) are written as before; the
result is the small typed part of them that others depend on. Fields are plain JSON values, nested
dataclasses, and lists / dicts / Optionals of those; :func:`from_json` rebuilds them from the type
hints. A file of another schema version is refused with a clear message (rerun the stage).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from mechdiff.artifacts import RunDir
from mechdiff.atomic import to_jsonable
from mechdiff.errors import DataError

SCHEMA = "mechdiff.result"
SCHEMA_VERSION = 1
RESULTS_DIR = "results"

T = TypeVar("T")

#: result dataclass name -> stage name, filled by :func:`result_of` (a result type belongs to one stage)
_STAGE_OF: dict[type, str] = {}


def result_of(stage: str):
    """Class decorator: ``@result_of("rq1")`` makes the dataclass the typed result of stage ``rq1``
    (``load_result(run, cls)`` then needs no stage name)."""
    def wrap(cls):
        _STAGE_OF[cls] = stage
        return cls
    return wrap


def result_path(stage: str) -> str:
    """The result file of ``stage`` inside a run directory (``results/<stage>.json``)."""
    return f"{RESULTS_DIR}/{stage}.json"


def to_json(result: Any) -> dict:
    """A result dataclass as JSON values (nested dataclasses as dicts)."""
    if not dataclasses.is_dataclass(result) or isinstance(result, type):
        raise TypeError(f"a stage result must be a dataclass instance, got {type(result).__name__}")
    return to_jsonable(dataclasses.asdict(result))


def _build(tp: Any, value: Any) -> Any:
    """``value`` (parsed JSON) as type ``tp``: dataclasses, list/tuple/dict of them, Optionals."""
    if value is None:
        return None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        return _build(options[0], value) if len(options) == 1 else value
    if dataclasses.is_dataclass(tp):
        return from_json(tp, value)
    if origin in (list, tuple) and typing.get_args(tp):
        inner = typing.get_args(tp)[0]
        items = [_build(inner, v) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict and typing.get_args(tp):
        inner = typing.get_args(tp)[1]
        return {k: _build(inner, v) for k, v in value.items()}
    return value


def from_json(cls: type[T], data: dict) -> T:
    """Rebuild the dataclass ``cls`` from :func:`to_json`'s output (unknown keys are ignored)."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    return cls(**{k: _build(hints.get(k, Any), v) for k, v in data.items() if k in known})


def save_result(run: RunDir, result: Any, stage: str | None = None) -> str:
    """Write ``result`` (a dataclass) as the typed result of ``stage`` (default: the stage its class
    was declared for with :func:`result_of`); returns the file's path inside the run directory."""
    stage = stage or _STAGE_OF.get(type(result))
    if stage is None:
        raise TypeError(f"{type(result).__name__}: give the stage name or declare it with @result_of(stage)")
    rel = result_path(stage)
    run.write_json(rel, {"schema": SCHEMA, "version": SCHEMA_VERSION, "stage": stage,
                         "type": type(result).__name__, "result": to_json(result)})
    return rel


def load_result(run: RunDir, cls: type[T], stage: str | None = None) -> T | None:
    """The typed result of ``stage`` (default: the stage ``cls`` is declared for) in ``run``, as
    ``cls``; None when that stage has not finished there. DataError for another schema version
    or another result type."""
    stage = stage or _STAGE_OF.get(cls)
    if stage is None:
        raise TypeError(f"{cls.__name__}: give the stage name or declare it with @result_of(stage)")
    rel = result_path(stage)
    if not run.exists(rel):
        return None
    env = run.read_json(rel)
    if env.get("schema") != SCHEMA or env.get("version") != SCHEMA_VERSION:
        raise DataError(f"{run.file(rel)}: result schema {env.get('schema')} version {env.get('version')}, "
                            f"this mechdiff reads {SCHEMA} version {SCHEMA_VERSION}; rerun stage {stage!r} "
                            "into this directory (its finished steps are reused)")
    if env.get("type") != cls.__name__:
        raise DataError(f"{run.file(rel)} holds a {env.get('type')}, not a {cls.__name__}")
    return from_json(cls, env["result"])


# ------------------------------------------------------------------------------ built-in results
@dataclass
class ChosenLayer:
    """A layer the later stages work at, with the rule(s) that chose it."""

    layer: int
    rule: str          # "entry", "steepest rise", "peak" (joined with " + "), or "lowest debiased CKA"


@dataclass
@result_of("rq1")
class Rq1Result:
    """RQ1's choice of layers. entry: where the divergence enters (None: not found or no patching)."""

    entry: int | None
    chosen: list[ChosenLayer]
    control: int | None
    control_rule: str
    basis: str                       # the rule as one sentence (rq1.json's layers.basis)
    readouts: list[str]              # readouts patch.json holds (empty without patching)
    measure: str | None              # the main readout (None without patching)
    floor: float | None = None       # the self-patch floor the entry was tested against
    planted: list[int] | None = None  # ground-truth layers of a planted pair

    @property
    def chosen_layers(self) -> list[int]:
        return [c.layer for c in self.chosen]


@dataclass
@result_of("maps")
class MapsResult:
    """The transport map chosen on dev (None when none was fitted)."""

    best: dict | None                 # maps.json's ``best`` row (solver, layer, site, R2 ...)
    layers: list[int] = field(default_factory=list)
    control_layer: int | None = None


@dataclass
class SweepWinner:
    """The mapped-patch variant chosen on dev, its numbers on test."""

    solver: str
    layer: int
    site: str
    alpha: Any                        # a float or "auto"
    kl_raw: float | None
    kl_mapped: float | None
    drop_pct: float | None
    dev_drop_pct: float | None
    alpha_value: float | None = None  # the strength alpha resolves to (``auto``: a number)


@dataclass
class SweepControl:
    """A control of the winner's own map (bogus / shuffle), on test."""

    control: str
    layer: int
    map_layer: int | None
    site: str
    kl_mapped: float | None
    drop_pct: float | None


@dataclass
@result_of("mapped-patch")
class MappedPatchResult:
    """RQ2's headline: the winner, its controls, whether the stop conditions are met."""

    winner: SweepWinner | None
    controls: list[SweepControl]
    stop_conditions_met: bool
    measure: str
    winner_rule: str = ""
    answer: str | None = None         # why there is no winner ("no map transfers the change: ...")


@dataclass
@result_of("steer")
class SteerResult:
    """RQ3's headline: the smallest k whose handle closes the gap within the side-effect limits."""

    status: str                      # "found" | "none does" | "nothing to steer" | "no handle"
    minimal_k: int | None
    layers: list[int]
    control_layer: int | None
    text: list[str] = field(default_factory=list)
    rank: dict[str, Any] = field(default_factory=dict)      # layer -> {estimate, ci_low, ci_high, exact}
    handles: list[str] = field(default_factory=list)        # saved handle prefixes (handles/L..._<mode>)


@dataclass
@result_of("heads")
class HeadsResult:
    """RQ4's headline: share of changed heads and the importance churn."""

    layers: list[int]
    unit: str
    noise_floor: float
    structural: str | None           # "own" | "swap" | None (the measurement behind changed_share)
    changed_share: float | None
    importance: str
    importance_churn: float | None
    topk_jaccard: float | None
    changed_ci: list[float] | None = None     # changed_share's 95% interval (topic groups)
    changed_share_storey: float | None = None
