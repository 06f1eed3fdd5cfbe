"""The ``tokens`` stage's figure: per-token divergence along the response (mean with a 95% band), one
panel per responder, one line per run (the comparison overlays several runs)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mechdiff.errors import DataError
from mechdiff.plots.helpers import _DPI, _arr, _save

__all__ = ["plot_tokens_curve"]


def plot_tokens_curve(runs: Sequence[Mapping[str, Any]], path: str | os.PathLike,
                      ylabel: str = "KL(base || tuned), shared vocab (nats)") -> Path:
    """``runs``: ``[{"label", "curves": {responder: {"pos", "mean", "lo", "hi"}}}]``. One panel per
    responder (whose greedy response both models read), x = response position (0 = first response token)."""
    who = sorted({w for r in runs for w, c in (r.get("curves") or {}).items() if c.get("pos")})
    if not who:
        raise DataError("plot_tokens_curve: no curve to draw (no response rows)")
    fig = Figure(figsize=(7.5, 3.2 * len(who)), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    for i, w in enumerate(who):
        ax = fig.add_subplot(len(who), 1, i + 1)
        for j, r in enumerate(runs):
            c = (r.get("curves") or {}).get(w)
            if not c or not c.get("pos"):
                continue
            x = _arr(c["pos"], name="pos")
            ax.plot(x, _arr(c["mean"], len(x), "mean"), color=f"C{j}", lw=1.6, label=str(r.get("label", j)))
            ax.fill_between(x, _arr(c["lo"], len(x), "lo"), _arr(c["hi"], len(x), "hi"), color=f"C{j}",
                            alpha=0.2, lw=0)
        ax.set_title(f"along the {w} model's response (teacher-forced in both)")
        ax.set_xlabel("response position (tokens or aligned spans)")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)
