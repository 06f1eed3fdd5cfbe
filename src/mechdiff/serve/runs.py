"""The run directories `mechdiff serve` was started on, and everything the pages read from them.

Every file access goes through :meth:`ServedRun.safe_path`: a path relative to one run directory,
resolved (symlinks followed) and refused unless it stays inside that directory. Nothing here writes.
"""
from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

from mechdiff.compare import comparison, run_labels
from mechdiff.errors import ConfigError, DataError
from mechdiff.report.figures import figure_data
from mechdiff.report.hooks import registered_hooks
from mechdiff.report.render import load
from mechdiff.report.summary import sentences
from mechdiff.texts.result import TextDivergence, load_texts

#: metrics files the built-in stages' report hooks open by name (with each registered hook's ``metrics``
#: and results/*.json, checked to stay inside the run before the report readers open them)
REPORT_READS = ("rq1", "cka", "patch", "behaviour", "maps", "alpha_sweep", "variants", "rq3", "rq4", "tokens")
#: stage JSON files that are not stages (never shown as a headline)
NOT_STAGES = {"manifest.json", "compare.json"}


class PathRefused(DataError):
    """A requested path is not inside the run directory it was asked of."""


def clean(x: Any) -> Any:
    """JSON-safe copy: NaN / inf -> None (the browser's JSON.parse rejects them)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    return x


class ServedRun:
    """One run directory: its label, manifest, stage headlines, figure data, texts and handles."""

    def __init__(self, path: Path, label: str):
        self.root = path.resolve()
        self.label = label
        self.manifest = load(self.root / "manifest.json") or {}
        self._texts: tuple[float, list[TextDivergence]] | None = None

    def safe_path(self, rel: str) -> Path:
        """``rel`` (a POSIX path relative to this run) resolved inside the run, else :class:`PathRefused`."""
        if not rel or "\x00" in rel or "\\" in rel or PurePosixPath(rel).is_absolute():
            raise PathRefused(f"refused path {rel!r}: give a path relative to the run directory")
        p = (self.root / rel).resolve()
        if not p.is_relative_to(self.root):
            raise PathRefused(f"refused path {rel!r}: it leaves the run directory")
        return p

    def info(self, idx: int) -> dict:
        pair = self.manifest.get("pair") or {}
        return {"id": idx, "label": self.label, "path": str(self.root), "pair": pair.get("name"),
                "domain": pair.get("domain"), "base": _spec(pair.get("base")), "tuned": _spec(pair.get("tuned")),
                "has_texts": (self.root / "tokens.json").is_file(), "has_report": self._inside(self.root / "report.html")
                and (self.root / "report.html").is_file(), "handles": [self.handle_info(h) for h in self.handles()]}

    def handle_info(self, name: str) -> dict:
        """A handle's name and what its JSON says (layer, site, k, mode, alpha) for the live form."""
        meta = load(self.handle_prefix(name).with_suffix(".json")) or {}
        return {"name": name, **{k: meta.get(k) for k in ("layer", "site", "k", "mode", "alpha")}}

    def headlines(self) -> list[dict]:
        """``[{stage, title, headline}]`` for every ``<stage>.json`` with a ``headline``, values as written."""
        out = []
        for f in sorted(self.root.glob("*.json")):
            if f.name in NOT_STAGES or not self._inside(f) or not f.is_file():     # a link leaving the run: skipped
                continue
            d = load(f)
            if isinstance(d, dict) and isinstance(d.get("headline"), dict):
                out.append({"stage": f.stem, "title": str(d.get("title") or f.stem), "headline": clean(d["headline"])})
        return out

    def checked(self) -> Path:
        """The run's root once every file the report readers open by name stays inside the run (a link
        leaving it refuses the overview; other linked JSON files are only skipped by :meth:`headlines`)."""
        names = {f"{n}.json" for n in REPORT_READS} | {m for _, h in registered_hooks() for m in h.metrics}
        names |= {f.relative_to(self.root).as_posix() for f in self.root.glob("results/*.json")}
        for n in sorted(names):
            if (self.root / n).exists() or (self.root / n).is_symlink():
                self.safe_path(n)
        return self.root

    def overview(self) -> dict:
        self.checked()
        return clean({"run": self.label, "headlines": self.headlines(), "figures": figure_data(self.root, self.label),
                      "sentences": [list(s) for s in sentences(self.root)]})

    def handles(self) -> list[str]:
        """Names of the saved RQ3 handles (``handles/<name>.json`` + ``.safetensors``)."""
        d = self.root / "handles"
        if not d.is_dir():
            return []
        return sorted(f.stem for f in d.glob("*.json")
                      if f.with_suffix(".safetensors").is_file() and self._inside(f) and self._inside(f.with_suffix(".safetensors")))

    def handle_prefix(self, name: str) -> Path:
        if name not in self.handles():
            raise PathRefused(f"no handle named {name!r} in {self.label}")
        return self.safe_path(f"handles/{name}.json").with_suffix("")

    def _inside(self, p: Path) -> bool:
        return p.resolve().is_relative_to(self.root)

    def texts(self) -> list[TextDivergence]:
        """The ``tokens`` stage's texts via :func:`load_texts` (cached until tokens.json changes)."""
        meta = self.safe_path("tokens.json")
        if not meta.is_file():
            return []
        self.safe_path("tokens/per_token.safetensors")        # refuses a symlinked tensor file leaving the run
        stamp = meta.stat().st_mtime
        if self._texts is None or self._texts[0] != stamp:
            self._texts = (stamp, load_texts(self.root))
        return self._texts[1]

    def text_list(self) -> list[dict]:
        return clean([asdict(t.summary) for t in self.texts()])

    def text(self, idx: int) -> dict:
        texts = self.texts()
        if not 0 <= idx < len(texts):
            raise DataError(f"no text {idx} in {self.label} ({len(texts)} texts)")
        t = texts[idx]
        return clean({"summary": asdict(t.summary), "rows": [asdict(r) for r in t.rows]})


def _spec(side: Any) -> str | None:
    if isinstance(side, dict):
        return str(side.get("spec") or side.get("id") or side.get("path") or side)
    return None if side is None else str(side)


class RunSet:
    """The run directories named on the command line (checked once at start)."""

    def __init__(self, run_dirs: Sequence[str | Path]):
        if not run_dirs:
            raise ConfigError("mechdiff serve needs at least one run directory")
        paths = [Path(d) for d in run_dirs]
        for p in paths:
            if not p.is_dir() or not (p / "manifest.json").is_file():
                raise ConfigError(f"{p} is not a run directory (no manifest.json); give the --out of a mechdiff run")
        self.runs = [ServedRun(p, label) for p, label in zip(paths, run_labels(paths))]

    def get(self, idx: int) -> ServedRun:
        if not 0 <= idx < len(self.runs):
            raise DataError(f"no run {idx} (serving {len(self.runs)})")
        return self.runs[idx]

    def compare(self) -> dict:
        """The runs side by side: ``mechdiff compare``'s comparison (:func:`mechdiff.compare.comparison`:
        headline rows, contrasts, verdict rows, figure data), each stage's headline keys aligned."""
        cmp = comparison([r.checked() for r in self.runs], [r.label for r in self.runs])
        labels = [r.label for r in self.runs]
        table = [{"quantity": row["quantity"], "indent": row["indent"], "values": row["cells"]} for row in cmp["rows"]]
        stages: dict[tuple[str, str], list[Any]] = {}
        for j, r in enumerate(self.runs):
            for h in r.headlines():
                for k, v in h["headline"].items():
                    stages.setdefault((h["title"], k), [None] * len(self.runs))[j] = v
        return clean({"labels": labels, "table": table,
                      "headlines": [{"stage": s, "key": k, "values": v} for (s, k), v in stages.items()],
                      "contrasts": cmp["contrasts"], "verdicts": cmp["verdict"]["rows"] if cmp["verdict"] else [],
                      "figures": [r["figures"] for r in cmp["runs"]]})
