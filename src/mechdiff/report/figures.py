"""The report's figures, drawn from the run's JSON files through the stages' figure hooks
(:class:`mechdiff.report.hooks.Figure`; the built-in stages give Figures A-D).

``figure_data(run_dir)`` reads one run into each figure's data (the comparison overlays several);
``write_figures(run_dir)`` draws the ones whose stage ran into ``figures/report/`` and returns
``[(key, path, caption)]``. A figure is redrawn only when its data changed (a digest beside it), so
rewriting the report after every stage stays cheap.
"""
from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path

from mechdiff.atomic import atomic_write_text
from mechdiff.report.hooks import Figure, figures


def _figure(key: str) -> Figure:
    for f in figures():
        if f.key == key:
            return f
    raise KeyError(f"no registered report figure {key!r}")


def figure_data(run_dir: Path, label: str | None = None) -> dict[str, dict | None]:
    """``{key: data}``: one run's data for each registered figure (None: its stage did not run)."""
    run_dir = Path(run_dir)
    out = {f.key: f.data(run_dir) for f in figures()}
    for v in out.values():
        if v is not None:      # "$" would start matplotlib mathtext: a pair name is shown as written
            v["label"] = (label or run_dir.name).replace("$", r"\$")
    return out


def draw(key: str, runs: list[dict], path: Path) -> Path:
    """Draw figure ``key`` for ``runs`` at ``path`` unless the same data is drawn there already."""
    fn = _figure(key).draw
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        source = repr(fn)
    digest = hashlib.sha256((json.dumps(runs, sort_keys=True, default=str) + source).encode()).hexdigest()
    stamp = path.with_suffix(".sha256")
    if path.is_file() and stamp.is_file() and stamp.read_text().strip() == digest:
        return path
    fn([{k: v for k, v in r.items() if k != "best"} for r in runs], path)
    atomic_write_text(stamp, digest + "\n")
    return path


def write_figures(run_dir: Path) -> list[tuple[str, Path | None, str]]:
    """Every registered figure of one run under figures/report/: ``[(key, path or None, caption or
    the reason)]``."""
    run_dir = Path(run_dir)
    out = []
    for f in figures():
        try:
            data = f.data(run_dir)
        except Exception as e:      # a figure must never break a stage's report
            out.append((f.key, None, f"Figure {f.key}: its data could not be read: {type(e).__name__}: {e}"))
            continue
        if data is None:
            out.append((f.key, None, f"Figure {f.key}: its stage has not run in this directory."))
            continue
        data["label"] = run_dir.name.replace("$", r"\$")
        try:
            path = draw(f.key, [data], run_dir / "figures" / "report" / f"fig_{f.key.lower()}.png")
            out.append((f.key, path, f.caption))
        except Exception as e:      # a figure must never break a stage's report
            out.append((f.key, None, f"Figure {f.key} could not be drawn: {type(e).__name__}: {e}"))
    return out
