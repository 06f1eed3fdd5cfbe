"""RQ3 figure (the rank-k causal handle): share of the base-to-tuned gap closed against k, with the
neutral-perplexity side effect per k underneath.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mechdiff.errors import DataError
from mechdiff.plots.helpers import _DPI, _arr, _save

__all__ = ["plot_steer_vs_k"]


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
