"""RQ4 figures (attention heads): per-layer histograms of head importance in both models, head churn
per layer and measurement, and the cumulative effect of the top-k heads.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mechdiff.errors import DataError
from mechdiff.plots.helpers import _DPI, _arr, _finish_bars, _new_fig, _save

__all__ = ["plot_head_hist", "plot_churn_bars", "plot_cumulative_topk"]


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
    return _finish_bars(fig, ax, path, "layer", "% of heads", title)


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
