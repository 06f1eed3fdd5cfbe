"""RQ3 summary, from the step outputs alone: every cell's dev/test share and side effects, the alpha
chosen on dev, the minimal k per handle, controls, transfer, handles/, the figure, rq3.json and
rq3_summary.txt (see :mod:`mechdiff.experiments.steer`)."""
from __future__ import annotations

import math

import torch

from mechdiff.analyses import intervals as I
from mechdiff.analyses import rank as RK
from mechdiff.analyses import readouts as R
from mechdiff.errors import ConfigError, DataError
from mechdiff.analyses import steering as S
from mechdiff.atomic import atomic_write_text
from mechdiff.plots import plot_steer_vs_k

STATES, BASES = "tensors/rq3_states.safetensors", "tensors/rq3_bases.safetensors"
SWEEP = "tensors/rq3_sweep.safetensors"


def handle_of(cell: dict, bases: dict, site: str) -> S.Handle:
    """The :class:`~mechdiff.analyses.steering.Handle` of one cell (its basis cut to the cell's k; an
    ablation's reference: the base's mean state there; a map handle's map at the cell's layer)."""
    key = f"{cell['kind']}{'@' + cell['fit_lang'] if cell['fit_lang'] else ''}.{cell['basis_layer']}"
    at, k, mode = cell["layer"], cell["k"], cell["mode"]
    return S.Handle(at, site, bases[key][:, :k], mode=mode, alpha=cell["alpha"], scale=float(bases[f"scale.{at}"]),
                    reference=bases.get(f"mean.base.{at}") if mode == "ablate" else None,
                    matrix=bases.get(f"mapA.{key}@{at}.k{k}") if mode == "map" else None,
                    offset=bases.get(f"mapc.{key}@{at}.k{k}") if mode == "map" else None)


def _share(kl: torch.Tensor, gap: torch.Tensor, min_gap: float) -> float | None:
    """``1 - mean KL(other || patched) / mean KL(other || self)``; None when there is no gap."""
    if kl.numel() == 0 or not float(gap.mean()) > min_gap:
        return None
    return 1.0 - float(kl.double().mean()) / float(gap.double().mean())


def _rows(meta: dict, sweep: dict, side_rows: list, opts) -> list[dict]:
    n_dev, langs = meta["n_dev"], meta["eval_lang"]
    n = len(langs)
    test_lang = {lang: [i for i in range(n_dev, n) if langs[i] == lang] for lang in sorted({str(x) for x in langs})}
    count, rows = {"base": 0, "tuned": 0}, []
    for c, se in zip(meta["cells"], side_rows):
        kl, gap = sweep[f"{c['side']}/kl"][count[c["side"]]], sweep[f"{c['side']}/gap"]
        count[c["side"]] += 1
        row = {**c, "sweep_index": count[c["side"]] - 1, "dev_share": _share(kl[:n_dev], gap[:n_dev], opts.min_gap_kl),
               "test_share": _share(kl[n_dev:], gap[n_dev:], opts.min_gap_kl),
               "test_kl": float(kl[n_dev:].mean()), "test_gap_kl": float(gap[n_dev:].mean()),
               "test_share_by_lang": {g: _share(kl[ix], gap[ix], opts.min_gap_kl) for g, ix in test_lang.items()
                                      if ix and len(test_lang) > 1}, **se}
        # gated at the response's first token and where the patch acts (its own, looser threshold: a
        # rank-2 change moves the patched token's own prediction by tens of %, a broken one by 1e5 %)
        row["within"] = R.within(se, opts.max_ppl_pct, opts.max_mc_drop_pp) and all(
            math.isfinite(v) and v <= opts.max_ppl_pct_patched for k, v in se.items()
            if k.startswith("ppl_change_pct_") and "_at_" in k) if se else None   # None: not measured
        rows.append(row)
    return rows


def choose_alpha(rows: list[dict]) -> list[dict]:
    """Per (layer, basis layer, kind, fit_lang, mode, k): the alpha with the best dev share among those within the
    side-effect thresholds (else the best dev share, ``within`` False)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["layer"], r["basis_layer"], r["kind"], r["fit_lang"], r["mode"], r["k"]), []).append(r)
    best = []
    for g in groups.values():
        scored = [r for r in g if r["dev_share"] is not None]
        ok = [r for r in scored if r["within"]] or scored
        best.append(max(ok, key=lambda r: r["dev_share"]) if ok else g[0])
    return best


def minimal_k(chosen: list[dict], threshold: float, on: str = "dev_share") -> int | None:
    """Smallest k whose chosen cell closes >= threshold of the gap on the dev prompts (``on``) within
    the side effects; its test share is what is reported (choosing on test would overstate it)."""
    ks = [r["k"] for r in sorted(chosen, key=lambda r: r["k"])
          if r["within"] and r[on] is not None and r[on] >= threshold]
    return ks[0] if ks else None


def _pick(chosen: list[dict], **key) -> list[dict]:
    return sorted((r for r in chosen if all(r[k] == v for k, v in key.items())), key=lambda r: r["k"])


def _headline(chosen: list[dict], mode: str, layers: list[int], control: int, thr: float) -> dict | None:
    """The handle of ``mode`` with the smallest minimal k (ties: larger dev share) at the chosen
    layers, with its random control and the same handle at the control layer. Layer, kind, k and the
    saturation point are chosen on the dev prompts; the cell's test share is what is reported."""
    cands = []
    for l in layers:
        for kind in sorted({r["kind"] for r in chosen if r["kind"] != "random"}):
            cur = _pick(chosen, layer=l, basis_layer=l, kind=kind, fit_lang=None, mode=mode)
            if cur:
                k = minimal_k(cur, thr)
                best = max(cur, key=lambda r: -math.inf if r["dev_share"] is None else r["dev_share"])
                at = next(r for r in cur if r["k"] == k) if k is not None else best
                cands.append((k is None, k or 0, -(at["dev_share"] or 0.0), l, kind, at))
    if not cands:
        return None
    none, k, _, l, kind, at = min(cands, key=lambda c: c[:3])
    curve = _pick(chosen, layer=l, basis_layer=l, kind=kind, fit_lang=None, mode=mode)
    ok = [r for r in curve if r["within"] and r["dev_share"] is not None]
    top = max((r["dev_share"] for r in ok), default=None)
    sat = next((r["k"] for r in ok if top is not None and top > 0 and r["dev_share"] >= 0.9 * top), None)
    # (k_saturation: the old rule, 90% of the best k tried; estimates() adds the one against the whole difference)
    ctrl = lambda **kw: next(iter(_pick(chosen, mode=mode, k=at["k"], fit_lang=None, **kw)), None)  # noqa: E731
    return {"mode": mode, "layer": l, "kind": kind, "minimal_k": None if none else k, "k_saturation": sat, "cell": at,
            "random": ctrl(layer=l, basis_layer=l, kind="random"),
            "control_layer": ctrl(layer=control, basis_layer=l, kind=kind),
            "curve": curve,
            "random_curve": _pick(chosen, layer=l, basis_layer=l, kind="random", fit_lang=None, mode=mode)}


def estimates(h: dict, rows: list[dict], sweep: dict, meta: dict, opts) -> dict:
    """Intervals for one headline (cluster bootstrap over the eval prompts' topic groups): the test
    share of its cell, the minimal k (on dev, the side-effect-gated cells), and the saturation k
    against the whole difference patched at the layer (``full`` cell; on test, alpha 1 at every k,
    so that the curve is not re-tuned per k)."""
    n_dev, groups = meta["n_dev"], meta.get("eval_groups")
    side = h["cell"]["side"]
    kl, gap = sweep[f"{side}/kl"], sweep[f"{side}/gap"]
    g_dev = None if groups is None else groups[:n_dev]
    g_test = None if groups is None else groups[n_dev:]
    out = {}
    try:
        c = h["cell"]
        out["test_share"] = I.share_closed(kl[c["sweep_index"]][n_dev:], gap[n_dev:], g_test)
        gated = [r for r in h["curve"] if r["within"]]
        if gated:
            out["minimal_k"] = RK.smallest_k(torch.stack([kl[r["sweep_index"]][:n_dev] for r in gated]),
                                             [r["k"] for r in gated], gap[:n_dev], g_dev, threshold=opts.gap_threshold)
        full = next((r for r in rows if r["kind"] == "full" and r["side"] == side and r["layer"] == h["layer"]), None)
        fixed = sorted((r for r in rows if (r["layer"], r["basis_layer"], r["kind"], r["fit_lang"], r["mode"]) ==
                        (h["layer"], h["layer"], h["kind"], None, h["mode"]) and r["alpha"] == 1.0), key=lambda r: r["k"])
        if full is not None and fixed and h["mode"] != "add":
            out["saturation_k"] = RK.smallest_k(torch.stack([kl[r["sweep_index"]][n_dev:] for r in fixed]),
                                                [r["k"] for r in fixed], gap[n_dev:], g_test,
                                                kl_full=kl[full["sweep_index"]][n_dev:])
    except (DataError, ConfigError) as e:         # too few prompts / groups for an interval: say so
        out["note"] = str(e)
    return out


def _rank_lines(lens: dict) -> list[str]:
    out = []
    for key, r in sorted(lens.items()):
        if key.startswith("rank."):
            how = f"exactly rank {r['estimate']}: the rest is at float precision" if r["exact"] else \
                "components above the noise edge"
            line = (f"rank of the difference at L{key[5:]}: {r['estimate']} [{r['ci_low']}, {r['ci_high']}] "
                    f"({r['method']}; {r['n_rows']} rows; {how})")
            if "principal_angles_deg" in r:
                line += f"; largest principal angle to the planted rank-{r['truth_rank']} subspace " \
                        f"{max(r['principal_angles_deg']):.2f} deg"
            out.append(line)
        elif "exact_rank" in r:
            out.append(f"{key}: the difference has exactly {r['exact_rank']} directions; k up to {r['exact_rank']} analysed")
    return out


def _est_line(h: dict) -> str:
    e = h.get("estimates") or {}
    parts = [f"test share {I.fmt(e.get('test_share'), '{:.3f}')}"] if e.get("test_share") else []
    for key, what in (("minimal_k", "minimal k"), ("saturation_k", "saturation k (90% of the whole difference's "
                                                                   "effect)")):
        if key in e:
            r = e[key]
            hi = r["ci_high"] if r["ci_high"] is not None else "beyond the grid"
            extra = f", the whole difference closes {r['full_share']:.1%}" if r.get("full_share") is not None else ""
            parts.append(f"{what} {r['estimate'] if r['estimate'] is not None else 'not reached'} "
                         f"[{r['ci_low']}, {hi}]{extra}")
    if "note" in e:
        parts.append(f"no interval: {e['note']}")
    return f"  {h['mode']} intervals (95%, topic groups): " + "; ".join(parts) if parts else ""


def _fmt(x, pct=True) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{100 * x:.1f}%" if pct else f"{x:.3g}"


def _line(h: dict, thr: float) -> str:
    c, rnd, ctl = h["cell"], h["random"], h["control_layer"]
    what = f"{h['mode']} ({'base' if c['side'] == 'base' else 'tuned'}), {h['kind']} handle at L{h['layer']}"
    at = [k for k in c if k.startswith("ppl_change_pct_unmasked_at_")]
    side = f"neutral ppl {c.get('ppl_change_pct_unmasked', float('nan')):+.2f}%" + \
        (f" (at the patched token {c[at[0]]:+.1f}%)" if at else "") + \
        f", MC {-c.get('mc_drop_pp_unmasked', 0.0):+.1f} pt"
    ctrl = f"random basis of the same k: {_fmt(rnd and rnd['test_share'])}; at control layer: " \
           f"{_fmt(ctl and ctl['test_share'])}"
    if h["minimal_k"] is None:
        return f"{what}: none does: no k closes >= {100 * thr:.0f}% of the gap on dev within the side-effect " \
               f"thresholds (best on dev: k={c['k']}, {_fmt(c['dev_share'])} on dev, {_fmt(c['test_share'])} on " \
               f"test, {side}); {ctrl}"
    return f"{what}: minimal k = {h['minimal_k']} (chosen on dev, where it closes {_fmt(c['dev_share'])}) closes " \
           f"{_fmt(c['test_share'])} of the gap on held-out test prompts (alpha {c['alpha']:g} chosen on dev; " \
           f"{side}); the effect saturates (>= 90% of its best on dev) at k = {h['k_saturation']}; {ctrl}"


def _transfer(chosen: list[dict], h: dict, lang: str | None) -> list[dict]:
    """The same handle fitted on ``lang`` prompts only, read on every language, beside the all-language one."""
    if not lang:
        return []
    out = []
    for fit_lang in (None, lang):
        r = next(iter(_pick(chosen, layer=h["layer"], basis_layer=h["layer"], kind=h["kind"], mode=h["mode"],
                            k=h["cell"]["k"], fit_lang=fit_lang)), None)
        if r is not None:
            out.append({"handle_fit_on": fit_lang or "all languages", "mode": h["mode"], "layer": h["layer"],
                        "kind": h["kind"], "k": r["k"], "alpha": r["alpha"], **{f"share_{g}": s for g, s in
                                                                                r["test_share_by_lang"].items()}})
    return out


def _handles(study, chosen: list[dict], heads: list[dict], opts, meta: dict) -> list[str]:
    bases, saved = study.run.read_tensors(BASES), []
    for h in heads:
        c = h["cell"]
        name = f"handles/L{c['layer']}_{opts.site}_{c['kind']}_k{c['k']}_{c['mode']}"
        prov = {"pair": study.pair.name, "base": str(study.pair.base), "tuned": str(study.pair.tuned),
                "kind": c["kind"], "fit_prompts": opts.n_fit, "seed": study.seed, "dev_share": c["dev_share"],
                "test_share": c["test_share"], "measure": opts.measure, "positions": opts.positions,
                "side_effects": {k: v for k, v in c.items() if k.startswith(("ppl_", "mc_"))}}
        h = handle_of(c, bases, opts.site)
        h.provenance = prov
        h.save(study.run.file(name))
        saved.append(name)
    return saved


def summarise(study, opts) -> dict:
    run = study.run
    meta, prompts = run.read_json("rq3_cells.json"), run.read_json("rq3_prompts.json")
    lens = run.read_json("rq3_bases.json") if run.exists("rq3_bases.json") else {}
    gap = meta["gap_mean"]
    head = {"pair": study.pair.name, "layers / control": f"{prompts['layers']} / {prompts['control_layer']}",
            "fit / dev / test prompts": f"{len(prompts['fit'])} / {len(prompts['dev'])} / {len(prompts['test'])}",
            "clean KL(tuned || base) / KL(base || tuned)": f"{gap['base']:.4g} / {gap['tuned']:.4g} nats"}
    out = {"title": "RQ3 — causal handle: rank-k steering and ablation", "headline": head, "gap_kl": gap,
           "options": {k: getattr(opts, k) for k in opts.__dataclass_fields__}, "logit_lens": lens}
    lines = [out["title"], ""] + [f"{k}: {v}" for k, v in head.items()] + [""]
    if meta["nothing_to_steer"] or not meta["handles"]:
        msg = (f"nothing to steer: the two models do not differ on these prompts (mean KL {max(gap.values()):.2g} "
               f"nats <= --min-gap-kl {opts.min_gap_kl:g}); no share of a gap is defined") if meta["nothing_to_steer"] \
            else "no handle could be built (see rq3_bases.json: " + "; ".join(
                f"{k}: {v['skipped']}" for k, v in lens.items() if "skipped" in v) + ")"
        out.update(result={"status": "nothing to steer" if meta["nothing_to_steer"] else "no handle",
                           "minimal_k": None, "text": msg}, table=[])
        head["result"] = out["summary"] = msg
        lines.append(msg)
    else:
        rows = _rows(meta, run.read_tensors(SWEEP), run.read_json("rq3_side.json")["rows"], opts)
        chosen = choose_alpha(rows)
        sweep = run.read_tensors(SWEEP)
        heads = [h for m in opts.modes if (h := _headline(chosen, m, prompts["layers"], prompts["control_layer"],
                                                           opts.gap_threshold))]
        for h in heads:
            h["estimates"] = estimates(h, rows, sweep, meta, opts)
        mins = [h["minimal_k"] for h in heads if h["minimal_k"] is not None]
        status = "found" if mins else "none does"
        result = {"status": status, "minimal_k": min(mins) if mins else None,
                  "by_mode": {h["mode"]: {k: v for k, v in h.items() if not k.endswith("curve")} for h in heads},
                  "text": [_line(h, opts.gap_threshold) for h in heads]}
        # missing or undefined evidence never counts as within the thresholds: say so where it decided
        result["reasons"] = {h["mode"]: "side effects not measured or undefined (no neutral prompts or MC items, "
                             "or NaN): no k counts as within the thresholds" if not R.within(h["cell"], math.inf, math.inf) else
                             "the test share is undefined" for h in heads if h["minimal_k"] is None and
                             (not R.within(h["cell"], math.inf, math.inf) or h["cell"]["test_share"] is None)}
        result["text"] += [f"{m}: not found because {why}" for m, why in result["reasons"].items()]
        result["text"] += [line for h in heads if (line := _est_line(h))]
        result["rank"] = {k[5:]: v for k, v in lens.items() if k.startswith("rank.")}
        result["text"] += _rank_lines(lens)
        transfer = [t for h in heads for t in _transfer(chosen, h, opts.transfer_lang if prompts["fit_lang"] else None)]
        out.update(result=result, table=rows, chosen=chosen, transfer=transfer, summary=" ".join(result["text"]),
                   handles=_handles(study, chosen, heads, opts, meta),
                   tables={"alpha chosen on dev, per layer / handle / mode / k (test shares)": [
                       {k: r.get(k) for k in ("layer", "basis_layer", "kind", "fit_lang", "mode", "k", "alpha",
                                              "dev_share", "test_share", "ppl_change_pct_unmasked",
                                              "mc_drop_pp_unmasked", "within")} for r in chosen],
                       "transfer": transfer})
        head["minimal k"] = result["minimal_k"] if mins else \
            f"none does (>= {100 * opts.gap_threshold:.0f}% of the gap)"
        lines += result["text"]
        if transfer:
            lines += ["", f"transfer (handle fitted on {opts.transfer_lang} prompts; share of the gap per test "
                          "language):"]
            lines += ["  " + ", ".join(f"{k}={_fmt(v) if k.startswith('share_') else v}" for k, v in t.items())
                      for t in transfer]
        if heads:
            series = {f"{h['mode']} ({h['kind']}, L{h['layer']})": h["curve"] for h in heads}
            series.update({f"{h['mode']} random basis": h["random_curve"] for h in heads})
            plot_steer_vs_k({name: ([r["k"] for r in cur], [r["test_share"] for r in cur],
                                    [r.get("ppl_change_pct_unmasked") for r in cur]) for name, cur in series.items()},
                            run.figure("steer_vs_k.png"), threshold=opts.gap_threshold, max_side=opts.max_ppl_pct)
            out["figures"] = {"steer_vs_k.png": "share of the gap closed vs k (test), side effects below"}
    for key, info in lens.items():
        if "lens" in info and "@" not in key and not key.startswith("random"):
            lines.append(f"logit lens {key}: " + " | ".join(
                f"u{i}: +[{', '.join(x.strip() for x in v['promoted'][:5])}] "
                f"-[{', '.join(x.strip() for x in v['suppressed'][:5])}]"
                for i, v in enumerate(info["lens"])))
    run.write_json("rq3.json", out)
    atomic_write_text(run.file("rq3_summary.txt"), "\n".join(lines) + "\n")
    return out
