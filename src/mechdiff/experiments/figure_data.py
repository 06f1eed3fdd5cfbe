"""The data of Figures A-D of the study report (one function per figure, from the run's JSON files)
and the figure hooks the built-in stages register: A (rq1), B (mapped-patch), C (steer), D (heads).
Drawn by :mod:`mechdiff.report.figures` (``plots.plot_fig_a`` .. ``_d``), overlaid by ``compare``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mechdiff import plots
from mechdiff.experiments.summaries import best_map, churn_numbers, importance_measure
from mechdiff.report.hooks import Figure
from mechdiff.report.render import load

CAPTIONS = {
    "A": "Figure A — where the models diverge: 1 - debiased CKA per layer on a log axis (95% jackknife CI band; "
         "grey: the row-shuffled independence null, i.e. CKA of unrelated states, a fresh permutation seed per layer) and cross-model patch KL per layer (mean of both directions ± SE over topic groups; chosen layers "
         "dark, control grey, entry layer dashed, self-patch floor dotted).",
    "B": "Figure B — transport maps: held-out R² and CKA(mapped, tuned) beside the identity map and a "
         "shuffled-target map; patch KL of the raw vs the mapped base state (best alpha) and the control maps.",
    "C": "Figure C — rank-k handle: share of the base-tuned gap closed vs k on held-out prompts (random bases "
         "dashed), the neutral-perplexity side effect with its allowed band, and the head-importance histogram.",
    "D": "Figure D — head churn per measurement and the cumulative effect of the top-k heads (± 1 sd).",
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
    cum = {k: {"k": list(range(1, len(v.get("mean") or []) + 1)), "mean": v.get("mean"), "sd": v.get("sd")}
           for k, v in (rq4.get("cumulative") or {}).items() if isinstance(v, dict)}
    churn = churn_numbers(rq4)
    return {"churn": churn, "cumulative": cum, "unit": rq4.get("unit")} if churn or cum else None


def _json(run_dir: Path, *names: str) -> list:
    return [load(Path(run_dir) / f"{n}.json") for n in names]


FIG_A = Figure("A", CAPTIONS["A"], lambda d: fig_a_data(*_json(d, "rq1", "cka")), plots.plot_fig_a,
               "CKA and patch KL per layer")
FIG_B = Figure("B", CAPTIONS["B"], lambda d: fig_b_data(*_json(d, "maps", "alpha_sweep", "variants")),
               plots.plot_fig_b, "map quality and mapped vs raw patch")
FIG_C = Figure("C", CAPTIONS["C"], lambda d: fig_c_data(*_json(d, "rq3", "rq4")), plots.plot_fig_c,
               "effect vs k and head importance")
FIG_D = Figure("D", CAPTIONS["D"], lambda d: fig_d_data(_json(d, "rq4")[0]), plots.plot_fig_d,
               "churn and the top-k curve")
