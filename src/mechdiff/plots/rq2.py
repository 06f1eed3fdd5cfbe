"""RQ2 figures (transport maps): held-out map quality per map, and the heat map of the KL drop from
mapped patching by (layer, site) and alpha.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from mechdiff.errors import DataError
from mechdiff.plots.helpers import _arr, _finish_bars, _new_fig, _save

__all__ = ["plot_map_quality", "plot_drop_heatmap"]


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
    return _finish_bars(fig, ax, path, "map (layer / site / kind)", "score (1 = perfect)", title)


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
