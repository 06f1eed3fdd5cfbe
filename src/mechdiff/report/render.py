"""Rendering blocks shared by the run report and the comparison page: one :class:`Section` writes
HTML and markdown side by side; every string is escaped for both (text from pair and prompt files
never becomes markup). Also the generic rendering of a metrics JSON's ``headline`` / ``table`` /
``tables`` / ``summary`` keys and the manifest header."""
from __future__ import annotations

import base64
import html
import json
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

MAX_TABLE_ROWS = 500
MAX_DEPTH = 3
#: Row keys shown first (in this order) when a table has no "table_columns".
ID_COLUMNS = ("label", "name", "model", "side", "direction", "layer", "base_layer", "tuned_layer",
              "site", "hook", "head", "kind", "map", "rank", "k", "alpha", "split")
MODEL_FIELDS = ("spec", "revision", "tokenizer_hash", "chat_template_hash", "dtype", "config_hash")

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.4; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.9em; display: block;
        max-width: 100%; overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #555; } .note, .muted { color: #777; font-size: 0.85em; }
ul.summary li { margin: 0.25em 0; } pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto;
       font-size: 0.85em; white-space: pre-wrap; } details { margin: 0.5em 0 1em; }
"""

_MD_SPECIAL = re.compile(r"([\\`*\[\]|])")
_MD_LINE_START = re.compile(r"^(\s*\d*)([#>+=.)-])(?=\s|$)")


def fmt(v: Any) -> str:
    """A value as text: floats with 4 significant digits, None as an em dash."""
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
        s = json.dumps(v, sort_keys=True, ensure_ascii=False)
        return s if len(s) <= 120 else s[:117] + "..."
    return str(v)


def md_escape(text: Any) -> str:
    """Text safe in markdown: HTML entities for < > & (no raw HTML), backslashes before the characters
    that make code, emphasis, links, images and table cells (\\ ` * [ ] |) and before a leading block
    marker (# > - + = "1."), newlines folded (a table cell or list item stays one line)."""
    s = html.escape(str(text), quote=False).replace("\r", " ").replace("\n", " ")
    s = _MD_SPECIAL.sub(r"\\\1", s)
    m = _MD_LINE_START.match(s)
    if m and (m.group(2) in ".)") == bool(m.group(1).strip()):     # "# x", "- x" or "1. x"
        s = s[:m.end(1)] + "\\" + s[m.end(1):]
    return s


def md_code(text: str, lang: str = "") -> str:
    """A fenced block whose fence is longer than any backtick run in ``text``."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{text}\n{fence}\n"


def columns(rows: Sequence[Mapping[str, Any]], fixed: Sequence[str] | None) -> list[str]:
    if fixed:
        return [str(c) for c in fixed]
    seen: list[str] = []
    for r in rows:
        for k in r:
            if k not in seen:
                seen.append(k)
    first = [c for c in ID_COLUMNS if c in seen]      # JSON keys are sorted on disk
    return first + [c for c in seen if c not in first]


class Section:
    """A block of content rendered to HTML and markdown at once (all text escaped for both)."""

    def __init__(self) -> None:
        self.html: list[str] = []
        self.md: list[str] = []

    def extend(self, other: "Section") -> None:
        self.html += other.html
        self.md += other.md

    def heading(self, text: str, level: int, anchor: str | None = None) -> None:
        ident = f' id="{html.escape(anchor)}"' if anchor else ""
        self.html.append(f"<h{level}{ident}>{html.escape(text)}</h{level}>")
        self.md.append(f"{'#' * level} {md_escape(text)}\n")

    def para(self, text: str, cls: str = "") -> None:
        c = f' class="{cls}"' if cls else ""
        self.html.append(f"<p{c}>{html.escape(text)}</p>")
        self.md.append(f"{md_escape(text)}\n")

    def bullets(self, items: Sequence[str], cls: str = "summary") -> None:
        if not items:
            return
        self.html.append(f'<ul class="{cls}">' + "".join(f"<li>{html.escape(t)}</li>" for t in items) + "</ul>")
        self.md.append("\n".join(f"- {md_escape(t)}" for t in items) + "\n")

    def pre(self, text: str, lang: str = "") -> None:
        self.html.append(f"<pre>{html.escape(text)}</pre>")
        self.md.append(md_code(text, lang))

    def figure(self, png: Path, caption: str, rel: str) -> None:
        """``png`` embedded as a data URI in HTML (no network), a relative link in markdown."""
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        cap = html.escape(caption)
        self.html.append(f'<figure><img alt="{cap}" src="data:image/png;base64,{data}"><figcaption>{cap} '
                         f'<span class="muted">({html.escape(rel)})</span></figcaption></figure>')
        self.md.append(f"![{md_escape(caption)}]({rel})\n\n_{md_escape(caption)}_\n")

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]], note: str = "") -> None:
        h = ["<table>", "<thead><tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in header)
             + "</tr></thead>", "<tbody>"]
        for r in rows:
            h.append("<tr>" + "".join(
                f"<td class=\"{'num' if isinstance(v, (int, float)) and not isinstance(v, bool) else ''}\">"
                f"{html.escape(fmt(v))}</td>" for v in r) + "</tr>")
        h.append("</tbody></table>")
        if note:
            h.append(f"<p class=\"note\">{html.escape(note)}</p>")
        self.html.append("\n".join(h))
        md = ["| " + " | ".join(md_escape(c) for c in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        md += ["| " + " | ".join(md_escape(fmt(v)) for v in r) + " |" for r in rows]
        self.md.append("\n".join(md) + "\n" + (f"\n_{md_escape(note)}_\n" if note else ""))

    def row_table(self, rows: Sequence[Any], cols: Sequence[str] | None = None) -> None:
        dict_rows = [r for r in rows if isinstance(r, Mapping)]
        if not dict_rows:
            return
        cs = columns(dict_rows, cols)
        shown = dict_rows[:MAX_TABLE_ROWS]
        note = (f"showing {len(shown)} of {len(dict_rows)} rows; the full table is in the JSON"
                if len(dict_rows) > len(shown) else "")
        self.table(cs, [[r.get(c) for c in cs] for r in shown], note)

    def kv_table(self, d: Mapping[str, Any], header: tuple[str, str] = ("metric", "value")) -> None:
        if d:
            self.table(list(header), [[k, v] for k, v in d.items()])


def render_node(sec: Section, node: Mapping[str, Any], label: str, depth: int, captions: dict[str, str]) -> bool:
    """Render the contract keys of one dict, then recurse into child dicts. True if anything."""
    found = False
    if any(k in node for k in ("headline", "table", "tables", "summary")) and label:
        sec.heading(label, 4)
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
    if depth < MAX_DEPTH:
        for k, v in node.items():
            if k not in ("headline", "table", "tables", "figures") and isinstance(v, Mapping):
                found |= render_node(sec, v, f"{label} / {k}" if label else str(k), depth + 1, captions)
    return found


def header(sec: Section, manifest: Mapping[str, Any] | None, run_dir: Path) -> None:
    """Provenance from manifest.json: run facts, pair, models, seeds, options per stage."""
    if manifest is None:
        sec.para("No manifest.json in this run directory: models and versions unknown.")
        return
    env = manifest.get("environment") or {}
    pkgs = env.get("packages") or {}
    dev = env.get("device") or {}
    facts = {"run directory": run_dir.name, "created": manifest.get("created"), "mechdiff": pkgs.get("mechdiff"),
             "torch / transformers": f"{pkgs.get('torch')} / {pkgs.get('transformers')}",
             "python / platform": f"{env.get('python')} / {env.get('platform')}",
             "device": ", ".join(dev.get("devices") or []) or None, "command": manifest.get("command")}
    resumes = manifest.get("resumes") or []
    if resumes:
        facts["stages recorded after the first"] = f"{len(resumes)}, last {resumes[-1].get('time')}"
    sec.kv_table(facts, ("run", ""))
    pair = manifest.get("pair") or {}
    if isinstance(pair, Mapping) and pair:
        sec.heading("Pair", 3)
        sec.kv_table(dict(pair), ("field", "value"))
    models = manifest.get("models") or {}
    if models:
        sec.heading("Models", 3)
        extra = sorted({k for m in models.values() if isinstance(m, Mapping) for k in m} - set(MODEL_FIELDS))
        cols = ["side", *MODEL_FIELDS, *extra]
        sec.table(cols, [[side, *[(m or {}).get(c) for c in cols[1:]]] for side, m in models.items()])
    for key in ("seeds", "options"):
        val = manifest.get(key)
        if val:
            sec.heading(key.capitalize(), 3)
            sec.kv_table(val, (key[:-1] if key.endswith("s") else key, "value"))


def page(title: str, body: Sequence[str]) -> str:
    """A self-contained HTML page (inline CSS, no scripts, no external resources)."""
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{html.escape(title)}"
            f"</title><style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def load(path: Path) -> Any:
    """JSON at ``path`` or None (missing / unreadable)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None
