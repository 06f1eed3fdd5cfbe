"""RQ1 figures (where base and tuned diverge): 1 - CKA per layer against its independence null, the
layer-by-layer CKA matrix for models of different depth, and next-token KL after patching by layer.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from mechdiff.errors import DataError
from mechdiff.plots.helpers import _arr, _cka_axis, _finish_bars, _gap, _new_fig, _save, _ticks

__all__ = ["plot_cka_curve", "plot_cka_matrix", "plot_patch_kl"]


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
    return _finish_bars(fig, ax, path, "patched layer", ylabel, title)
