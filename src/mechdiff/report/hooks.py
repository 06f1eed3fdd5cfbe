"""What a stage contributes to the report: the report knows no stage by name, only these hooks.

A stage module gives its :class:`~mechdiff.experiments.stage.Stage` a :class:`ReportHooks`;
registering the stage registers the hooks here (:func:`register`), in study order. Every hook reads
the run directory (``Path``) alone, so ``mechdiff report DIR`` rebuilds the page from the artifacts:

- ``sentences(run_dir)``: the stage's executive-summary sentences (each with its uncertainty or
  control), as strings (topic: the hook's ``topic``) or ``(topic, sentence)`` pairs; ``[]`` when
  the stage has not run there;
- ``figures``: :class:`Figure` s: ``data(run_dir)`` (None: not run) and ``draw(runs, path)`` (one run,
  or several overlaid by ``mechdiff compare``), shown as "Figure KEY" with ``caption``;
- ``section(sec, run_dir)``: extra report content (tables, text) written into a
  :class:`~mechdiff.report.render.Section` after the figures;
- ``numbers(run_dir)``: headline numbers ``{name: value}`` for the comparison table;
- ``metrics``: the stage's metrics JSON files, listed first (in this order) in the details.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["Figure", "ReportHooks", "register", "unregister", "registered_hooks", "stage_order", "figures"]


@dataclass(frozen=True)
class Figure:
    """One report figure of a stage. data: one run's data (JSON-able dict, None when the stage has not
    run there); draw(runs, path): draws one or more runs' data (each with a ``"label"``) at ``path``.
    The report shows it as "Figure KEY" under ``figures/report/fig_KEY.png``."""

    key: str
    caption: str
    data: Callable[[Path], "dict | None"]
    draw: Callable[[list[dict], Path], Any]
    title: str = ""           # a few words for the comparison's overlay ("CKA and patch KL per layer")


@dataclass(frozen=True)
class ReportHooks:
    """A stage's contributions to the report (every field optional)."""

    topic: str = ""
    sentences: "Callable[[Path], Sequence[str | tuple[str, str]]] | None" = None
    figures: tuple[Figure, ...] = ()
    section: "Callable[[Any, Path], None] | None" = None
    numbers: "Callable[[Path], dict] | None" = None
    metrics: tuple[str, ...] = ()


_HOOKS: dict[str, ReportHooks] = {}


def register(stage: str, hooks: ReportHooks | None) -> None:
    """Record ``stage`` (in registration order, the study order) and its hooks (None: none)."""
    _HOOKS[stage] = hooks or ReportHooks(topic=stage)


def unregister(stage: str) -> None:
    _HOOKS.pop(stage, None)


def registered_hooks() -> list[tuple[str, ReportHooks]]:
    """``[(stage, hooks)]`` in registration order."""
    return list(_HOOKS.items())


def stage_order(stages) -> list[str]:
    """``stages`` sorted in registration order (unknown names last, by name)."""
    order = {s: i for i, s in enumerate(_HOOKS)}
    return sorted(stages, key=lambda s: (order.get(s, len(order)), s))


def figures() -> list[Figure]:
    """Every registered figure, in registration order (keys are unique: the first one wins)."""
    seen: dict[str, Figure] = {}
    for _, h in registered_hooks():
        for f in h.figures:
            seen.setdefault(f.key, f)
    return list(seen.values())
