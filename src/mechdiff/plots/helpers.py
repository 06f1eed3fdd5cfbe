"""Shared matplotlib plumbing for the figures: the bare Agg `Figure` set-up (`_new_fig`, `_fig`), the
atomic PNG write (`_save`), value coercion (`_arr`: None -> NaN, drawn as a gap), axis ticks, the log
``1 - CKA`` axis, the bar charts' common tail (`_finish_bars`) and the "not run" placeholder panel
(`_empty`). No figures are defined here.
"""
from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mechdiff.atomic import atomic_write_bytes
from mechdiff.errors import DataError

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


def _finish_bars(fig: Figure, ax: Any, path: str | os.PathLike, xlabel: str, ylabel: str, title: str) -> Path:
    """The common tail of the bar charts: axis labels, title, y grid, legend, then `_save`."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _fig(n: tuple[int, int], w: float, h: float) -> tuple[Figure, list]:
    fig = Figure(figsize=(w, h), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(n[0], n[1], i + 1) for i in range(n[0] * n[1])]


def _ticks(ax: Any, axis: str, n: int, labels: Sequence[Any] | None) -> None:
    step = max(1, int(math.ceil(n / 24)))
    pos = list(range(0, n, step))
    lab = [str(labels[p]) if labels is not None else str(p) for p in pos]
    if axis == "x":
        ax.set_xticks(pos, lab, fontsize=7)
    else:
        ax.set_yticks(pos, lab, fontsize=7)


CKA_FLOOR = 1e-6   # 1 - CKA is drawn on a log axis and clipped here (identical layers give 0)


def _gap(a: np.ndarray) -> np.ndarray:
    """1 - CKA, clipped at :data:`CKA_FLOOR` for the log axis (a 0.97-1.00 signal spans decades there)."""
    return np.clip(1.0 - a, CKA_FLOOR, None)


def _cka_axis(ax: Any) -> None:
    ax.set_yscale("log")
    ax.set_ylabel(f"1 - CKA (log; 0 = identical, clipped at {CKA_FLOOR:g})")
    lo, hi = ax.get_ylim()
    ax.set_ylim(max(lo, CKA_FLOOR / 2), max(hi, 2.0))


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
