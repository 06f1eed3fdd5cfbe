"""The executive summary, generated from the run's JSON files alone by the stages' report hooks
(:mod:`mechdiff.report.hooks`): every sentence carries its numbers with their uncertainty (an SE
or CI) or a control beside it.

``numbers(run_dir)`` gives the headline numbers as a flat dict (the comparison table reads them);
``sentences(run_dir)`` gives the summary as ``[(topic, sentence)]``; ``terminal_summary(run_dir)``
the one-screen text ``mechdiff run`` prints at the end.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mechdiff.report.hooks import registered_hooks


def _safe(fn, run_dir: Path, topic: str) -> list:
    try:
        return list(fn(Path(run_dir)))
    except Exception as e:     # a summary must never break a stage's report
        return [f"({topic}: could not be summarised from the artifacts: {type(e).__name__}: {e})"]


def sentences(run_dir: Path) -> list[tuple[str, str]]:
    """``[(topic, sentence)]`` for the executive summary: each registered stage's ``sentences``
    hook in study order (a plain string gets the hook's topic)."""
    out = []
    for stage, h in registered_hooks():
        if h.sentences is None:
            continue
        topic = h.topic or stage
        out += [s if isinstance(s, tuple) else (topic, s) for s in _safe(h.sentences, run_dir, topic)]
    return out


def numbers(run_dir: Path) -> dict[str, Any]:
    """Headline numbers for the comparison table (None where a stage did not run): every registered
    stage's ``numbers`` hook, merged."""
    out: dict[str, Any] = {}
    for _, h in registered_hooks():
        if h.numbers is not None:
            out.update(h.numbers(Path(run_dir)))
    return out


def terminal_summary(run_dir: Path) -> str:
    """The one-screen summary ``mechdiff run`` prints: each stage's headline sentences."""
    lines = [f"summary of {Path(run_dir).resolve()}"]
    for topic, s in sentences(run_dir):
        lines.append(f"- [{topic}] {s}")
    lines.append(f"report: {(Path(run_dir) / 'report.html').resolve()}")
    return "\n".join(lines)
