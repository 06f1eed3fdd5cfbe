"""Figures A-D of the study report, drawn from the run's JSON files (``plots.plot_fig_a`` .. ``_d``).

``figure_data(run_dir)`` reads one run into the per-run dicts those functions take (the comparison
overlays several); ``write_figures(run_dir)`` draws the ones whose stage ran into
``figures/report/`` and returns ``[(key, path, caption)]``. A figure is redrawn only when its data
changed (a digest beside it), so rewriting the report after every stage stays cheap.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from mechdiff.report.render import load
from mechdiff.report.summary import best_map, importance_measure

CAPTIONS = {
    "A": "Figure A — where the models diverge: 1 - debiased CKA per layer on a log axis (95% jackknife CI band; "
         "grey: the row-shuffled independence null, i.e. CKA of unrelated states, a fresh permutation seed per layer) and cross-model patch KL per layer (mean of both directions ± SE over topic groups; chosen layers "
         "dark, control grey, entry layer dashed, self-patch floor dotted).",
    "B": "Figure B — transport maps: held-out R² and CKA(mapped, tuned) beside the identity map and a "
         "shuffled-target map; patch KL of the raw vs the mapped base state (best alpha) and the control maps.",
    "C": "Figure C — rank-k handle: share of the base-tuned gap closed vs k on held-out prompts (random bases "
         "dashed), the neutral-perplexity side effect with its allowed band, and the head-importance histogram.",
    "D": "Figure D — head churn per measurement and the cumulative effect of the top-k heads (± 1 sd).",
    "E": "Figure E — per-token KL(base || tuned) over the shared vocabulary along each model's own greedy "
         "response, teacher-forced in both (mean over prompts, 95% band from the topic-cluster SE).",
}


def _finite(x: Any) -> Any:
    return x if x is None or not isinstance(x, float) or math.isfinite(x) else None


def fig_a_data(rq1: dict | None, cka: dict | None) -> dict | None:
    if not rq1:
        return None
    cka = cka or rq1.get("cka") or {}
    rows = cka.get("per_layer") or []
    layers = rq1.get("layers") or {}
    ev = layers.get("evidence") or {}
    per = ev.get("per_layer") or []
    if not rows and not per:
        return None
    col = lambda rs, k: [_finite(r.get(k)) for r in rs]  # noqa: E731
    return {"cka": {"layers": col(rows, "layer"), "debiased": col(rows, "debiased"), "ci_low": col(rows, "ci_low"),
                    "ci_high": col(rows, "ci_high"), "null_mean": col(rows, "null_mean"),
                    "null_sd": col(rows, "null_sd"), "biased": col(rows, "biased")} if rows else None,
            "patch": {"layers": col(per, "layer"), "mean": col(per, "mean"), "se": col(per, "se"),
                      "floor": ev.get("floor")} if per else None,
            "chosen": layers.get("chosen") or [], "control": layers.get("control"), "entry": layers.get("entry"),
            "planted": rq1.get("planted_layers")}


def _se(v: dict | None, n: int) -> float | None:
    return None if not v or v.get("kl_std") is None or n < 2 else v["kl_std"] / math.sqrt(n)


def fig_b_data(maps: dict | None, sweep: dict | None, variants: dict | None) -> dict | None:
    if not maps and not sweep:
        return None
    rows = [r for r in (maps or {}).get("table") or []]
    best = best_map(maps)
    shown = [r for r in rows if not r.get("control_layer")] + [r for r in rows if r.get("control_layer")][:1]
    out_maps = [{"label": f"L{r['layer']} {r['site']} {r['solver']}" + (" (control)" if r.get("control_layer") else ""),
                 "r2": _finite(r.get("val_r2_vw")), "cka": _finite(r.get("val_cka")),
                 "identity_r2": _finite(r.get("identity_val_r2_vw")), "shuffle_r2": _finite(r.get("shuffle_val_r2_vw"))}
                for r in shown][:12]
    patch = []
    n = (variants or {}).get("n_test", (variants or {}).get("n_val")) or 0     # kl_std: over the test prompts
    var = (variants or {}).get("variants") or []
    find = lambda **kw: next((v for v in var if all(str(v.get(k)) == str(x) for k, x in kw.items())), None)  # noqa: E731
    for r in (sweep or {}).get("tables", {}).get("best per (layer, site)") or []:
        sol = {"solver": r["solver"]} if r.get("solver") else {}
        patch.append({"label": f"{r.get('solver', '')} L{r['layer']} {r['site']} a={r['alpha']}".strip(),
                      "raw": _finite(r.get("kl_raw")),
                      "raw_se": _se(find(layer=r["layer"], site=r["site"], kind="raw"), n),
                      "mapped": _finite(r.get("kl_mapped")),
                      "mapped_se": _se(find(layer=r["layer"], site=r["site"], kind="mapped", alpha=r["alpha"], **sol), n)})
    for c in (sweep or {}).get("controls") or []:
        patch.append({"label": f"{c['control']}: map L{c['map_layer']} at L{c['layer']} {c['site']}", "raw": None,
                      "mapped": _finite(c.get("kl_mapped")),
                      "mapped_se": _se(find(layer=c["layer"], site=c["site"], kind=c["control"],
                                            **{k: c[k] for k in ("map_layer", "solver") if c.get(k) is not None}), n)})
    return {"maps": out_maps, "patch": patch[:14], "best": best} if out_maps or patch else None


def _curve(chosen: list[dict], **key) -> dict:
    rows = sorted((r for r in chosen if all(r.get(k) == v for k, v in key.items())), key=lambda r: r["k"])
    return {"k": [r["k"] for r in rows], "share": [_finite(r.get("test_share")) for r in rows],
            "side": [_finite(r.get("ppl_change_pct_unmasked")) for r in rows]}


def fig_c_data(rq3: dict | None, rq4: dict | None) -> dict | None:
    if not rq3 and not rq4:
        return None
    curves = {}
    chosen = (rq3 or {}).get("chosen") or []
    for mode, h in (((rq3 or {}).get("result") or {}).get("by_mode") or {}).items():
        curves[f"{mode} ({h.get('kind')}, L{h.get('layer')})"] = _curve(chosen, layer=h.get("layer"),
                                                                          basis_layer=h.get("layer"), kind=h.get("kind"),
                                                                          fit_lang=None, mode=mode)
        curves[f"{mode} random basis"] = _curve(chosen, layer=h.get("layer"), basis_layer=h.get("layer"),
                                                kind="random", fit_lang=None, mode=mode)
    opts = (rq3 or {}).get("options") or {}
    heads = None
    if rq4 and rq4.get("heads"):
        imp = importance_measure(rq4)
        if imp:
            heads = {s: [_finite(r.get(f"{imp}_{s}")) for r in rq4["heads"]] for s in ("base", "tuned")}
            heads["xlabel"] = f"{'attribution' if imp == 'attribution' else imp + '-ablation effect'} ({rq4.get('unit', '')})"
    curves = {k: v for k, v in curves.items() if v["k"]}
    if not curves and not heads:
        return None
    return {"curves": curves, "threshold": opts.get("gap_threshold"), "max_side": opts.get("max_ppl_pct"),
            "heads": heads}


def fig_d_data(rq4: dict | None) -> dict | None:
    if not rq4:
        return None
    from mechdiff.report.summary import churn_numbers
    cum = {k: {"k": list(range(1, len(v.get("mean") or []) + 1)), "mean": v.get("mean"), "sd": v.get("sd")}
           for k, v in (rq4.get("cumulative") or {}).items() if isinstance(v, dict)}
    churn = churn_numbers(rq4)
    return {"churn": churn, "cumulative": cum, "unit": rq4.get("unit")} if churn or cum else None


def fig_e_data(tokens: dict | None) -> dict | None:
    curves = (tokens or {}).get("curve") if isinstance(tokens, dict) else None
    if not isinstance(curves, dict) or not any(isinstance(c, dict) and c.get("pos") for c in curves.values()):
        return None
    return {"curves": curves}


def figure_data(run_dir: Path, label: str | None = None) -> dict[str, dict | None]:
    """``{"A": .., "B": .., "C": .., "D": ..}``: one run's data for each figure (None: its stage did not run)."""
    run_dir = Path(run_dir)
    d = {n: load(run_dir / f"{n}.json") for n in ("rq1", "cka", "maps", "alpha_sweep", "variants", "rq3", "rq4",
                                                  "tokens")}
    out = {"A": fig_a_data(d["rq1"], d["cka"]), "B": fig_b_data(d["maps"], d["alpha_sweep"], d["variants"]),
           "C": fig_c_data(d["rq3"], d["rq4"]), "D": fig_d_data(d["rq4"]), "E": fig_e_data(d["tokens"])}
    for v in out.values():
        if v is not None:      # "$" would start matplotlib mathtext: a pair name is shown as written
            v["label"] = (label or run_dir.name).replace("$", r"\$")
    return out


def draw(key: str, runs: list[dict], path: Path) -> Path:
    """Draw figure ``key`` (A-D) for ``runs`` at ``path`` unless the same data is drawn there already."""
    import inspect

    from mechdiff import plots
    fn = {"A": plots.plot_fig_a, "B": plots.plot_fig_b, "C": plots.plot_fig_c, "D": plots.plot_fig_d,
          "E": plots.plot_tokens_curve}[key]
    digest = hashlib.sha256((json.dumps(runs, sort_keys=True, default=str) + inspect.getsource(fn)).encode()).hexdigest()
    stamp = path.with_suffix(".sha256")
    if path.is_file() and stamp.is_file() and stamp.read_text().strip() == digest:
        return path
    fn([{k: v for k, v in r.items() if k != "best"} for r in runs], path)
    from mechdiff.atomic import atomic_write_text
    atomic_write_text(stamp, digest + "\n")
    return path


def write_figures(run_dir: Path) -> list[tuple[str, Path | None, str]]:
    """Figures A-E of one run under figures/report/: ``[(key, path or None, caption or the reason)]``
    (E, the tokens stage's curve, only when that stage ran)."""
    run_dir = Path(run_dir)
    data = figure_data(run_dir)
    out = []
    for key in "ABCDE":
        if data[key] is None and key == "E":
            continue
        if data[key] is None:
            out.append((key, None, f"Figure {key}: its stage has not run in this directory."))
            continue
        try:
            path = draw(key, [data[key]], run_dir / "figures" / "report" / f"fig_{key.lower()}.png")
            out.append((key, path, CAPTIONS[key]))
        except Exception as e:      # a figure must never break a stage's report
            out.append((key, None, f"Figure {key} could not be drawn: {type(e).__name__}: {e}"))
    return out
