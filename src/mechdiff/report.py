"""One HTML page and one markdown page per run.

`write_report(run_dir)` reads the run directory and writes ``report.html`` (self-contained: images
embedded as base64 data URIs) and ``report.md`` (relative image links into ``figures/``).

Contract for stages that want to appear in the report
-----------------------------------------------------
Write a metrics JSON file at the top level of the run directory (any name except manifest.json
and steps.json). Known files come first in this order: rq1.json, maps.json, rq2.json,
alpha_sweep.json; every other ``*.json`` follows in name order (so rq3.json, rq4.json plug in
with no change here). Within a file these keys are rendered, wherever they occur in the JSON
(top level or nested up to a few dicts deep; the nesting path becomes the sub-heading):

``"title"``    str, section heading (default: the file name).
``"summary"``  str, a paragraph shown under the heading.
``"headline"`` dict name -> scalar (or short list/dict), rendered as a two-column table.
``"table"``    list of row dicts, rendered as a table. JSON keys are sorted on disk, so columns are
               the identifying keys of `ID_COLUMNS` (label, layer, site, alpha, ...) first, then
               the other keys; ``"table_columns"`` (list of str) next to it fixes order/subset.
``"tables"``   dict name -> list of row dicts, one table each.
``"figures"``  dict PNG file name (in figures/) -> caption.

Floats are shown with 4 significant digits, null as "—". Files without any of these keys are
listed but not rendered. Figures: every PNG under ``figures/`` (recursive, name order).
The header comes from manifest.json: pair, models (spec, revision, tokenizer / chat-template
hashes, dtype, config hash), seeds, options, versions, device, command.
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from mechdiff.artifacts import MANIFEST_NAME, STEPS_NAME
from mechdiff.atomic import atomic_write_text

__all__ = ["write_report", "KNOWN_METRICS", "ID_COLUMNS", "MAX_TABLE_ROWS"]

KNOWN_METRICS = ("rq1.json", "maps.json", "rq2.json", "alpha_sweep.json")
SKIP_JSON = {MANIFEST_NAME, STEPS_NAME}
MAX_TABLE_ROWS = 500
_MAX_DEPTH = 3
#: Row keys shown first (in this order) when a table has no "table_columns".
ID_COLUMNS = ("label", "name", "model", "side", "direction", "layer", "base_layer", "tuned_layer",
              "site", "hook", "head", "kind", "map", "rank", "k", "alpha", "split")
_MODEL_FIELDS = ("spec", "revision", "tokenizer_hash", "chat_template_hash", "dtype",
                 "config_hash")


# --------------------------------------------------------------------------- formatting

def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        s = json.dumps(v, sort_keys=True)
        return s if len(s) <= 120 else s[:117] + "..."
    return str(v)


def _columns(rows: Sequence[Mapping[str, Any]], fixed: Sequence[str] | None) -> list[str]:
    if fixed:
        return [str(c) for c in fixed]
    seen: list[str] = []
    for r in rows:
        for k in r:
            if k not in seen:
                seen.append(k)
    # JSON is written with sorted keys, so put the identifying columns first.
    first = [c for c in ID_COLUMNS if c in seen]
    return first + [c for c in seen if c not in first]


class _Section:
    """A block of report content, rendered to both HTML and markdown."""

    def __init__(self) -> None:
        self.html: list[str] = []
        self.md: list[str] = []

    def heading(self, text: str, level: int) -> None:
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")
        self.md.append(f"{'#' * level} {text}\n")

    def para(self, text: str) -> None:
        self.html.append(f"<p>{html.escape(text)}</p>")
        self.md.append(f"{text}\n")

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]], note: str = "") -> None:
        def md_cell(v: Any) -> str:
            return _fmt(v).replace("|", "\\|").replace("\n", " ")

        h = ["<table>", "<thead><tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in header)
             + "</tr></thead>", "<tbody>"]
        for r in rows:
            h.append("<tr>" + "".join(
                f"<td class=\"{'num' if isinstance(v, (int, float)) and not isinstance(v, bool) else ''}\">"
                f"{html.escape(_fmt(v))}</td>" for v in r) + "</tr>")
        h.append("</tbody></table>")
        if note:
            h.append(f"<p class=\"note\">{html.escape(note)}</p>")
        self.html.append("\n".join(h))
        md = ["| " + " | ".join(md_cell(c) for c in header) + " |",
              "|" + "|".join("---" for _ in header) + "|"]
        md += ["| " + " | ".join(md_cell(v) for v in r) + " |" for r in rows]
        self.md.append("\n".join(md) + "\n" + (f"\n_{note}_\n" if note else ""))

    def row_table(self, rows: Sequence[Any], columns: Sequence[str] | None = None) -> None:
        dict_rows = [r for r in rows if isinstance(r, Mapping)]
        if not dict_rows:
            return
        cols = _columns(dict_rows, columns)
        shown = dict_rows[:MAX_TABLE_ROWS]
        note = (f"showing {len(shown)} of {len(dict_rows)} rows; the full table is in the JSON"
                if len(dict_rows) > len(shown) else "")
        self.table(cols, [[r.get(c) for c in cols] for r in shown], note)

    def kv_table(self, d: Mapping[str, Any], header: tuple[str, str] = ("metric", "value")) -> None:
        if d:
            self.table(list(header), [[k, v] for k, v in d.items()])


# --------------------------------------------------------------------------- sections

def _header(sec: _Section, manifest: Mapping[str, Any] | None, run_dir: Path) -> None:
    pair = (manifest or {}).get("pair") or {}
    name = pair.get("name") if isinstance(pair, Mapping) else None
    sec.heading(f"mechdiff report — {name or run_dir.name}", 1)
    if manifest is None:
        sec.para("No manifest.json in this run directory: models and versions unknown.")
        return
    env = manifest.get("environment") or {}
    pkgs = env.get("packages") or {}
    dev = env.get("device") or {}
    facts = {
        "run directory": run_dir.name,
        "created": manifest.get("created"),
        "mechdiff": pkgs.get("mechdiff"),
        "torch / transformers": f"{pkgs.get('torch')} / {pkgs.get('transformers')}",
        "python / platform": f"{env.get('python')} / {env.get('platform')}",
        "device": ", ".join(dev.get("devices") or []) or None,
        "command": manifest.get("command"),
    }
    resumes = manifest.get("resumes") or []
    if resumes:
        facts["resumed"] = f"{len(resumes)} time(s), last {resumes[-1].get('time')}"
    sec.kv_table(facts, ("run", ""))
    if isinstance(pair, Mapping) and pair:
        sec.heading("Pair", 2)
        sec.kv_table({k: v for k, v in pair.items()}, ("field", "value"))
    models = manifest.get("models") or {}
    if models:
        sec.heading("Models", 2)
        extra = sorted({k for m in models.values() if isinstance(m, Mapping) for k in m}
                       - set(_MODEL_FIELDS))
        cols = ["side", *_MODEL_FIELDS, *extra]
        sec.table(cols, [[side, *[(m or {}).get(c) for c in cols[1:]]]
                         for side, m in models.items()])
    for key in ("seeds", "options"):
        val = manifest.get(key)
        if val:
            sec.heading(key.capitalize(), 2)
            sec.kv_table(val, (key[:-1] if key.endswith("s") else key, "value"))


def _render_node(sec: _Section, node: Mapping[str, Any], label: str, depth: int,
                 captions: dict[str, str]) -> bool:
    """Render the contract keys of one dict, then recurse into child dicts. True if anything."""
    found = False
    has_own = any(k in node for k in ("headline", "table", "tables", "summary"))
    if has_own and label:
        sec.heading(label, 3)
    if isinstance(node.get("summary"), str):
        sec.para(node["summary"])
        found = True
    if isinstance(node.get("headline"), Mapping):
        sec.kv_table(node["headline"])
        found = True
    if isinstance(node.get("table"), list):
        sec.row_table(node["table"], node.get("table_columns"))
        found = True
    if isinstance(node.get("tables"), Mapping):
        for tname, rows in node["tables"].items():
            if isinstance(rows, list):
                sec.para(str(tname))
                sec.row_table(rows)
                found = True
    if isinstance(node.get("figures"), Mapping):
        captions.update({str(k): str(v) for k, v in node["figures"].items()})
    if depth < _MAX_DEPTH:
        for k, v in node.items():
            if k in ("headline", "table", "tables", "figures"):
                continue
            if isinstance(v, Mapping):
                sub = f"{label} / {k}" if label else str(k)
                found |= _render_node(sec, v, sub, depth + 1, captions)
    return found


def _metric_files(run_dir: Path) -> list[Path]:
    present = {p.name: p for p in run_dir.glob("*.json") if p.is_file() and p.name not in SKIP_JSON}
    ordered = [present.pop(n) for n in KNOWN_METRICS if n in present]
    return ordered + [present[n] for n in sorted(present)]


def _figures(run_dir: Path) -> list[Path]:
    fig_dir = run_dir / "figures"
    return sorted(fig_dir.rglob("*.png")) if fig_dir.is_dir() else []


# --------------------------------------------------------------------------- entry point

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #555; } .note, .muted { color: #777; font-size: 0.85em; }
"""


def write_report(run_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write report.html (self-contained) and report.md into `run_dir`; return their paths."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        from mechdiff.errors import ConfigError

        raise ConfigError(f"{run_dir} is not a run directory")
    sec = _Section()
    manifest = _load(run_dir / MANIFEST_NAME)
    _header(sec, manifest if isinstance(manifest, Mapping) else None, run_dir)

    captions: dict[str, str] = {}
    unrendered: list[str] = []
    for path in _metric_files(run_dir):
        data = _load(path)
        if not isinstance(data, Mapping):
            unrendered.append(path.name + (" (unreadable)" if data is None else ""))
            continue
        title = data.get("title") if isinstance(data.get("title"), str) else path.stem
        probe = _Section()
        if not _render_node(probe, data, "", 0, captions):
            unrendered.append(path.name)
            continue
        sec.heading(f"{title}  ({path.name})" if title != path.stem else title, 2)
        sec.html += probe.html
        sec.md += probe.md
    if unrendered:
        sec.para("Other metrics files (no headline/table): " + ", ".join(unrendered))

    figs = _figures(run_dir)
    html_figs: list[str] = []
    md_figs: list[str] = []
    for p in figs:
        rel = p.relative_to(run_dir).as_posix()
        cap = captions.get(p.name) or captions.get(p.relative_to(run_dir / "figures").as_posix()) \
            or p.stem.replace("_", " ")
        data = base64.b64encode(p.read_bytes()).decode("ascii")
        html_figs.append(f"<figure><img alt=\"{html.escape(cap)}\" src=\"data:image/png;base64,"
                         f"{data}\"><figcaption>{html.escape(cap)} "
                         f"<span class=\"muted\">({html.escape(rel)})</span></figcaption></figure>")
        md_figs.append(f"![{cap}]({rel})\n\n_{cap}_\n")
    if figs:
        sec.html.append("<h2>Figures</h2>")
        sec.md.append("## Figures\n")
        sec.html += html_figs
        sec.md += md_figs

    title = html.escape(f"mechdiff — {run_dir.name}")
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}"
            f"</title><style>{_CSS}</style></head><body>\n" + "\n".join(sec.html)
            + "\n</body></html>\n")
    html_path = atomic_write_text(run_dir / "report.html", page)
    md_path = atomic_write_text(run_dir / "report.md", "\n".join(sec.md))
    return html_path, md_path


def _load(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None

