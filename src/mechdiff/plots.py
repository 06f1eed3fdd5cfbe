"""Figures for a run. Each function writes one PNG (atomically) and returns its path.

Figures are drawn on a bare `matplotlib.figure.Figure` with the Agg canvas: no pyplot, no global
backend switch, no figure leaks in long sessions or notebooks. NaN values are drawn as gaps.
Put figures under the run's ``figures/`` directory (`RunDir.figure(name)`) so that `report.py`
embeds them.
"""
from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mechdiff.atomic import atomic_write_bytes
from mechdiff.errors import DataError

__all__ = ["plot_cka_curve", "plot_cka_matrix", "plot_patch_kl", "plot_map_quality",
           "plot_drop_heatmap"]

_DPI = 130


def _arr(x: Any, n: int | None = None, name: str = "values") -> np.ndarray | None:
    """float64 array (None -> None; None entries -> NaN); broadcast scalars to length n."""
    if x is None:
        return None
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    a = np.asarray([np.nan if v is None else v for v in np.ravel(np.asarray(x, dtype=object))],
                   dtype=np.float64).reshape(np.shape(x))
    if n is not None:
        if a.ndim == 0:
            a = np.full(n, float(a))
        if a.shape != (n,):
            raise DataError(f"{name}: expected {n} values (one per layer), got shape {a.shape}")
    return a


def _new_fig(w: float = 7.5, h: float = 4.2) -> tuple[Figure, Any]:
    fig = Figure(figsize=(w, h), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    return fig, ax


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    fig.clear()
    return atomic_write_bytes(Path(path), buf.getvalue())


CKA_FLOOR = 1e-6   # 1 - CKA is drawn on a log axis and clipped here (identical layers give 0)


def _gap(a: np.ndarray) -> np.ndarray:
    """1 - CKA, clipped at :data:`CKA_FLOOR` for the log axis (a 0.97-1.00 signal spans decades there)."""
    return np.clip(1.0 - a, CKA_FLOOR, None)


def _cka_axis(ax: Any) -> None:
    ax.set_yscale("log")
    ax.set_ylabel(f"1 - CKA (log; 0 = identical, clipped at {CKA_FLOOR:g})")
    lo, hi = ax.get_ylim()
    ax.set_ylim(max(lo, CKA_FLOOR / 2), max(hi, 2.0))


def plot_cka_curve(layers: Sequence[int], debiased: Sequence[float],
                   ci_low: Sequence[float] | None, ci_high: Sequence[float] | None,
                   biased: Sequence[float] | None, null_mean: Sequence[float] | float | None,
                   null_sd: Sequence[float] | float | None, path: str | os.PathLike,
                   title: str = "CKA between base and tuned, by layer") -> Path:
    """1 - CKA per layer on a log axis (so 0.97-1.00 is readable next to the null near 0): debiased
    with its CI band, biased dashed, the row-shuffled independence null (mean +- 2 sd) as a grey band.
    Optional series may be None."""
    x = _arr(layers, name="layers")
    n = len(x)
    deb = _arr(debiased, n, "debiased")
    fig, ax = _new_fig()
    if null_mean is not None:
        nm = _arr(null_mean, n, "null_mean")
        ns = _arr(null_sd, n, "null_sd") if null_sd is not None else np.zeros(n)
        ax.fill_between(x, _gap(nm + 2 * ns), _gap(nm - 2 * ns), color="0.6", alpha=0.35, lw=0,
                        label="independence null (rows shuffled) mean ± 2 sd")
        ax.plot(x, _gap(nm), color="0.45", lw=1, ls=":")
    if ci_low is not None and ci_high is not None:
        ax.fill_between(x, _gap(_arr(ci_high, n, "ci_high")), _gap(_arr(ci_low, n, "ci_low")),
                        color="C0", alpha=0.25, lw=0, label="debiased 95% CI")
    ax.plot(x, _gap(deb), color="C0", marker="o", ms=3.5, lw=1.8, label="debiased CKA")
    if biased is not None:
        ax.plot(x, _gap(_arr(biased, n, "biased")), color="C1", ls="--", lw=1.4, label="biased CKA")
    ax.set_xlabel("layer")
    ax.set_title(title)
    _cka_axis(ax)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def plot_cka_matrix(matrix: Any, path: str | os.PathLike, xlabel: str = "tuned layer",
                    ylabel: str = "base layer", title: str = "CKA across layers",
                    xticks: Sequence[Any] | None = None,
                    yticks: Sequence[Any] | None = None) -> Path:
    """Heat map of CKA between every pair of layers (rows = ylabel model, cols = xlabel model),
    for models of different depth. Cells are annotated when the matrix is small."""
    m = _arr(matrix, name="matrix")
    if m.ndim != 2:
        raise DataError(f"plot_cka_matrix: expected a 2-D matrix, got shape {m.shape}")
    r, c = m.shape
    fig, ax = _new_fig(max(5.0, min(12.0, 0.35 * c + 2.5)), max(4.0, min(11.0, 0.3 * r + 2.0)))
    im = ax.imshow(np.ma.masked_invalid(m), origin="lower", aspect="auto", cmap="viridis",
                   vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, label="CKA")
    _ticks(ax, "x", c, xticks)
    _ticks(ax, "y", r, yticks)
    if r * c <= 144:
        for i in range(r):
            for j in range(c):
                if math.isfinite(m[i, j]):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if m[i, j] < 0.6 else "black")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _save(fig, path)


def _ticks(ax: Any, axis: str, n: int, labels: Sequence[Any] | None) -> None:
    step = max(1, int(math.ceil(n / 24)))
    pos = list(range(0, n, step))
    lab = [str(labels[p]) if labels is not None else str(p) for p in pos]
    if axis == "x":
        ax.set_xticks(pos, lab, fontsize=7)
    else:
        ax.set_yticks(pos, lab, fontsize=7)


def plot_patch_kl(layers: Sequence[int],
                  kl_by_direction: Mapping[str, tuple[Sequence[float], Sequence[float] | None]],
                  path: str | os.PathLike, planted_layers: Sequence[int] | None = None,
                  title: str = "Next-token KL after patching, by layer",
                  ylabel: str = "KL (nats), mean ± sd over prompts") -> Path:
    """Grouped bars per layer, one bar per patch direction (e.g. 'base->tuned', 'tuned->base'),
    error bars = std. Layers in `planted_layers` (ground truth) are shaded."""
    x = _arr(layers, name="layers")
    n = len(x)
    if not kl_by_direction:
        raise DataError("plot_patch_kl: no directions to plot")
    k = len(kl_by_direction)
    width = 0.8 / k
    fig, ax = _new_fig(max(7.0, min(16.0, 0.3 * n * k + 3)), 4.2)
    idx = np.arange(n)
    if planted_layers:
        planted = set(int(p) for p in planted_layers)
        first = True
        for i, layer in enumerate(x):
            if int(layer) in planted:
                ax.axvspan(i - 0.5, i + 0.5, color="gold", alpha=0.25, lw=0,
                           label="planted layer" if first else None)
                first = False
    for j, (direction, (mean, std)) in enumerate(kl_by_direction.items()):
        mu = _arr(mean, n, f"{direction} mean")
        sd = _arr(std, n, f"{direction} std") if std is not None else None
        ax.bar(idx - 0.4 + width * (j + 0.5), mu, width, yerr=sd, capsize=2 if n <= 40 else 0,
               label=str(direction), color=f"C{j}", error_kw={"lw": 0.8})
    _ticks(ax, "x", n, [int(v) if float(v).is_integer() else v for v in x])
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_xlabel("patched layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_map_quality(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike,
                     title: str = "Map quality (held-out)") -> Path:
    """Bars of R^2 (variance-weighted) and CKA(mapped, tuned) per map; rows need
    {label, r2_vw, cka} (None -> missing bar)."""
    if not rows:
        raise DataError("plot_map_quality: no rows")
    labels = [str(r.get("label", i)) for i, r in enumerate(rows)]
    r2 = _arr([r.get("r2_vw") for r in rows], name="r2_vw")
    cka = _arr([r.get("cka") for r in rows], name="cka")
    n = len(rows)
    fig, ax = _new_fig(max(6.0, min(16.0, 0.6 * n + 3)), 4.2)
    idx = np.arange(n)
    ax.bar(idx - 0.2, r2, 0.4, label="R² (variance-weighted)", color="C0")
    ax.bar(idx + 0.2, cka, 0.4, label="CKA(mapped, tuned)", color="C2")
    ax.axhline(0, color="0.3", lw=0.8)
    ax.set_xticks(idx, labels, rotation=30 if n > 4 else 0, ha="right" if n > 4 else "center",
                  fontsize=8)
    finite = np.concatenate([r2[np.isfinite(r2)], cka[np.isfinite(cka)]])
    ax.set_ylim(min(0.0, float(finite.min()) - 0.05) if finite.size else 0.0, 1.05)
    ax.set_xlabel("map (layer / site / kind)")
    ax.set_ylabel("score (1 = perfect)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_drop_heatmap(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike,
                      title: str = "KL drop (%) from mapped patch, by alpha") -> Path:
    """Heat map of drop_pct: rows = (layer, site), columns = alpha (numbers or labels like "auto").
    rows need {layer, site, alpha, drop_pct}; repeated cells keep the last value."""
    if not rows:
        raise DataError("plot_drop_heatmap: no rows")
    keys = sorted({(int(r["layer"]), str(r["site"])) for r in rows})
    # alpha may be numeric or a label such as "auto": numbers first (ascending), then labels.
    def akey(a):
        try:
            return (0, float(a), "")
        except (TypeError, ValueError):
            return (1, 0.0, str(a))
    alphas = sorted({str(r["alpha"]) for r in rows}, key=akey)
    m = np.full((len(keys), len(alphas)), np.nan)
    for r in rows:
        v = r.get("drop_pct")
        m[keys.index((int(r["layer"]), str(r["site"]))), alphas.index(str(r["alpha"]))] = (
            np.nan if v is None else float(v))
    finite = m[np.isfinite(m)]
    lim = max(1.0, float(np.abs(finite).max())) if finite.size else 1.0
    fig, ax = _new_fig(max(5.0, min(12.0, 0.9 * len(alphas) + 3)),
                       max(3.0, min(11.0, 0.4 * len(keys) + 1.8)))
    im = ax.imshow(np.ma.masked_invalid(m), aspect="auto", cmap="RdBu", vmin=-lim, vmax=lim,
                   interpolation="nearest")
    fig.colorbar(im, ax=ax, label="drop % (positive = mapped patch closer to tuned)")
    ax.set_xticks(range(len(alphas)), alphas)
    ax.set_yticks(range(len(keys)), [f"L{layer} {site}" for layer, site in keys], fontsize=8)
    if m.size <= 400:
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                if math.isfinite(m[i, j]):
                    ax.text(j, i, f"{m[i, j]:.1f}", ha="center", va="center", fontsize=7,
                            color="white" if abs(m[i, j]) > 0.6 * lim else "black")
    ax.set_xlabel("alpha")
    ax.set_ylabel("layer / site")
    ax.set_title(title)
    return _save(fig, path)


def plot_steer_vs_k(series: Mapping[str, tuple[Sequence[int], Sequence[Any], Sequence[Any]]],
                    path: str | os.PathLike, threshold: float | None = None, max_side: float | None = None,
                    title: str = "Rank-k handle: share of the base-to-tuned gap closed (test prompts)") -> Path:
    """RQ3's effect-vs-k figure. ``series``: ``{label: (ks, share, side_effect_pct)}`` (None -> gap).
    Top: share of the gap closed vs k (steer up in the base, ablate down in the tuned; labels with
    "random" dashed), the target ``threshold`` dotted. Bottom: the side effect (neutral perplexity
    change, %) per k with the allowed band ``[0, max_side]`` shaded."""
    if not series:
        raise DataError("plot_steer_vs_k: no series to plot")
    fig = Figure(figsize=(7.5, 6.0), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    top, bot = fig.add_subplot(2, 1, 1), fig.add_subplot(2, 1, 2, sharex=None)
    colours: dict[str, str] = {}
    for label, (ks, share, side) in series.items():
        x = _arr(ks, name="ks")
        mode = label.split()[0]
        c = colours.setdefault(mode, f"C{len(colours)}")
        ls, mk = ("--", "x") if "random" in label else ("-", "o")
        top.plot(x, 100 * _arr(share, len(x), f"{label} share"), color=c, ls=ls, marker=mk, ms=4, lw=1.6, label=label)
        bot.plot(x, _arr(side, len(x), f"{label} side effect"), color=c, ls=ls, marker=mk, ms=4, lw=1.4, label=label)
    if threshold is not None:
        top.axhline(100 * threshold, color="0.3", ls=":", lw=1, label=f"threshold {100 * threshold:.0f}%")
    top.axhline(0, color="0.5", lw=0.8)
    top.set_ylabel("gap closed / reopened (%)")
    top.set_title(title)
    top.grid(alpha=0.3)
    top.legend(fontsize=7)
    if max_side is not None:
        bot.axhspan(0, max_side, color="C2", alpha=0.15, lw=0, label=f"side-effect band (<= {max_side:g}%)")
    ks_all = sorted({int(k) for ks, _, _ in series.values() for k in ks})
    for ax in (top, bot):
        ax.set_xticks(ks_all)
    bot.set_xlabel("rank k")
    bot.set_ylabel("neutral perplexity change (%)")
    bot.grid(alpha=0.3)
    bot.legend(fontsize=7)
    return _save(fig, path)


# ---- RQ4 (heads) ---------------------------------------------------------------------------------

def plot_head_hist(per_layer: Mapping[int, Mapping[str, Sequence[float]]], path: str | os.PathLike,
                   xlabel: str = "head importance", title: str = "Head importance per layer") -> Path:
    """One panel per layer (at most 12): histograms of the heads' importance, one series per model
    (``per_layer = {layer: {"base": [H], "tuned": [H]}}``), overlaid with shared bins."""
    if not per_layer:
        raise DataError("plot_head_hist: no layers")
    layers = list(per_layer)[:12]
    cols = min(4, len(layers))
    rows = int(math.ceil(len(layers) / cols))
    fig = Figure(figsize=(2.6 * cols + 1, 2.2 * rows + 0.6), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    for i, layer in enumerate(layers):
        ax = fig.add_subplot(rows, cols, i + 1)
        series = {k: _arr(v, name=f"layer {layer} {k}") for k, v in per_layer[layer].items()}
        vals = np.concatenate([v[np.isfinite(v)] for v in series.values()])
        lo, hi = (float(vals.min()), float(vals.max())) if vals.size else (0.0, 1.0)
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-9, 13)
        for j, (name, v) in enumerate(series.items()):
            ax.hist(v[np.isfinite(v)], bins=bins, alpha=0.55, color=f"C{j}", label=name)
        ax.set_title(f"layer {layer}", fontsize=8)
        ax.tick_params(labelsize=6)
        if i == 0:
            ax.legend(fontsize=6)
    fig.supxlabel(xlabel, fontsize=8)
    fig.supylabel("heads", fontsize=8)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def plot_churn_bars(layers: Sequence[int], churn_by_measure: Mapping[str, Sequence[float]],
                    overall: Mapping[str, float], path: str | os.PathLike,
                    title: str = "Head churn: share of heads whose importance changed") -> Path:
    """Grouped bars per layer (one bar per measurement) plus an "all" group with the overall churn."""
    if not churn_by_measure:
        raise DataError("plot_churn_bars: no measurements")
    n = len(layers) + 1
    k = len(churn_by_measure)
    width = 0.8 / k
    fig, ax = _new_fig(max(6.0, min(14.0, 0.5 * n * k + 3)), 4.0)
    idx = np.arange(n)
    for j, (name, per_layer) in enumerate(churn_by_measure.items()):
        vals = np.append(_arr(per_layer, len(layers), name), float(overall.get(name, np.nan)))
        ax.bar(idx - 0.4 + width * (j + 0.5), 100 * vals, width, color=f"C{j}", label=name)
    ax.set_xticks(idx, [str(l) for l in layers] + ["all"], fontsize=8)
    ax.set_xlabel("layer")
    ax.set_ylabel("% of heads")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_cumulative_topk(curves: Mapping[str, tuple[Sequence[int], Sequence[float], Sequence[float] | None]],
                         path: str | os.PathLike, ylabel: str = "effect on the readout",
                         reference: Mapping[str, float] | None = None,
                         title: str = "Cumulative effect of the top-k heads") -> Path:
    """Mean effect (± sd band) against k for each curve ``{label: (ks, mean, sd)}``; ``reference``
    ``{label: value}`` draws dotted horizontal lines (e.g. every head swapped)."""
    if not curves:
        raise DataError("plot_cumulative_topk: no curves")
    fig, ax = _new_fig(7.0, 4.2)
    for j, (label, (ks, mean, sd)) in enumerate(curves.items()):
        x = _arr(ks, name="ks")
        mu = _arr(mean, len(x), f"{label} mean")
        ax.plot(x, mu, color=f"C{j}", marker="o", ms=3.5, lw=1.6, label=label)
        if sd is not None:
            s = _arr(sd, len(x), f"{label} sd")
            ax.fill_between(x, mu - s, mu + s, color=f"C{j}", alpha=0.15, lw=0)
    for j, (label, v) in enumerate((reference or {}).items()):
        ax.axhline(float(v), color=f"C{j + len(curves)}", ls=":", lw=1.2, label=label)
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_xlabel("k (heads, by rank)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


# ---- report figures (Figures A-D of the study report; several runs overlay for `mechdiff compare`) --
# Each takes ``runs``: a list of per-run dicts (one run: the report; several: the comparison) with the
# keys named in the docstring; a missing part is skipped (a panel says "not run").

def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def _fig(n: tuple[int, int], w: float, h: float) -> tuple[Figure, list]:
    fig = Figure(figsize=(w, h), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(n[0], n[1], i + 1) for i in range(n[0] * n[1])]


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
