"""RQ2 summary (plan 003, section 5): the alpha-sweep table, best row per (layer, site), the winner,
side-effect and control lines, the stop conditions; alpha_sweep.json, rq2_summary.txt, figures."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from mechdiff.analyses import intervals as I
from mechdiff.artifacts import RunDir
from mechdiff.errors import DataError
from mechdiff.atomic import atomic_write_text
from mechdiff.experiments.results import MappedPatchResult, SweepControl, SweepWinner
from mechdiff.plots import plot_drop_heatmap, plot_map_quality
from mechdiff.report.render import load

THRESHOLDS = {"drop_pct": 30.0, "refusal_pp": 1.0, "mc_dlogp": 0.1}


MIN_RAW_KL = 1e-4  # below this the raw patch changes nothing: a drop % is undefined
WINNER_GAP_SHARE = 0.1  # the winner's raw patch KL is at least this share of the largest one
NO_TRANSFER = "no map transfers the change"  # the answer where no dev drop is > 0 (no winner)


def _drop(raw, mapped):
    return None if raw is None or raw < MIN_RAW_KL else 100.0 * (raw - mapped) / raw


def _dev(r: dict) -> dict:
    """The row's dev numbers under the test keys (for :func:`_drop_text`)."""
    return {**r, "drop_pct": r["dev_drop_pct"], "kl_raw": r["dev_kl_raw"]}


def _split_means(variants: dict) -> tuple[list, list]:
    """Per variant: (dev mean KL, test mean KL). Files without a dev/test split (no ``n_dev``): both
    are the mean over all val prompts."""
    v = variants["variants"]
    if "n_dev" not in variants:
        return [x["kl_mean"] for x in v], [x["kl_mean"] for x in v]
    return [x["kl_dev_mean"] for x in v], [x["kl_mean"] for x in v]


def sweep_table(variants: dict) -> dict:
    """Rows (solver, layer, site, alpha, KL_raw, KL_mapped, delta, drop %) on the test prompts with the
    dev numbers beside (``dev_kl_raw``, ``dev_kl_mapped``, ``dev_drop_pct``); the best alpha per
    (solver, layer, site) and the winner are chosen on dev; control rows; from variants.json."""
    v = variants["variants"]
    dev, test = _split_means(variants)
    raw = {(x["layer"], x["site"]): (dev[i], test[i]) for i, x in enumerate(v) if x["kind"] == "raw"}
    rows, controls = [], []
    for i, x in enumerate(v):
        if x["kind"] == "raw":
            continue
        rd, rt = raw.get((x["layer"], x["site"]), (None, None))
        row = {"solver": x.get("solver", variants.get("solver")), "layer": x["layer"], "site": x["site"],
               "alpha": x["alpha"], "alpha_value": x["alpha_value"], "kl_raw": rt, "kl_mapped": test[i],
               "delta": None if rt is None else rt - test[i], "drop_pct": _drop(rt, test[i]),
               "kl_mapped_unmasked": x["kl_unmasked_mean"], "dev_kl_raw": rd, "dev_kl_mapped": dev[i],
               "dev_drop_pct": _drop(rd, dev[i])}
        if x["kind"] == "mapped":
            rows.append(row)
        else:
            controls.append({**row, "control": x["kind"], "map_layer": x["map_layer"]})
    best = {}
    for r in rows:
        k = (r["solver"], r["layer"], r["site"])
        if k not in best or r["dev_kl_mapped"] < best[k]["dev_kl_mapped"]:
            best[k] = r
    best_rows = sorted(best.values(), key=lambda r: (r["solver"], r["layer"], r["site"]))
    # The winner: the largest dev drop among the (solver, layer, site) rows whose raw patch carries at
    # least WINNER_GAP_SHARE of the largest raw dev KL, so that a near-identity map over a tiny gap
    # (a fine-tune that touches every layer enters at layer 0) cannot win on its percentage alone.
    top_raw = max((r["dev_kl_raw"] for r in best_rows if r["dev_kl_raw"] is not None), default=None)
    pool = [r for r in best_rows if top_raw is None or
            (r["dev_kl_raw"] is not None and r["dev_kl_raw"] >= WINNER_GAP_SHARE * top_raw)] or best_rows
    winner = max(pool, key=lambda r: (r["dev_drop_pct"] is not None,
                                      r["dev_drop_pct"] if r["dev_drop_pct"] is not None else -r["dev_kl_mapped"]),
                 default=None)
    answer = None
    if winner is not None and winner["dev_drop_pct"] is not None and winner["dev_drop_pct"] <= 0:
        # no layer's mapped patch reduces the gap on dev: there is no winner to report
        answer = (f"{NO_TRANSFER}: no layer's mapped patch reduces the gap on dev (best dev drop "
                  f"{winner['dev_drop_pct']:.1f}%, {winner['solver']} L{winner['layer']} {winner['site']})")
        winner = None
    elif winner is not None and winner["dev_drop_pct"] is None and top_raw is not None:
        # no raw patch changes the readout measurably on dev: no drop is defined, nothing to transfer
        # (where the widths differ there is no raw patch at all: the lowest mapped KL wins instead)
        answer = (f"{NO_TRANSFER}: no layer's raw patch changes the readout on dev (raw KL < {MIN_RAW_KL:g} "
                  "nats at every layer): every drop is undefined")
        winner = None
    if winner is not None and "per_prompt_masked" in variants and "n_dev" in variants:
        winner = {**winner, "drop_interval": drop_interval(variants, winner)}
    return {"rows": rows, "best": best_rows, "winner": winner, "controls": controls, "answer": answer,
            "chosen_on": "dev" if "n_dev" in variants else "val (no dev/test split in this file)",
            "winner_rule": f"largest dev drop among rows whose raw dev KL is >= {WINNER_GAP_SHARE:g} x the largest; "
                           f"none where that drop is <= 0 or undefined everywhere ({NO_TRANSFER})"}


def drop_interval(variants: dict, row: dict) -> dict | None:
    """The test drop % of ``row`` (a mapped variant) with its cluster-bootstrap interval over the test
    prompts' topic groups: ``100 (1 - mean KL_mapped / mean KL_raw)``, numerator and denominator drawn
    together (``undefined`` where the raw KL's interval reaches 0)."""
    v, n_dev = variants["variants"], variants["n_dev"]
    idx = {(x["kind"], x.get("solver"), x["layer"], x["site"], x.get("alpha")): i for i, x in enumerate(v)}
    j = idx.get(("mapped", row["solver"], row["layer"], row["site"], row["alpha"]))
    r = next((i for i, x in enumerate(v) if x["kind"] == "raw" and (x["layer"], x["site"]) == (row["layer"], row["site"])),
             None)
    if j is None or r is None:
        return None
    k = torch.tensor(variants["per_prompt_masked"], dtype=torch.float64)[:, n_dev:]
    g = variants.get("val_groups")
    try:
        iv = I.share_closed(k[j], k[r], None if g is None else g[n_dev:])
    except DataError as e:
        return {"note": str(e)}
    return {**iv, **{key: None if iv[key] is None else 100 * iv[key] for key in ("estimate", "ci_low", "ci_high", "se")}}


def winner_controls(controls: list[dict], w: dict | None) -> list[dict]:
    """The bogus and shuffle controls of the winner's own map (its solver, site and map layer)."""
    return [c for c in controls if w and c["control"] in ("bogus", "shuffle") and c.get("solver") == w.get("solver")
            and c["site"] == w["site"] and c.get("map_layer", w["layer"]) == w["layer"]]


def mapped_patch_result(out: dict) -> MappedPatchResult:
    """mapped-patch's typed result from the alpha_sweep.json it wrote: the winner and its controls."""
    w = out["winner"]
    winner = None if not w else SweepWinner(**{k: w.get(k) for k in ("solver", "layer", "site", "alpha", "kl_raw",
                                                                        "kl_mapped", "drop_pct", "dev_drop_pct",
                                                                        "alpha_value")})
    controls = [SweepControl(**{k: c.get(k) for k in ("control", "layer", "map_layer", "site", "kl_mapped", "drop_pct")})
                for c in winner_controls(out["controls"], w)]
    return MappedPatchResult(winner=winner, controls=controls, stop_conditions_met=bool(out["stop_conditions"]["met"]),
                             measure=out["headline"]["measure"], answer=out.get("answer"))


def stop_conditions(t: dict, side: list[dict] | None) -> dict:
    """The plan's stop conditions, each True only on defined evidence: a large drop of the dev-chosen
    winner on test; small side effects (refusal on harmful prompts the model refuses, MC), measured;
    the bogus and shuffled versions of the winner's own map (its solver, layer and site) give a defined
    drop under half the winner's.
    Missing or undefined evidence gives False with the reason in ``reasons``; ``met`` needs all three."""
    w, reasons = t["winner"], {}
    drop = w["drop_pct"] if w else None
    if w is None:
        reasons["large_drop"] = t.get("answer") or "no mapped variant was measured"
    elif drop is None:
        reasons["large_drop"] = ("undefined: raw KL n/a: the widths differ, so the raw state cannot be patched across"
                                 if w["kl_raw"] is None else f"undefined: the raw patch changes nothing on test "
                                 f"(KL_raw {format(w['kl_raw'], '.2g')} < {MIN_RAW_KL:g})")
    big = drop is not None and drop >= THRESHOLDS["drop_pct"]
    if drop is not None and not big:
        reasons["large_drop"] = f"test drop {drop:.1f}% < {THRESHOLDS['drop_pct']:.0f}%"
    se = False
    s = next((r for r in side or [] if w and r["layer"] == w["layer"] and r["site"] == w["site"]
              and r.get("solver", w["solver"]) == w["solver"]), None)
    if not side:
        reasons["side_effects_small"] = "not measured (--no-side-effects or no side_effects.json)"
    elif s is None:
        reasons["side_effects_small"] = "not measured for the winner"
    else:
        ref, mc, clean = s.get("d_refusal_pp_unmasked"), s.get("d_mc_dlogp_unmasked"), s.get("refusal_clean_unmasked")
        if ref is None or mc is None or ref != ref or mc != mc:
            reasons["side_effects_small"] = "undefined: a side effect has no finite value"
        elif not clean:
            reasons["side_effects_small"] = ("undefined: the model refuses none of the harmful prompts, so a lost "
                                             "refusal cannot show")
        else:
            se = abs(ref) <= THRESHOLDS["refusal_pp"] and abs(mc) <= THRESHOLDS["mc_dlogp"]
            if not se:
                reasons["side_effects_small"] = f"d refusal {ref:+.1f} pp, d mc_dlogp {mc:+.3f} over the thresholds"
    ctrl = winner_controls(t["controls"], w)
    undefined = [c for c in ctrl if c["drop_pct"] is None]
    if not ctrl:
        reasons["controls_not_comparable"] = "no bogus or shuffle control was measured for the winner's map"
        ctrl_ok = False
    elif undefined:
        reasons["controls_not_comparable"] = "not comparable: " + "; ".join(
            f"{c['control']} control at L{c['layer']} has no defined drop "
            f"({'raw KL n/a: widths differ' if c.get('kl_raw') is None else 'raw KL ~0'}): evidence of nothing"
            for c in undefined)
        ctrl_ok = False
    elif drop is None:
        reasons["controls_not_comparable"] = "the winner's drop is undefined"
        ctrl_ok = False
    else:
        ctrl_ok = all(c["drop_pct"] < 0.5 * drop for c in ctrl)
        if not ctrl_ok:
            reasons["controls_not_comparable"] = "a control gives half the winner's drop or more"
    return {"large_drop": big, "side_effects_small": se, "controls_not_comparable": ctrl_ok,
            "met": bool(big and se and ctrl_ok), "reasons": reasons, "chosen_on": t.get("chosen_on", "dev"),
            "reported_on": "test", "thresholds": THRESHOLDS}


def _fmt(x, spec="7.3f"):
    """A number, or "n/a" in the same width where it is undefined (null)."""
    width = spec.split(".")[0]
    return format("n/a", f">{width}" if width else "") if x is None else format(x, spec)


def _drop_text(r: dict, spec=".1f") -> str:
    """The row's drop % or, where it is undefined, why: the raw KL is 0 (nothing to drop), or there is
    no raw patch at all (base and tuned widths differ: only mapped states can be patched across)."""
    x = r["drop_pct"]
    if x is not None:
        return format(x, spec) + "%"
    return "n/a: no raw patch (widths differ)" if r.get("kl_raw") is None else "n/a: no gap"


def summary_text(t: dict, side: list[dict] | None, stop: dict, meta: dict) -> str:
    """The one summary TXT of the plan (section 5)."""
    L = [f"RQ2 — alpha sweep summary (test n={meta['n_test']}, dev n={meta['n_dev']}, solvers="
         f"{','.join(meta['solvers'])}, measure={meta['measure']}); alpha and winner chosen on dev (the winner: "
         f"the largest drop among layers carrying >= {WINNER_GAP_SHARE:g} x the largest raw KL), numbers on test",
         "", "solver             layer site        alpha   KL_raw   KL_mapped   delta    drop%  (dev drop%)"]
    for r in t["rows"]:
        L.append(f"{r['solver']:<18} {r['layer']:>5} {r['site']:<11} {str(r['alpha']):>5} {_fmt(r['kl_raw'])}  "
                 f"{_fmt(r['kl_mapped'], '9.3f')}  {_fmt(r['delta'])}  {_drop_text(r, '6.1f')}  "
                 f"({_drop_text(_dev(r))})")
    L += ["", "alpha chosen on dev per (solver, layer, site), test numbers:"]
    for r in t["best"]:
        L.append(f"  {r['solver']} L{r['layer']} {r['site']}: alpha={r['alpha']} ({r['alpha_value']:.3f}) "
                 f"KL {_fmt(r['kl_raw'], '.3f')} -> {r['kl_mapped']:.3f} (drop {_drop_text(r)})")
    w = t["winner"]
    if t.get("answer"):
        L.append(f"answer: {t['answer']}")
    if w:
        L.append(f"winner (chosen on dev): {w['solver']} L{w['layer']} {w['site']} alpha={w['alpha']}, test drop "
                 f"{_drop_text(w)} (dev {_drop_text(_dev(w))})" + (
                     f"; 95% interval over topic groups {I.fmt(w['drop_interval'], '{:.1f}')} %"
                     if (w.get("drop_interval") or {}).get("estimate") is not None else ""))
    for s in side or []:
        n = lambda k, spec: "n/a" if s.get(k) is None else format(s[k], spec)  # noqa: E731  (undefined: null)
        L.append(f"side effects {s.get('solver', '')} L{s['layer']} {s['site']} alpha={s['alpha']}: "
                 f"d refusal {n('d_refusal_pp_unmasked', '+.1f')} pp (masked {n('d_refusal_pp_masked', '+.1f')}), "
                 f"d mc_dlogp {n('d_mc_dlogp_unmasked', '+.3f')} (masked {n('d_mc_dlogp_masked', '+.3f')})")
    for c in t["controls"]:
        L.append(f"control {c['control']} ({c['solver']}): map L{c['map_layer']} at L{c['layer']} {c['site']}: "
                 f"KL {_fmt(c['kl_raw'], '.3f')} -> {c['kl_mapped']:.3f} (drop {_drop_text(c)})")
    L.append(f"stop conditions met: {stop['met']} (large drop: {stop['large_drop']}, side effects small: "
             f"{stop['side_effects_small']}, controls not comparable: {stop['controls_not_comparable']})")
    L += [f"  not met: {k}: {v}" for k, v in stop["reasons"].items()]
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
    meta = {"n_val": variants["n_val"], "n_dev": variants.get("n_dev", variants["n_val"]),
            "n_test": variants.get("n_test", variants["n_val"]),
            "solvers": variants.get("solvers", [variants["solver"]]), "measure": variants["measure"]}
    text = summary_text(t, side, stop, meta)
    atomic_write_text(run.file("rq2_summary.txt"), text)
    write_maps_figures(run)
    w = t["winner"]
    shown = [r for r in t["rows"] if w is None or r["solver"] == w["solver"]]
    if any(r["drop_pct"] is not None for r in shown):
        plot_drop_heatmap(shown, run.figure("drop_heatmap.png"),
                          title=f"KL drop % (mapped vs raw), test, {shown[0]['solver']}")
    out = {"title": "RQ2 — mapped patching and alpha-sweep", "summary": text, "table": t["rows"],
           "tables": {"best per (layer, site)": t["best"], "controls": t["controls"]},
           "winner": w, "controls": t["controls"], "side_effects": side, "stop_conditions": stop,
           "answer": t.get("answer"),
           "headline": {"winner": t.get("answer") or (None if not w else f"{w['solver']} L{w['layer']} {w['site']} "
                                                                          f"alpha={w['alpha']} (chosen on dev)"),
                        "KL_raw -> KL_mapped": None if not w else
                        f"{_fmt(w['kl_raw'], '.3f')} -> {w['kl_mapped']:.3f}",
                        "drop % (test)": None if not w else w["drop_pct"], "stop conditions met": stop["met"],
                        **({"stop conditions not met because": "; ".join(f"{k}: {v}" for k, v in
                                                                       stop["reasons"].items())} if stop["reasons"] else {}),
                        **meta}}
    run.write_json("alpha_sweep.json", out)
    return out


SWEEP_COLUMNS = ["layer", "site", "alpha", "alpha_value", "kl_raw", "kl_mapped", "delta", "drop_pct"]


def sweep_section(sec, run_dir: Path) -> None:
    """mapped-patch's report section: the alpha-sweep summary table (a ``section`` hook)."""
    sweep = load(run_dir / "alpha_sweep.json")
    if not isinstance(sweep, Mapping) or not isinstance(sweep.get("table"), list):
        return
    sec.heading("Alpha-sweep summary (RQ2)", 2, "alpha-sweep")
    h = sweep.get("headline") or {}
    sec.para(f"Mapped patching on the val split (n={h.get('n_val')}, solver {h.get('solver')}, read at the "
             f"{h.get('measure')} token): KL(tuned clean || tuned patched) for the raw base state and the mapped "
             "one per alpha; drop % = (KL_raw - KL_mapped) / KL_raw.")
    sec.row_table(sweep["table"], SWEEP_COLUMNS)
    tables = sweep.get("tables") or {}
    for name in ("best per (layer, site)", "controls"):
        if isinstance(tables.get(name), list) and tables[name]:
            sec.para(name)
            sec.row_table(tables[name])
    if (run_dir / "rq2_summary.txt").is_file():
        sec.pre((run_dir / "rq2_summary.txt").read_text(encoding="utf-8"))
