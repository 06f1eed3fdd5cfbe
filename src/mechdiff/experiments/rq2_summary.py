"""RQ2 summary (plan 003, section 5): the alpha-sweep table, best row per (layer, site), the winner,
side-effect and control lines, the stop conditions; alpha_sweep.json, rq2_summary.txt, figures."""
from __future__ import annotations

from mechdiff.artifacts import RunDir
from mechdiff.atomic import atomic_write_text
from mechdiff.plots import plot_drop_heatmap, plot_map_quality
from mechdiff.report import write_report

THRESHOLDS = {"drop_pct": 30.0, "refusal_pp": 1.0, "mc_dlogp": 0.1}


MIN_RAW_KL = 1e-4  # below this the raw patch changes nothing: a drop % is undefined


def _drop(raw, mapped):
    return None if raw is None or raw < MIN_RAW_KL else 100.0 * (raw - mapped) / raw


def sweep_table(variants: dict) -> dict:
    """Rows (layer, site, alpha, KL_raw, KL_mapped, delta, drop %), best per (layer, site), winner,
    control rows, from variants.json."""
    v = variants["variants"]
    raw = {(x["layer"], x["site"]): x["kl_mean"] for x in v if x["kind"] == "raw"}
    rows, controls = [], []
    for x in v:
        if x["kind"] == "raw":
            continue
        r = raw.get((x["layer"], x["site"]))
        row = {"layer": x["layer"], "site": x["site"], "alpha": x["alpha"], "alpha_value": x["alpha_value"],
               "kl_raw": r, "kl_mapped": x["kl_mean"], "delta": None if r is None else r - x["kl_mean"],
               "drop_pct": _drop(r, x["kl_mean"]), "kl_mapped_unmasked": x["kl_unmasked_mean"]}
        if x["kind"] == "mapped":
            rows.append(row)
        else:
            controls.append({**row, "control": x["kind"], "map_layer": x["map_layer"]})
    best = {}
    for r in rows:
        k = (r["layer"], r["site"])
        if k not in best or r["kl_mapped"] < best[k]["kl_mapped"]:
            best[k] = r
    best_rows = sorted(best.values(), key=lambda r: (r["layer"], r["site"]))
    winner = max(best_rows, key=lambda r: (r["drop_pct"] if r["drop_pct"] is not None else -r["kl_mapped"]),
                 default=None)
    return {"rows": rows, "best": best_rows, "winner": winner, "controls": controls}


def stop_conditions(t: dict, side: list[dict] | None) -> dict:
    """The plan's stop conditions: a large drop, small side effects, controls not comparable."""
    w = t["winner"]
    drop = w["drop_pct"] if w else None
    big = drop is not None and drop >= THRESHOLDS["drop_pct"]
    se = None
    if side and w:
        s = next((r for r in side if r["layer"] == w["layer"] and r["site"] == w["site"]), None)
        if s:
            se = (abs(s["d_refusal_pp_unmasked"]) <= THRESHOLDS["refusal_pp"]
                  and abs(s["d_mc_dlogp_unmasked"]) <= THRESHOLDS["mc_dlogp"])
    # A bogus or shuffled map must not give a comparable drop (half the winner's or more). Where the
    # raw patch changes nothing (drop undefined) the control cannot reduce anything.
    ctrl = [c["drop_pct"] for c in t["controls"] if c["control"] in ("bogus", "shuffle")]
    ctrl_ok = None if drop is None or not ctrl else all(d is None or d < 0.5 * drop for d in ctrl)
    return {"large_drop": big, "side_effects_small": se, "controls_not_comparable": ctrl_ok,
            "met": bool(big and se is not False and ctrl_ok is not False), "thresholds": THRESHOLDS}


def _fmt(x, spec="7.3f"):
    return " " * 7 if x is None else format(x, spec)


def _drop_text(x, spec=".1f") -> str:
    """A drop % or, where the raw KL is 0 (nothing to drop), a word instead of a blank."""
    return "n/a: no gap" if x is None else format(x, spec) + "%"


def summary_text(t: dict, side: list[dict] | None, stop: dict, meta: dict) -> str:
    """The one summary TXT of the plan (section 5)."""
    L = [f"RQ2 — alpha sweep summary (val, n={meta['n_val']}, solver={meta['solver']}, "
         f"measure={meta['measure']})", "",
         "layer site        alpha   KL_raw   KL_mapped   delta    drop%"]
    for r in t["rows"]:
        L.append(f"{r['layer']:>5} {r['site']:<11} {str(r['alpha']):>5} {_fmt(r['kl_raw'])}  "
                 f"{_fmt(r['kl_mapped'], '9.3f')}  {_fmt(r['delta'])}  {_drop_text(r['drop_pct'], '6.1f')}")
    L += ["", "best per (layer, site):"]
    for r in t["best"]:
        L.append(f"  L{r['layer']} {r['site']}: alpha={r['alpha']} ({r['alpha_value']:.3f}) "
                 f"KL {_fmt(r['kl_raw'], '.3f')} -> {r['kl_mapped']:.3f} (drop {_drop_text(r['drop_pct'])})")
    w = t["winner"]
    if w:
        L.append(f"winner: L{w['layer']} {w['site']} alpha={w['alpha']} drop {_drop_text(w['drop_pct'])}")
    for s in side or []:
        n = lambda k, spec: "n/a" if s.get(k) is None else format(s[k], spec)  # noqa: E731  (undefined: null)
        L.append(f"side effects L{s['layer']} {s['site']} alpha={s['alpha']}: "
                 f"d refusal {n('d_refusal_pp_unmasked', '+.1f')} pp (masked {n('d_refusal_pp_masked', '+.1f')}), "
                 f"d mc_dlogp {n('d_mc_dlogp_unmasked', '+.3f')} (masked {n('d_mc_dlogp_masked', '+.3f')})")
    for c in t["controls"]:
        L.append(f"control {c['control']}: map L{c['map_layer']} at L{c['layer']} {c['site']}: "
                 f"KL {_fmt(c['kl_raw'], '.3f')} -> {c['kl_mapped']:.3f} (drop {_drop_text(c['drop_pct'])})")
    L.append(f"stop conditions met: {stop['met']} (large drop: {stop['large_drop']}, side effects small: "
             f"{stop['side_effects_small']}, controls not comparable: {stop['controls_not_comparable']})")
    return "\n".join(L) + "\n"


def write_maps_figures(run: RunDir) -> None:
    maps = run.read_json("maps.json")
    plot_map_quality([{"label": f"L{r['layer']} {r['site']} {r['solver']}", "r2_vw": r["val_r2_vw"],
                       "cka": r["val_cka"]} for r in maps["table"]], run.figure("map_quality.png"),
                     title="transport maps on val: R2 (variance-weighted) and debiased CKA(mapped, tuned)")


def summarise_rq2(run: RunDir, opts) -> dict:
    variants = run.read_json("variants.json")
    t = sweep_table(variants)
    side = run.read_json("side_effects.json")["table"] if run.exists("side_effects.json") else None
    stop = stop_conditions(t, side)
    meta = {"n_val": variants["n_val"], "solver": variants["solver"], "measure": variants["measure"]}
    text = summary_text(t, side, stop, meta)
    atomic_write_text(run.file("rq2_summary.txt"), text)
    write_maps_figures(run)
    if any(r["drop_pct"] is not None for r in t["rows"]):
        plot_drop_heatmap(t["rows"], run.figure("drop_heatmap.png"), title="KL drop % (mapped vs raw), val")
    w = t["winner"]
    out = {"title": "RQ2 — mapped patching and alpha-sweep", "summary": text, "table": t["rows"],
           "tables": {"best per (layer, site)": t["best"], "controls": t["controls"]},
           "winner": w, "controls": t["controls"], "side_effects": side, "stop_conditions": stop,
           "headline": {"winner": None if not w else f"L{w['layer']} {w['site']} alpha={w['alpha']}",
                        "KL_raw -> KL_mapped": None if not w else
                        f"{_fmt(w['kl_raw'], '.3f')} -> {w['kl_mapped']:.3f}",
                        "drop %": None if not w else w["drop_pct"], "stop conditions met": stop["met"], **meta}}
    run.write_json("alpha_sweep.json", out)
    write_report(run.path)
    return out
