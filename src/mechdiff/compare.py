"""Two or more runs side by side (e.g. a cultural and a cognitive fine-tune of one base: the seeds'
question): Figures A-D with the runs overlaid, one table of headline numbers, and each run's
executive summary, from the runs' artifacts alone -> compare.html (self-contained), compare.md,
compare.json and figures/compare_*.png in ``out``.

    from mechdiff.compare import compare_runs
    compare_runs(["runs/cultural", "runs/cognitive"], out="runs/compare")
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from mechdiff import experiments  # noqa: F401  (registers the stages and their report hooks)
from mechdiff.artifacts import RunDir, new_run_dir
from mechdiff.atomic import atomic_write_text
from mechdiff.checks import check_distinct_runs, check_out_dir, check_run_dir
from mechdiff.errors import ConfigError
from mechdiff.report.figures import draw, figure_data
from mechdiff.report.hooks import figures as report_figures
from mechdiff.report.render import Section, load, page
from mechdiff.report.summary import numbers, sentences
from mechdiff.verdict import Estimate, difference, run_estimates, verdict_for

#: (row label, key in report.summary.numbers, format); indented rows are the uncertainty or control
ROWS = (("divergence enters at layer", "entry layer", "{}"), ("  patch KL there", "entry KL", "{:.3g}"),
        ("  its SE (topic groups)", "entry KL SE", "{:.2g}"), ("  self-patch floor", "patch floor", "{:.3g}"),
        ("layers chosen by RQ1", "chosen layers", "{}"),
        ("max patch KL (nats)", "max patch KL", "{:.3g}"), ("  its SE (topic groups)", "max patch KL SE", "{:.2g}"),
        ("  at layer", "max patch KL layer", "{}"), ("min debiased CKA", "min debiased CKA", "{:.3f}"),
        ("  at layer", "min CKA layer", "{}"), ("best map R2 (val)", "best map R2", "{:.3f}"),
        ("  identity map R2 there", "identity map R2", "{:.3f}"), ("  map", "best map", "{}"),
        ("mapped-patch drop %", "mapped drop %", "{:.1f}"), ("  raw patch KL (val)", "raw patch KL (val)", "{:.3g}"),
        ("  readout", "drop readout", "{}"),
        ("minimal k (RQ3)", "minimal k", "{}"), ("  RQ3 status", "rq3 status", "{}"),
        ("changed heads (share)", "changed heads share", "{:.1%}"), ("  noise floor (readout units)", "head noise floor", "{:.2g}"),
        ("importance churn", "importance churn", "{:.1%}"), ("  top-k Jaccard", "top-k Jaccard", "{:.2f}"))

#: the quantities the seeds compare across pairs, each with the number that qualifies it
CONTRASTS = (("changed heads share", "share of changed heads (readout moves above the noise floor)", "{:.1%}",
              "head noise floor", "noise floor {:.2g}"),
             ("importance churn", "importance churn", "{:.1%}", "top-k Jaccard", "top-k Jaccard {:.2f}"),
             ("minimal k", "minimal k of the rank-k handle", "{}", "rq3 status", "{}"),
             ("best map R2", "best map R2 (val)", "{:.3f}", "identity map R2", "identity map {:.3f}"),
             ("mapped drop %", "mapped-patch drop %", "{:.1f}", "raw patch KL (val)", "raw KL {:.3g}"),
             ("entry layer", "divergence entry layer", "{}", "entry KL SE", "KL SE {:.2g}"))


def intervals(run_dir: Path) -> dict[str, Estimate]:
    """The headline numbers of one run that carry an interval (cluster bootstrap over topic groups):
    ``{quantity: Estimate}``, read from rq3.json / rq4.json."""
    out: dict[str, Estimate] = {}

    def put(name, iv, value=None):
        if iv and iv.get("ci_low") is not None and iv.get("ci_high") is not None:
            v = iv.get("estimate") if value is None else value
            if v is not None:
                out[name] = Estimate(float(v), float(iv["ci_low"]), float(iv["ci_high"]), iv.get("method", ""))
    rq3, rq4 = load(run_dir / "rq3.json") or {}, load(run_dir / "rq4.json") or {}
    resp = load(run_dir / "response.json") or {}
    for r in resp.get("rq2") or []:
        put(f"response: RQ2 drop % ({r['responder']} responses)", r.get("drop_pct"))
    for r in resp.get("rq3") or []:
        put(f"response: RQ3 {r['mode']} share of the gap closed ({r['responder']} responses)", r.get("share"))
    for mode, h in ((rq3.get("result") or {}).get("by_mode") or {}).items():
        est = h.get("estimates") or {}
        put(f"RQ3 {mode}: test share of the gap closed", est.get("test_share"))
        put(f"RQ3 {mode}: minimal k", est.get("minimal_k"))
        put(f"RQ3 {mode}: saturation k", est.get("saturation_k"))
    for layer, r in ((rq3.get("result") or {}).get("rank") or {}).items():
        put(f"RQ3 rank of the difference at L{layer}", r)
    for m, c in (rq4.get("churn") or {}).items():
        put(f"RQ4 changed heads ({m})", c.get("share_interval"))
        for key, iv in (c.get("intervals") or {}).items():
            put(f"RQ4 {key} ({m})", iv)
    return out


def differences(runs: list[dict]) -> list[dict]:
    """The first run minus each other run, per quantity both carry with an interval: the difference,
    its interval (:func:`mechdiff.verdict.difference`) and "not resolved" where it covers 0."""
    rows = []
    a = runs[0]
    for b in runs[1:]:
        for key in sorted(set(a["intervals"]) & set(b["intervals"])):
            d = difference(a["intervals"][key], b["intervals"][key])
            resolved = d.has_interval and (d.lo > 0 or d.hi < 0)
            rows.append({"quantity": key, "a": a["label"], "b": b["label"], "difference": d.value, "ci_low": d.lo,
                         "ci_high": d.hi, "verdict": (f"{a['label']} higher" if d.value > 0 else f"{b['label']} higher")
                         if resolved else "not resolved"})
    return rows


def cell(v: Any, spec: str) -> str:
    """A headline number as the comparison shows it (``spec`` of :data:`ROWS`; None: ``n/a``)."""
    if v is None:
        return "n/a"
    try:
        return spec.format(v)
    except (TypeError, ValueError):
        return str(v)


def run_labels(run_dirs: Sequence[Path]) -> list[str]:
    """One label per run: its pair's name, or ``name (dir)`` where two runs share a pair."""
    used: set[str] = set()
    out = []
    for d in run_dirs:
        pair = ((load(d / "manifest.json") or {}).get("pair") or {}).get("name") or d.name
        label = pair if pair not in used else f"{pair} ({d.name})"
        used.add(label)
        out.append(label)
    return out


def comparison(run_dirs: Sequence[Path], labels: Sequence[str]) -> dict:
    """The runs side by side, from their artifacts alone: what ``mechdiff compare`` writes and
    ``mechdiff serve`` shows. ``runs``: one record per run (label, path, pair, domain, headline
    ``numbers``, executive-summary ``sentences``, ``figures`` data, ``intervals``, verdict
    ``estimates``); ``rows``: one per :data:`ROWS` line (``quantity``, ``indent``, raw ``values`` and
    formatted ``cells``, one per run); ``contrasts``, ``differences``, ``verdict`` (None unless one
    cultural and one cognitive run)."""
    runs = []
    for d, label in zip(run_dirs, labels):
        pair = (load(d / "manifest.json") or {}).get("pair") or {}
        r = {"label": label, "path": str(Path(d).resolve()), "pair": pair.get("name"), "domain": pair.get("domain"),
             "numbers": numbers(d), "sentences": sentences(d), "figures": figure_data(d, label),
             "intervals": intervals(d)}
        r["estimates"] = run_estimates(r["intervals"], load(d / "rq3.json") or {}, r["numbers"],
                                       load(d / "maps.json"), load(d / "rq1.json"), load(d / "response.json"))
        runs.append(r)
    rows = [{"quantity": name.strip(), "indent": name.startswith(" "),
             "values": [r["numbers"].get(key) for r in runs],
             "cells": [cell(r["numbers"].get(key), spec) for r in runs]} for name, key, spec in ROWS]
    return {"runs": runs, "rows": rows, "contrasts": _contrasts(runs) if len(runs) > 1 else [],
            "differences": differences(runs), "verdict": verdict_for(runs)}


def compare_runs(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike | None = None,
                 labels: Sequence[str] | None = None) -> Path:
    """Write the comparison of ``run_dirs`` into ``out`` (default: a new runs/compare-* directory) and
    return ``out``."""
    dirs = [Path(d) for d in run_dirs]
    if len(dirs) < 2:
        raise ConfigError("compare needs two or more run directories")
    for d in dirs:
        check_run_dir(d)
    check_distinct_runs(dirs)
    check_out_dir(out)
    if labels is not None and len(labels) != len(dirs):
        raise ConfigError(f"{len(labels)} labels for {len(dirs)} runs")
    out_dir = Path(out) if out is not None else new_run_dir("runs", "compare")
    run = RunDir(out_dir)
    cmp = comparison(dirs, list(labels) if labels else run_labels(dirs))
    runs, contrasts, diffs, verdict = cmp["runs"], cmp["contrasts"], cmp["differences"], cmp["verdict"]
    figures, notes = {}, []
    for key, title in ((f.key, f.title or f.key) for f in report_figures()):
        data = [r["figures"][key] for r in runs if r["figures"].get(key) is not None]
        if data:
            try:
                path = draw(key, data, run.figure(f"compare_{key.lower()}.png"))
            except Exception as e:      # one figure failing leaves the table and the other figures
                notes.append(f"Figure {key} could not be drawn: {type(e).__name__}: {e}")
                continue
            figures[key] = (path, f"Figure {key} overlaid ({title}): " + ", ".join(r["label"] for r in data))
    table = [{"quantity": row["quantity"], **{r["label"]: v for r, v in zip(runs, row["values"])}}
             for row in cmp["rows"]]
    run.write_json("compare.json", {"title": "mechdiff comparison", "runs": [
        {k: v for k, v in r.items() if k not in ("figures", "intervals", "estimates")} for r in runs], "table": table,
        "contrasts": contrasts, "differences": diffs, "verdict": verdict,
        "figures": {f"compare_{k.lower()}.png": cap for k, (_, cap) in figures.items()}})
    sec = Section()
    sec.heading("mechdiff comparison — " + " vs ".join(r["label"] for r in runs), 1)
    sec.para("Runs: " + "; ".join(f"{r['label']} ({r['domain'] or 'general'}): {r['path']}" for r in runs))
    sec.heading("Headline numbers", 2, "table")
    sec.table(["quantity", *[r["label"] for r in runs]],
              [[("  " if row["indent"] else "") + row["quantity"], *row["cells"]] for row in cmp["rows"]])
    if verdict:
        _verdict_section(sec, verdict)
    if contrasts:
        sec.heading("Contrasts", 2, "contrasts")
        sec.bullets(contrasts)
    if diffs:
        sec.heading("Differences with 95% intervals", 2, "differences")
        sec.table(["quantity", "runs", "difference", "interval", "verdict"],
                  [[r["quantity"], f"{r['a']} - {r['b']}", f"{r['difference']:.3g}", "n/a" if r["ci_low"] is None
                    else f"[{r['ci_low']:.3g}, {r['ci_high']:.3g}]", r["verdict"]] for r in diffs])
    for key, (path, cap) in figures.items():
        sec.heading(f"Figure {key}", 2, f"figure-{key.lower()}")
        sec.figure(path, cap, path.relative_to(out_dir).as_posix())
    for note in notes:
        sec.para(note, "note")
    for r in runs:
        sec.heading(f"Executive summary: {r['label']}", 2)
        sec.bullets([f"{t}: {s}" for t, s in r["sentences"]] or ["no stage has finished in this run"])
        sec.para(f"Full report: {Path(r['path']) / 'report.html'}", "note")
    atomic_write_text(out_dir / "compare.html", page("mechdiff comparison", sec.html))
    atomic_write_text(out_dir / "compare.md", "\n".join(sec.md))
    return out_dir


def _verdict_section(sec, verdict: dict) -> None:
    """The verdict table: one row per criterion, both runs' estimates with intervals, the difference."""
    def iv(e: dict) -> str:
        if e["value"] is None:
            return "n/a" + (f" ({e['note']})" if e["note"] else "")
        txt = f"{e['value']:.3g}"
        txt += (f" [{e['lo']:.3g}, {e['hi']:.3g}]" if e["lo"] is not None and e["hi"] is not None
                else f" ({e['note'] or 'no interval'})")
        readout = (e["note"] or "").split(":")[0]           # the response stage's rows name their readout
        return txt + (f" ({readout})" if readout.startswith("response,") and readout not in txt else "")
    sec.heading("Verdict: is the cultural fine-tune a low-rank knob and the cognitive one distributed rewiring?",
                2, "verdict")
    sec.para(verdict["summary"])
    sec.table(["criterion", "predicted", f"cultural: {verdict['cultural']}", f"cognitive: {verdict['cognitive']}",
               "difference (cultural - cognitive)", "verdict"],
              [[r["criterion"], r["predicted"], iv(r["cultural"]), iv(r["cognitive"]), iv(r["difference"]),
                r["verdict"]] for r in verdict["rows"]])


def _contrasts(runs: list[dict]) -> list[str]:
    """One line per quantity the seeds compare (measured in at least two runs): each run's value with the
    number that qualifies it (its control, floor or SE), no verdict beyond the numbers."""
    out = []
    for key, what, spec, qual, qspec in CONTRASTS:
        vals = [(r["label"], r["numbers"].get(key), r["numbers"].get(qual)) for r in runs]
        if sum(v is not None for _, v, _ in vals) < 2 and not (key == "minimal k" and
                                                                 any(q for _, _, q in vals)):
            continue
        parts = [f"{lab} {cell(v, spec)}" + (f" ({cell(q, qspec)})" if q is not None else "") for lab, v, q in vals]
        out.append(f"{what}: " + "; ".join(parts) + ".")
    return out
