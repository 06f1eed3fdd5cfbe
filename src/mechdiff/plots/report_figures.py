"""Figures A-D of the study report; several runs overlay for `mechdiff compare`. Each takes ``runs``: a
list of per-run dicts (one run: the report; several: the comparison) with the keys named in the
docstring; a missing part is skipped (a panel says "not run").
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mechdiff.plots.helpers import _DPI, _arr, _cka_axis, _empty, _fig, _gap, _save

__all__ = ["plot_fig_a", "plot_fig_b", "plot_fig_c", "plot_fig_d"]


def _mark_layers(ax: Any, r: Mapping[str, Any], colour: str, single: bool) -> None:
    for layer in r.get("planted") or []:
        ax.axvspan(layer - 0.5, layer + 0.5, color="gold", alpha=0.18 if single else 0.08, lw=0, zorder=0)
    if r.get("entry") is not None:
        ax.axvline(r["entry"], color=colour, ls="--", lw=1.1)
    if single and r.get("control") is not None:
        ax.axvline(r["control"], color="0.5", ls=":", lw=1.1)


def plot_fig_a(runs: Sequence[Mapping[str, Any]], path: str | os.PathLike,
               title: str = "Figure A — where base and tuned diverge") -> Path:
    """Top: 1 - debiased CKA per layer on a log axis (a 0.97-1.00 signal stays readable) with its CI band
    and the row-shuffled independence null (mean ± 2 sd, grey).
    Bottom: patch KL per layer (mean over prompts and directions, ± 1 SE over topic groups) against the
    self-patch floor; the entry layer dashed, the control layer dotted, chosen layers dark, planted
    layers shaded. ``runs``: ``{label, cka: {layers, debiased, ci_low, ci_high, null_mean, null_sd},
    patch: {layers, mean, se, floor}, chosen, control, entry, planted}``."""
    fig, (top, bot) = _fig((2, 1), 7.8, 6.4)
    single = len(runs) == 1
    any_cka = any_patch = False
    for j, r in enumerate(runs):
        c, lab = f"C{j}", str(r.get("label", j))
        cka = r.get("cka")
        if cka and cka.get("layers"):
            any_cka = True
            x = _arr(cka["layers"], name="layers")
            n = len(x)
            if cka.get("null_mean") is not None:
                nm = _arr(cka["null_mean"], n, "null_mean")
                ns = _arr(cka.get("null_sd") if cka.get("null_sd") is not None else 0.0, n, "null_sd")
                top.fill_between(x, _gap(nm + 2 * ns), _gap(nm - 2 * ns), color="0.6", alpha=0.3, lw=0,
                                 label="independence null (rows shuffled) ± 2 sd" if j == 0 else None)
            if cka.get("ci_low") is not None and cka.get("ci_high") is not None:
                top.fill_between(x, _gap(_arr(cka["ci_high"], n, "ci_high")), _gap(_arr(cka["ci_low"], n, "ci_low")),
                                 color=c, alpha=0.2, lw=0)
            top.plot(x, _gap(_arr(cka["debiased"], n, "debiased")), color=c, marker="o", ms=3, lw=1.6,
                     label=f"{lab}: debiased CKA (95% CI)" if not single else "debiased CKA (95% CI band)")
            _mark_layers(top, r, c, single)
        p = r.get("patch")
        if p and p.get("layers"):
            any_patch = True
            x = _arr(p["layers"], name="layers")
            n = len(x)
            mu, se = _arr(p["mean"], n, "mean"), _arr(p.get("se") if p.get("se") is not None else 0.0, n, "se")
            se = np.where(np.isfinite(se), se, 0.0)
            if single:
                chosen = set(r.get("chosen") or [])
                cols = ["C3" if int(l) in chosen else ("0.55" if int(l) == r.get("control") else "C0") for l in x]
                from matplotlib.patches import Patch as _Swatch
                bot.bar(x, mu, 0.8, yerr=se, color=cols, capsize=2 if n <= 40 else 0, error_kw={"lw": 0.8},
                        zorder=2)
                bot.add_artist(bot.legend(handles=[_Swatch(color=c, label=t) for c, t in (
                    ("C0", "patch KL"), ("C3", "chosen layers"), ("0.55", "control layer"))],
                    fontsize=7, loc="upper center"))
            else:
                bot.errorbar(x, mu, yerr=se, color=c, marker="o", ms=3, lw=1.4, capsize=2, label=lab)
            if p.get("floor") is not None:
                bot.axhline(float(p["floor"]), color=c if not single else "0.3", ls=":", lw=1,
                            label="self-patch floor" if j == 0 else None)
            _mark_layers(bot, r, c, single)
    if any_cka:
        _cka_axis(top)
        top.grid(alpha=0.3)
        top.legend(fontsize=7, loc="lower left")
    else:
        _empty(top, "no CKA (RQ1 not run)")
    if any_patch:
        bot.set_xlabel("layer  (dashed: entry layer; dotted: control layer; shaded: planted layers)")
        bot.set_ylabel("patch KL (nats), mean ± SE")
        bot.grid(axis="y", alpha=0.3)
        bot.legend(fontsize=7, loc="upper left")
    else:
        _empty(bot, "no layer patching (RQ1 not run, or the models differ in shape)")
    top.set_title(title)
    return _save(fig, path)


def _grouped(ax: Any, labels: Sequence[str], series: Mapping[str, tuple[Sequence[Any], Sequence[Any] | None]],
             ylabel: str) -> None:
    n, k = len(labels), max(1, len(series))
    idx, width = np.arange(n), 0.8 / k
    for j, (name, (vals, err)) in enumerate(series.items()):
        v = _arr(vals, n, name)
        e = None if err is None else np.nan_to_num(_arr(err, n, name + " error"))
        ax.bar(idx - 0.4 + width * (j + 0.5), v, width, yerr=e, color=f"C{j}", label=name, capsize=2,
               error_kw={"lw": 0.8})
    tilt = n > 3 or max((len(str(x)) for x in labels), default=0) * n > 60
    ax.set_xticks(idx, labels, rotation=25 if tilt else 0, ha="right" if tilt else "center", fontsize=7)
    ax.axhline(0, color="0.3", lw=0.8)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)


def plot_fig_b(runs: Sequence[Mapping[str, Any]], path: str | os.PathLike,
               title: str = "Figure B — transport maps and mapped patching") -> Path:
    """Left: held-out R² and CKA(mapped, tuned) per map beside the identity map's R² and a map fitted on
    shuffled targets. Right: patch KL of the raw base state vs the mapped state (best alpha per layer
    and site) and the controls (bogus map, shuffled map, control-layer map), ± 1 SE over prompts.
    ``runs``: ``{label, maps: [{label, r2, cka, identity_r2, shuffle_r2}], patch: [{label, raw, raw_se,
    mapped, mapped_se}]}``."""
    fig, (left, right) = _fig((1, 2), 11.0, 4.4)
    multi = len(runs) > 1
    pre = lambda r, s: f"{r.get('label')}: {s}" if multi else str(s)  # noqa: E731
    maps = [(pre(r, m["label"]), m) for r in runs for m in r.get("maps") or []]
    if maps:
        _grouped(left, [m[0] for m in maps], {
            "R² (val)": ([m[1].get("r2") for m in maps], None),
            "CKA(mapped, tuned)": ([m[1].get("cka") for m in maps], None),
            "R² identity map": ([m[1].get("identity_r2") for m in maps], None),
            "R² shuffled-target map": ([m[1].get("shuffle_r2") for m in maps], None)}, "score (1 = perfect)")
        lo = min([0.0] + [float(v) for m in maps for v in (m[1].get("r2"), m[1].get("shuffle_r2"),
                                                            m[1].get("identity_r2")) if v is not None and v == v])
        left.set_ylim(max(-1.0, lo - 0.05), 1.05)
        left.set_title("map quality on held-out prompts", fontsize=9)
    else:
        _empty(left, "no maps (RQ2 not run)")
    rows = [(pre(r, p["label"]), p) for r in runs for p in r.get("patch") or []]
    if rows:
        _grouped(right, [p[0] for p in rows], {
            "raw base state": ([p[1].get("raw") for p in rows], [p[1].get("raw_se") for p in rows]),
            "mapped state": ([p[1].get("mapped") for p in rows], [p[1].get("mapped_se") for p in rows])},
            "KL(tuned clean || patched), nats")
        right.set_title("mapped vs raw patch (val); controls have no raw bar", fontsize=9)
    else:
        _empty(right, "no mapped patching (RQ2 not run)")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_fig_c(runs: Sequence[Mapping[str, Any]], path: str | os.PathLike,
               title: str = "Figure C — rank-k handle: effect vs k, side effects, head importance") -> Path:
    """Left top: share of the base-to-tuned gap closed on test prompts vs k (steer in the base, ablate in
    the tuned; random bases of the same k dashed; the target threshold dotted). Left bottom: the
    neutral-perplexity side effect per k with the allowed band shaded. Right: histogram of head
    importance in both models. ``runs``: ``{label, curves: {name: {k, share, side}}, threshold, max_side,
    heads: {base: [..], tuned: [..], xlabel}}``."""
    fig = Figure(figsize=(11.0, 6.0), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(2, 2)
    top, bot, hist = fig.add_subplot(gs[0, 0]), fig.add_subplot(gs[1, 0]), fig.add_subplot(gs[:, 1])
    multi, drawn, ks_all = len(runs) > 1, False, set()
    styles = {}
    for j, r in enumerate(runs):
        for name, cur in (r.get("curves") or {}).items():
            if not cur.get("k"):
                continue
            drawn = True
            x = _arr(cur["k"], name="k")
            ks_all |= {int(v) for v in x}
            mode = name.split()[0]
            c = f"C{j}" if multi else styles.setdefault(mode, f"C{len(styles)}")
            ls, mk = ("--", "x") if "random" in name else ("-", "o")
            lab = f"{r.get('label')}: {name}" if multi else name
            top.plot(x, 100 * _arr(cur["share"], len(x), name), color=c, ls=ls, marker=mk, ms=4, lw=1.5, label=lab)
            if cur.get("side") is not None and "random" not in name:
                bot.plot(x, _arr(cur["side"], len(x), name + " side"), color=c, ls=ls, marker=mk, ms=4, lw=1.3,
                         label=lab)
        if r.get("threshold") is not None and j == 0:
            top.axhline(100 * float(r["threshold"]), color="0.3", ls=":", lw=1,
                        label=f"threshold {100 * float(r['threshold']):.0f}%")
        if r.get("max_side") is not None and j == 0:
            bot.axhspan(-float(r["max_side"]), float(r["max_side"]), color="C2", alpha=0.15, lw=0,
                        label=f"allowed side effect (±{float(r['max_side']):g}%)")
    if drawn:
        top.axhline(0, color="0.5", lw=0.8)
        top.set_ylabel("gap closed (%)")
        top.grid(alpha=0.3)
        top.legend(fontsize=6)
        bot.set_xlabel("rank k")
        bot.set_ylabel("neutral perplexity change (%)")
        bot.grid(alpha=0.3)
        bot.legend(fontsize=6)
        for ax in (top, bot):
            ax.set_xticks(sorted(ks_all))
    else:
        _empty(top, "no steering sweep (RQ3 not run, or nothing to steer)")
        _empty(bot, "")
    hs = [(r, r.get("heads")) for r in runs if r.get("heads")]
    vals = [np.asarray([v for v in h.get(s) or [] if v is not None], dtype=float) for _, h in hs for s in ("base", "tuned")]
    vals = [v[np.isfinite(v)] for v in vals]
    if hs and any(v.size for v in vals):
        allv = np.concatenate(vals)
        lo, hi = float(allv.min()), float(allv.max())
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-9, 21)
        for j, (r, h) in enumerate(hs):
            for i, s in enumerate(("base", "tuned")):
                v = np.asarray([x for x in h.get(s) or [] if x is not None], dtype=float)
                lab = f"{r.get('label')}: {s}" if multi else s
                hist.hist(v[np.isfinite(v)], bins=bins, alpha=0.45, color=f"C{2 * j + i}", label=lab,
                          histtype="stepfilled" if not multi else "step", lw=1.5)
        hist.set_xlabel(hs[0][1].get("xlabel", "head importance"))
        hist.set_ylabel("heads")
        hist.set_title("head importance (chosen layers)", fontsize=9)
        hist.legend(fontsize=7)
    else:
        _empty(hist, "no head analysis (RQ4 not run)")
    top.set_title(title, fontsize=10)
    return _save(fig, path)


def plot_fig_d(runs: Sequence[Mapping[str, Any]], path: str | os.PathLike,
               title: str = "Figure D — head churn and the cumulative top-k effect") -> Path:
    """Left: churn per measurement (share of heads whose importance label changed; for swap/own the share
    of heads whose change moves the readout above the noise floor), one bar per run. Right: the readout
    change with the top-k heads ablated / patched together (± 1 sd over prompts). ``runs``: ``{label,
    churn: {measure: share}, cumulative: {name: {k, mean, sd}}, unit}``."""
    fig, (left, right) = _fig((1, 2), 11.0, 4.2)
    measures = list(dict.fromkeys(m for r in runs for m in (r.get("churn") or {})))
    if measures:
        _grouped(left, measures, {str(r.get("label", j)): ([100 * v if v is not None else None for v in
                                                             ((r.get("churn") or {}).get(m) for m in measures)], None)
                                  for j, r in enumerate(runs)}, "% of heads")
        left.set_title("churn per measurement", fontsize=9)
    else:
        _empty(left, "no head churn (RQ4 not run)")
    drawn = False
    for j, r in enumerate(runs):
        for i, (name, cur) in enumerate((r.get("cumulative") or {}).items()):
            if not cur.get("mean"):
                continue
            drawn = True
            k = np.arange(1, len(cur["mean"]) + 1)
            mu = _arr(cur["mean"], len(k), name)
            c = f"C{j}" if len(runs) > 1 else f"C{i}"
            ls = ["-", "--", ":", "-."][i % 4] if len(runs) > 1 else "-"
            lab = f"{r.get('label')}: {name}" if len(runs) > 1 else name
            right.plot(k, mu, color=c, ls=ls, marker="o", ms=3, lw=1.4, label=lab)
            if cur.get("sd") is not None:
                sd = np.nan_to_num(_arr(cur["sd"], len(k), name + " sd"))
                right.fill_between(k, mu - sd, mu + sd, color=c, alpha=0.12, lw=0)
    if drawn:
        right.axhline(0, color="0.5", lw=0.8)
        from matplotlib.ticker import MaxNLocator
        right.xaxis.set_major_locator(MaxNLocator(integer=True))
        right.set_xlabel("k (heads, by rank)")
        right.set_ylabel(f"effect on the readout ({runs[0].get('unit') or 'readout units'})")
        right.grid(alpha=0.3)
        right.legend(fontsize=6)
        right.set_title("cumulative top-k heads", fontsize=9)
    else:
        _empty(right, "no cumulative top-k curve (RQ4 not run)")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)
