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


def plot_cka_curve(layers: Sequence[int], debiased: Sequence[float],
                   ci_low: Sequence[float] | None, ci_high: Sequence[float] | None,
                   biased: Sequence[float] | None, null_mean: Sequence[float] | float | None,
                   null_sd: Sequence[float] | float | None, path: str | os.PathLike,
                   title: str = "CKA between base and tuned, by layer") -> Path:
    """Debiased CKA per layer with its CI band, biased CKA dashed, null (permutation) mean +- 2 sd
    as a grey band. Optional series may be None."""
    x = _arr(layers, name="layers")
    n = len(x)
    deb = _arr(debiased, n, "debiased")
    fig, ax = _new_fig()
    if null_mean is not None:
        nm = _arr(null_mean, n, "null_mean")
        ns = _arr(null_sd, n, "null_sd") if null_sd is not None else np.zeros(n)
        ax.fill_between(x, nm - 2 * ns, nm + 2 * ns, color="0.6", alpha=0.35, lw=0,
                        label="null (shuffled) mean ± 2 sd")
        ax.plot(x, nm, color="0.45", lw=1, ls=":")
    if ci_low is not None and ci_high is not None:
        ax.fill_between(x, _arr(ci_low, n, "ci_low"), _arr(ci_high, n, "ci_high"),
                        color="C0", alpha=0.25, lw=0, label="debiased 95% CI")
    ax.plot(x, deb, color="C0", marker="o", ms=3.5, lw=1.8, label="debiased CKA")
    if biased is not None:
        ax.plot(x, _arr(biased, n, "biased"), color="C1", ls="--", lw=1.4, label="biased CKA")
    ax.set_xlabel("layer")
    ax.set_ylabel("linear CKA (base vs tuned)")
    ax.set_title(title)
    finite = deb[np.isfinite(deb)]
    lo = min(0.0, float(finite.min()) - 0.05) if finite.size else 0.0
    ax.set_ylim(lo, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
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
