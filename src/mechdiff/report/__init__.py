"""One HTML page and one markdown page per run, from the run directory's artifacts alone.

``write_report(run_dir)`` writes ``report.html`` (self-contained: figures embedded as data URIs, inline
CSS, no scripts, nothing fetched) and ``report.md`` (relative image links into ``figures/``):

1. executive summary: every headline number with its uncertainty or control beside it, from the
   stages' ``sentences`` hooks (:mod:`mechdiff.report.summary`);
2. the stages' figures (``figures`` hooks; the built-in stages give Figures A-D) (:mod:`mechdiff.report.figures`);
3. the stages' own sections (``section`` hooks: e.g. mapped-patch's alpha-sweep table);
4. how to reproduce (``RUN.md``, written by ``mechdiff run``);
5. details per metrics file, other figures, provenance (manifest).

Contract for stages that want to appear in the details
------------------------------------------------------
The report knows no stage by name: a stage gives it :class:`mechdiff.report.hooks.ReportHooks`
(sentences, figures, a section, numbers, its metrics files). Write a metrics JSON file at the top
level of the run directory (any name except manifest.json and steps.json). The registered stages'
``metrics`` files come first, in study order; every other ``*.json`` follows in name order. Within a file these keys are rendered, wherever they
occur (top level or nested up to a few dicts deep; the nesting path becomes the sub-heading):
``"title"`` (section heading), ``"summary"`` (a paragraph), ``"headline"`` (dict name -> scalar, a
two-column table), ``"table"`` (list of row dicts; ``"table_columns"`` fixes the columns),
``"tables"`` (dict name -> rows), ``"figures"`` (dict PNG file name in figures/ -> caption).
Every string from the artifacts (pair and prompt files included) is escaped for HTML and markdown.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from mechdiff.artifacts import MANIFEST_NAME, STEPS_NAME
from mechdiff.atomic import atomic_write_text
from mechdiff.errors import ConfigError
from mechdiff.report.figures import write_figures
from mechdiff.report.hooks import registered_hooks, stage_order
from mechdiff.report.render import ID_COLUMNS, MAX_TABLE_ROWS, Section, header, load, page, render_node
from mechdiff.report.summary import sentences

__all__ = ["write_report", "known_metrics", "ID_COLUMNS", "MAX_TABLE_ROWS"]

SKIP_JSON = {MANIFEST_NAME, STEPS_NAME}


def known_metrics() -> list[str]:
    """The registered stages' metrics files, in study order (listed first in the details)."""
    return list(dict.fromkeys(m for _, h in registered_hooks() for m in h.metrics))


def _metric_files(run_dir: Path) -> list[Path]:
    present = {p.name: p for p in run_dir.glob("*.json") if p.is_file() and p.name not in SKIP_JSON}
    ordered = [present.pop(n) for n in known_metrics() if n in present]
    return ordered + [present[n] for n in sorted(present)]


def _stage_figures(run_dir: Path) -> list[Path]:
    fig_dir = run_dir / "figures"
    if not fig_dir.is_dir():
        return []
    return sorted(p for p in fig_dir.rglob("*.png") if "report" not in p.relative_to(fig_dir).parts[:-1])


def _summary(sec: Section, run_dir: Path, manifest: Mapping[str, Any] | None) -> None:
    pair = (manifest or {}).get("pair") or {}
    if isinstance(pair, Mapping) and pair.get("base"):
        spec = lambda s: (s.get("spec") or s.get("id") or s) if isinstance(s, Mapping) else s  # noqa: E731
        sec.para(f"Pair {pair.get('name')} ({pair.get('domain', 'general')}): base {spec(pair['base'])} vs tuned "
                 f"{spec(pair.get('tuned'))}. Stages run: "
                 f"{', '.join(stage_order((manifest or {}).get('options') or {})) or 'none yet'}.")
    sec.heading("Executive summary", 2, "summary")
    items = sentences(run_dir)
    if items:
        sec.bullets([f"{topic}: {s}" for topic, s in items])
    else:
        sec.para("No stage has finished in this directory yet.")


def _figures_ad(sec: Section, run_dir: Path) -> None:
    for key, path, caption in write_figures(run_dir):
        sec.heading(f"Figure {key}", 2, f"figure-{key.lower()}")
        if path is None:
            sec.para(caption, "note")
        else:
            sec.figure(path, caption, path.relative_to(run_dir).as_posix())


def _sections(sec: Section, run_dir: Path) -> None:
    for stage, h in registered_hooks():
        if h.section is not None:
            try:
                h.section(sec, run_dir)
            except Exception as e:      # a stage's section must never break the report
                sec.para(f"({stage}: its report section could not be written: {type(e).__name__}: {e})", "note")


def _reproduce(sec: Section, run_dir: Path) -> None:
    sec.heading("How to reproduce", 2, "reproduce")
    run_md = run_dir / "RUN.md"
    if run_md.is_file():
        sec.para("RUN.md in the run directory (written by mechdiff run):")
        sec.pre(run_md.read_text(encoding="utf-8"), "markdown")
    else:
        sec.para("No RUN.md (this directory was not made by `mechdiff run`); the command of each stage is in "
                 "the provenance below. Rebuild this report with:")
        sec.pre(f"mechdiff report {run_dir.resolve()}", "bash")


def _details(sec: Section, run_dir: Path) -> dict[str, str]:
    captions: dict[str, str] = {}
    unrendered: list[str] = []
    sec.heading("Details per metrics file", 2, "details")
    for path in _metric_files(run_dir):
        data = load(path)
        if not isinstance(data, Mapping):
            unrendered.append(path.name + (" (unreadable)" if data is None else ""))
            continue
        title = data.get("title") if isinstance(data.get("title"), str) else path.stem
        probe = Section()
        if not render_node(probe, data, "", 0, captions):
            unrendered.append(path.name)
            continue
        sec.heading(f"{title}  ({path.name})" if title != path.stem else title, 3)
        sec.extend(probe)
    if unrendered:
        sec.para("Other metrics files (no headline/table): " + ", ".join(unrendered))
    return captions


def write_report(run_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write report.html (self-contained) and report.md into ``run_dir``; return their paths."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a run directory")
    manifest = load(run_dir / MANIFEST_NAME)
    manifest = manifest if isinstance(manifest, Mapping) else None
    pair = (manifest or {}).get("pair") or {}
    name = pair.get("name") if isinstance(pair, Mapping) else None
    sec = Section()
    sec.heading(f"mechdiff report — {name or run_dir.name}", 1)
    _summary(sec, run_dir, manifest)
    _figures_ad(sec, run_dir)
    _sections(sec, run_dir)
    _reproduce(sec, run_dir)
    captions = _details(sec, run_dir)
    figs = _stage_figures(run_dir)
    if figs:
        sec.heading("Figures of each stage", 2, "stage-figures")
        for p in figs:
            cap = captions.get(p.name) or captions.get(p.relative_to(run_dir / "figures").as_posix()) \
                or p.stem.replace("_", " ")
            sec.figure(p, cap, p.relative_to(run_dir).as_posix())
    sec.heading("Provenance", 2, "provenance")
    header(sec, manifest, run_dir)
    html_path = atomic_write_text(run_dir / "report.html", page(f"mechdiff — {run_dir.name}", sec.html))
    md_path = atomic_write_text(run_dir / "report.md", "\n".join(sec.md))
    return html_path, md_path
