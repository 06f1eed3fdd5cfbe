"""Figures for a run. Each function writes one PNG (atomically) and returns its path.

Figures are drawn on a bare `matplotlib.figure.Figure` with the Agg canvas: no pyplot, no global
backend switch, no figure leaks in long sessions or notebooks. NaN values are drawn as gaps.
Put figures under the run's ``figures/`` directory (`RunDir.figure(name)`) so that `report.py`
embeds them.

The figures live in one module per research question (`rq1` .. `rq4`) plus `report_figures`
(Figures A-D of the study report); `helpers` holds the shared matplotlib plumbing. Everything
public is re-exported here, so ``from mechdiff.plots import plot_cka_curve`` keeps working.
"""
from __future__ import annotations

from mechdiff.plots.helpers import CKA_FLOOR
from mechdiff.plots.report_figures import plot_fig_a, plot_fig_b, plot_fig_c, plot_fig_d
from mechdiff.plots.rq1 import plot_cka_curve, plot_cka_matrix, plot_patch_kl
from mechdiff.plots.rq2 import plot_drop_heatmap, plot_map_quality
from mechdiff.plots.rq3 import plot_steer_vs_k
from mechdiff.plots.rq4 import plot_churn_bars, plot_cumulative_topk, plot_head_hist
from mechdiff.plots.tokens import plot_tokens_curve

__all__ = ["CKA_FLOOR", "plot_cka_curve", "plot_cka_matrix", "plot_patch_kl", "plot_map_quality",
           "plot_drop_heatmap", "plot_steer_vs_k", "plot_head_hist", "plot_churn_bars",
           "plot_cumulative_topk", "plot_tokens_curve", "plot_fig_a", "plot_fig_b", "plot_fig_c", "plot_fig_d"]
