"""The executive-summary sentences and headline numbers of the built-in stages, from the run's JSON
files alone: every sentence carries its numbers with their uncertainty (an SE or CI) or a control
beside it. Each stage module hands its part to the report as hooks
(:class:`mechdiff.report.hooks.ReportHooks`: ``rq1_sentences`` .. ``rq4_numbers`` here, each taking
the run directory); :mod:`mechdiff.report.summary` puts them together.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mechdiff.experiments.maps_summary import winner_controls
from mechdiff.report.render import load


def _f(x: Any, spec: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return format(x, spec)


def _pct(x: Any) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


# ------------------------------------------------------------------------------- RQ1
def behaviour_sentences(beh: dict | None) -> list[str]:
    """tuned vs base per prompt set; rates with a binomial SE of the difference."""
    if not beh or not isinstance(beh.get("base"), dict):
        return []
    out = []
    for name, b in beh["base"].items():
        t = (beh.get("tuned") or {}).get(name)
        if not isinstance(b, dict) or not isinstance(t, dict):
            continue
        n = int(b.get("n") or 0)
        parts = []
        for key, what in (("refusal_rate", "refusal rate"), ("mc_accuracy", "MC accuracy")):
            if b.get(key) is not None and t.get(key) is not None and n:
                pb, pt = float(b[key]), float(t[key])
                # Agresti-Caffo: one success and one failure added per group, so 0/n still has a spread
                ab, at = (pb * n + 1) / (n + 2), (pt * n + 1) / (n + 2)
                se = math.sqrt(ab * (1 - ab) / (n + 2) + at * (1 - at) / (n + 2))
                parts.append(f"{what} {100 * pb:.1f}% -> {100 * pt:.1f}% (diff {100 * (pt - pb):+.1f} pp "
                             f"+- {100 * se:.1f} SE, binomial)")
        for key, what in (("soft_refusal", "soft refusal"), ("mc_delta_logp_correct", "log-prob margin of the correct option")):
            if b.get(key) is not None and t.get(key) is not None:
                parts.append(f"{what} {float(b[key]):+.3g} -> {float(t[key]):+.3g} nats (base as the reference)")
        if parts:
            out.append(f"Behaviour on '{name}' (n={n}, base -> tuned): " + "; ".join(parts) + ".")
    return out


def entry_phrase(entry: int, patched: "list[int] | None") -> str:
    """Where divergence enters, no stronger than measured: "layer 20" only when the layer below it
    was patched too (or it is layer 0), else "layer 20 or earlier" with the unpatched gap named."""
    below = [l for l in (patched or []) if l < entry]
    if entry == 0 or (entry - 1) in below:
        return f"layer {entry}"
    if not below:
        return f"layer {entry} or earlier (layers below {entry} were not patched)"
    prev = max(below)
    gap = f"layer {prev + 1} was" if prev + 1 == entry - 1 else f"layers {prev + 1}-{entry - 1} were"
    return f"layer {entry} or earlier (after layer {prev}; {gap} not patched)"


def _per_layer(rq1: dict) -> dict[int, dict]:
    ev = ((rq1.get("layers") or {}).get("evidence") or {})
    return {int(r["layer"]): r for r in ev.get("per_layer") or []}


def rq1_text(rq1: dict | None, cka: dict | None) -> list[str]:
    if not rq1:
        return []
    out = []
    cka = cka or rq1.get("cka") or {}
    rows = cka.get("per_layer") or []
    if rows:
        low = min(rows, key=lambda r: r["debiased"])
        out.append(f"Representations differ most at layer {low['layer']}: debiased CKA {_f(low['debiased'])} "
                   f"(95% CI {_f(low.get('ci_low'))} to {_f(low.get('ci_high'))}, jackknife over topic groups) "
                   f"against a row-shuffled independence null (the CKA of unrelated states, its own permutations per "
                   f"layer) of {_f(low.get('null_mean'))} +- {_f(low.get('null_sd'))} "
                   f"(biased CKA {_f(low.get('biased'))}; n={cka.get('n')}).")
    layers = rq1.get("layers") or {}
    ev = layers.get("evidence") or {}
    per = _per_layer(rq1)
    entry, chosen, control = layers.get("entry"), layers.get("chosen") or [], layers.get("control")
    if per:
        floor = ev.get("floor")
        if entry is not None:
            e = per[int(entry)]
            out.append(f"Divergence enters at {entry_phrase(int(entry), sorted(per))}: patch KL {_f(e['mean'])} +- {_f(e['se'], '.2g')} "
                       f"(SE over topic groups) vs the self-patch floor {_f(floor)}; the first layer whose KL "
                       f"exceeds the floor by {_f(ev.get('z'), 'g')} SE.")
        else:
            top = max(per.values(), key=lambda r: r["mean"])
            out.append(f"No divergence found by patching: no layer's KL exceeds the self-patch floor {_f(floor)} by "
                       f"{_f(ev.get('z'), 'g')} SE (largest: {_f(top['mean'])} +- {_f(top['se'], '.2g')} at layer "
                       f"{top['layer']}).")
        if chosen:
            ch = ", ".join(f"L{l} {_f(per[l]['mean'])} +- {_f(per[l]['se'], '.2g')}" for l in chosen if l in per)
            ctrl = (f" vs control layer {control}: {_f(per[control]['mean'])} +- {_f(per[control]['se'], '.2g')}"
                    if control in per else "")
            rule = str(layers.get("basis", "RQ1's rule")).replace("patch KL: ", "")
            out.append(f"Patch KL at the chosen layers {chosen} (rule: {rule}): {ch}{ctrl}.")
    elif chosen:
        out.append(f"Layer patching was not run (models differ in shape); layers chosen by "
                   f"{layers.get('basis', 'lowest CKA')}: {chosen}, control {control}.")
    planted = rq1.get("planted_layers")
    if planted:
        hit = sorted(set(planted) & set(chosen))
        out.append(f"Ground truth (planted pair): the change was planted at layers {planted}; RQ1 chose {chosen} "
                   f"({len(hit)} of {len(chosen)} chosen layers are planted ones).")
    return out


# ------------------------------------------------------------------------------- RQ2
def best_map(maps: dict | None) -> dict | None:
    """The map chosen on dev R2 (``maps.json``'s ``best``), else the best val R2 (older files)."""
    if (maps or {}).get("best"):
        return maps["best"]
    rows = [r for r in (maps or {}).get("table") or [] if not r.get("control_layer") and r.get("val_r2_vw") is not None]
    return max(rows, key=lambda r: r["val_r2_vw"]) if rows else None


def _variant_se(variants: dict | None, layer, site, alpha, kind: str) -> float | None:
    if not variants:
        return None
    n = variants.get("n_test", variants.get("n_val")) or 0      # kl_std is over the test prompts
    for v in variants.get("variants") or []:
        if v.get("layer") == layer and v.get("site") == site and v.get("kind") == kind and \
                (kind == "raw" or str(v.get("alpha")) == str(alpha)):
            sd = v.get("kl_std")
            return None if sd is None or n < 2 else sd / math.sqrt(n)
    return None


def rq2_text(maps: dict | None, sweep: dict | None, variants: dict | None) -> list[str]:
    out = []
    b = best_map(maps)
    if b:
        ctrl = [r for r in (maps or {}).get("table") or [] if r.get("control_layer") and r.get("solver") == b["solver"]
                and r.get("site") == b["site"]]
        c = f"; the same map at control layer {ctrl[0]['layer']}: R2 {_f(ctrl[0]['val_r2_vw'])}" if ctrl else ""
        out.append(f"Best transport map base -> tuned (chosen on dev R2): {b['solver']} at layer {b['layer']} "
                   f"({b['site']}): test R2 {_f(b.get('test_r2_vw', b['val_r2_vw']))}, held-out R2 {_f(b['val_r2_vw'])} and CKA(mapped, tuned) {_f(b.get('val_cka'))}, vs the identity map's "
                   f"R2 {_f(b.get('identity_val_r2_vw'))} and a map fitted on shuffled targets R2 "
                   f"{_f(b.get('shuffle_val_r2_vw'))}{c}.")
    w = (sweep or {}).get("winner")
    if not w and (sweep or {}).get("answer"):
        out.append(f"Mapped patching (solver, layer and alpha chosen on {(variants or {}).get('n_dev', 'the same')} "
                   f"dev prompts): {sweep['answer']}.")
    if w:
        raw_se = _variant_se(variants, w["layer"], w["site"], None, "raw")
        map_se = _variant_se(variants, w["layer"], w["site"], w["alpha"], "mapped")
        ctrls = "; ".join(f"{c['control']} map {'n/a' if c.get('drop_pct') is None else format(c['drop_pct'], '.0f') + '%'}"
                          for c in winner_controls(sweep.get("controls") or [], w))
        drop = (f"a {w['drop_pct']:.0f}% drop" if w.get("drop_pct") is not None else
                "no drop is defined (raw KL n/a: the widths differ, so the raw state cannot be patched across)"
                if w.get("kl_raw") is None else "no drop is defined (the raw patch changes nothing)")
        raw = ("raw KL n/a (widths differ)" if w.get("kl_raw") is None else
               f"{_f(w.get('kl_raw'))} +- {_f(raw_se, '.2g')} for the raw base state")
        stop = (sweep.get("stop_conditions") or {}).get("met")
        why = "; ".join(f"{k}: {v}" for k, v in ((sweep.get("stop_conditions") or {}).get("reasons") or {}).items())
        out.append(f"Mapped patching (test n={(variants or {}).get('n_test', (variants or {}).get('n_val'))}; solver, "
                   f"layer and alpha chosen on {(variants or {}).get('n_dev', 'the same')} dev prompts): "
                   f"{w.get('solver', '')} at layer {w['layer']} {w['site']}, alpha {w['alpha']}, the mapped base state gives patch KL "
                   f"{_f(w['kl_mapped'])} +- {_f(map_se, '.2g')} vs {raw}: {drop} (controls: {ctrls or 'none'}); stop conditions met: "
                   f"{'yes' if stop else 'no'}" + (f" ({why})" if why and not stop else "") + ".")
    return out


# ------------------------------------------------------------------------------- RQ3 / RQ4
def rq3_text(rq3: dict | None) -> list[str]:
    if not rq3:
        return []
    res = rq3.get("result") or {}
    opts = rq3.get("options") or {}
    if res.get("status") in ("nothing to steer", "no handle"):
        return [f"Rank-k handle: {res.get('text')}."]
    out = []
    thr, ppl, mc = opts.get("gap_threshold"), opts.get("max_ppl_pct"), opts.get("max_mc_drop_pp")
    n_test = (rq3.get("headline") or {}).get("fit / dev / test prompts", "").split("/")[-1].strip()
    for mode, h in (res.get("by_mode") or {}).items():
        c = h.get("cell") or {}
        rnd, ctl = h.get("random") or {}, h.get("control_layer") or {}
        side = (f"neutral perplexity {_f(c.get('ppl_change_pct_unmasked'), '+.2f')}% (limit {_f(ppl, 'g')}%), "
                f"MC accuracy change {_f(0.0 - (c.get('mc_drop_pp_unmasked') or 0.0), '+.1f')} pt (limit -{_f(mc, 'g')} pt)")
        ctrl = (f"random basis of the same k: {_pct(rnd.get('test_share'))}; same handle at control layer "
                f"{ctl.get('layer', 'n/a')}: {_pct(ctl.get('test_share'))}")
        where = f"{mode} ({'base' if c.get('side') == 'base' else 'tuned'} model), {h.get('kind')} handle at layer {h.get('layer')}"
        est = h.get("estimates") or {}
        if est.get("saturation_k") and est["saturation_k"].get("full_share") is not None:
            sat = est["saturation_k"]
            out.append(f"Rank-k handle, {where}: patching the whole difference there closes {_pct(sat['full_share'])}; "
                       f"90% of that is reached at k = {sat['estimate'] if sat['estimate'] is not None else 'none tried'}.")
        if h.get("minimal_k") is not None:
            out.append(f"Rank-k handle, {where}: minimal k = {h['minimal_k']} (chosen on dev prompts, where it closes "
                       f"{_pct(c.get('dev_share'))}; target >= {_pct(thr)}) closes {_pct(c.get('test_share'))} of "
                       f"the base-tuned gap on {n_test or 'the'} held-out test prompts ({ctrl}); side effects: {side}.")
        else:
            out.append(f"Rank-k handle, {where}: no k closes >= {_pct(thr)} of the gap on dev within the side-effect "
                       f"limits (best on dev: k={c.get('k')}, {_pct(c.get('dev_share'))} on dev, "
                       f"{_pct(c.get('test_share'))} on test; {ctrl}); side effects there: {side}.")
    return out


def churn_numbers(rq4: dict | None) -> dict[str, float]:
    """``{measure: share}``: changed-head share (swap/own) or importance-label churn per measurement."""
    out = {}
    for m, r in ((rq4 or {}).get("churn") or {}).items():
        v = r.get("share", r.get("churn")) if isinstance(r, dict) else None
        if v is not None:
            out[m] = float(v)
    return out


def importance_measure(rq4: dict) -> str | None:
    for k in (rq4.get("headline") or {}):
        if k.startswith("importance churn (") and k.endswith(")"):
            return k[len("importance churn ("):-1]
    return next((m for m in ("attribution", "zero", "mean") if m in (rq4.get("churn") or {})), None)


def rq4_text(rq4: dict | None) -> list[str]:
    if not rq4:
        return []
    out, churn = [], rq4.get("churn") or {}
    floor = (rq4.get("thresholds") or {}).get("floor")
    structural = next((m for m in ("own", "swap") if m in churn), None)
    n_heads = len(rq4.get("heads") or [])
    if structural:
        s = churn[structural]
        iv = s.get("share_interval") or {}
        ci = f" [95% interval {_pct(iv['ci_low'])}, {_pct(iv['ci_high'])}]" if "ci_low" in iv else ""
        fdr = f", counted at false-discovery rate {_f(s['q'], 'g')}; Storey's estimate {_pct(s.get('share_storey'))}" \
            if "q" in s else ""
        out.append(f"Head churn at layers {rq4.get('layers')}: {_pct(s.get('share'))}{ci} of {n_heads} heads changed "
                   f"('{structural}': patching in the other model's head moves the readout by more than the "
                   f"noise floor {_f(floor, '.2g')} {rq4.get('unit', '')}{fdr}).")
    imp = importance_measure(rq4)
    if imp and imp in churn:
        c = churn[imp]
        out.append(f"Importance churn ({imp}): {_pct(c.get('churn'))} of heads change their important / "
                   f"unimportant label; the two models' head rankings agree with top-{c.get('k')} Jaccard "
                   f"{_f(c.get('topk_jaccard'))} and Spearman {_f(c.get('spearman'))} (1 = identical).")
    for m, r in (rq4.get("planted") or {}).items():
        if m == structural:
            out.append(f"Ground truth (heads known to have changed: planted, or trained per the adapter's card), by "
                       f"'{m}' change: {r.get('observed')} of the top-{r.get('k')} heads are such heads (chance {_f(r.get('expected'), '.2f')}, p = {_f(r.get('p_value'), '.2g')}"
                       + (f"; AUROC {_f(r['auroc'], '.3f')}, estimated share {_pct(r.get('estimated_share'))} vs true "
                          f"{_pct(r.get('true_share'))}" if "auroc" in r else "") + ").")
    return out


# ------------------------------------------------------------------------------- hooks (run_dir ->)
def _json(run_dir: Path, name: str) -> Any:
    return load(Path(run_dir) / f"{name}.json")


def rq1_sentences(run_dir: Path) -> list[tuple[str, str]]:
    """RQ1's hook: the behaviour table's sentences, then CKA / patching / chosen layers."""
    rq1 = _json(run_dir, "rq1")
    rq1 = rq1 if isinstance(rq1, dict) else None
    beh = _json(run_dir, "behaviour") or (rq1 or {}).get("behaviour")
    return [("behaviour", s) for s in behaviour_sentences(beh)] + \
        [("RQ1", s) for s in rq1_text(rq1, _json(run_dir, "cka"))]


def rq2_sentences(run_dir: Path) -> list[str]:
    return rq2_text(_json(run_dir, "maps"), _json(run_dir, "alpha_sweep"), _json(run_dir, "variants"))


def rq3_sentences(run_dir: Path) -> list[str]:
    return rq3_text(_json(run_dir, "rq3"))


def rq4_sentences(run_dir: Path) -> list[str]:
    return rq4_text(_json(run_dir, "rq4"))


def rq1_numbers(run_dir: Path) -> dict[str, Any]:
    rq1 = _json(run_dir, "rq1") or {}
    per = _per_layer(rq1) if rq1 else {}
    top = max(per.values(), key=lambda r: r["mean"]) if per else None
    cka_rows = (_json(run_dir, "cka") or rq1.get("cka") or {}).get("per_layer") or []
    low = min(cka_rows, key=lambda r: r["debiased"]) if cka_rows else None
    layers = rq1.get("layers") or {}
    entry = per.get(layers.get("entry")) if layers.get("entry") is not None else None
    return {
        "entry layer": layers.get("entry") if rq1 else None,
        "entry KL": None if entry is None else entry["mean"], "entry KL SE": None if entry is None else entry["se"],
        "patch floor": ((layers.get("evidence") or {}).get("floor")) if rq1 else None,
        "chosen layers": layers.get("chosen") if rq1 else None,
        "max patch KL": None if top is None else top["mean"], "max patch KL SE": None if top is None else top["se"],
        "max patch KL layer": None if top is None else top["layer"],
        "min debiased CKA": None if low is None else low["debiased"],
        "min CKA layer": None if low is None else low["layer"]}


def rq2_numbers(run_dir: Path) -> dict[str, Any]:
    b = best_map(_json(run_dir, "maps"))
    w = (_json(run_dir, "alpha_sweep") or {}).get("winner") or {}
    return {"best map R2": None if b is None else b.get("test_r2_vw", b["val_r2_vw"]),
            "best map": None if b is None else f"{b['solver']} L{b['layer']} {b['site']}",
            "identity map R2": None if b is None else b.get("identity_val_r2_vw"),
            "mapped drop %": w.get("drop_pct"), "raw patch KL (val)": w.get("kl_raw"),
            "drop readout": "decision token" if w else None}


def rq3_numbers(run_dir: Path) -> dict[str, Any]:
    res = (_json(run_dir, "rq3") or {}).get("result") or {}
    return {"minimal k": res.get("minimal_k"), "rq3 status": res.get("status")}


def rq4_numbers(run_dir: Path) -> dict[str, Any]:
    rq4 = _json(run_dir, "rq4")
    churn = churn_numbers(rq4)
    structural = next((m for m in ("own", "swap") if m in churn), None)
    imp = importance_measure(rq4) if rq4 else None
    churn_raw = (rq4 or {}).get("churn") or {}
    return {"changed heads share": churn.get(structural) if structural else None,
            "head noise floor": ((rq4 or {}).get("thresholds") or {}).get("floor"),
            "importance churn": churn.get(imp) if imp else None,
            "top-k Jaccard": (churn_raw.get(imp) or {}).get("topk_jaccard") if imp else None}
