"""RQ4 pieces beside the steps: the layers analysed by default, the known changed heads (planted pairs,
ladder adapters' cards), the noise floor and its null, the headline table (the changed-head count with
its FDR, Storey's share and intervals first, importance churn, overlap, recovery of the known heads)
and the figures (see :mod:`mechdiff.experiments.heads`)."""
from __future__ import annotations

from pathlib import Path

import torch

from mechdiff.analyses.intervals import fmt
from mechdiff.errors import ConfigError
from mechdiff.finetune.truth import load_truth
from mechdiff.models.planted import ground_truth
from mechdiff.experiments.stage import SIDES
from mechdiff.experiments.steps import study_layers
from mechdiff.plots import plot_churn_bars, plot_cumulative_topk, plot_head_hist


def default_layers(study, opts) -> list[int]:
    """The user's layers; else every layer when the models run on a GPU; else :func:`study_layers`."""
    if not opts.layers and str(getattr(study.base, "device", "cpu")).startswith("cuda"):
        return list(range(study.n_layers))
    return study_layers(study, opts.layers)[0]


def known_heads(study) -> list | None:
    """``[[layer, head], ...]`` whose weights are known to have changed: a planted pair's planted heads, a
    ladder adapter's card (``[]`` for an MLP-only one); None where the pair carries no truth."""
    if planted := getattr(study.pair.base, "planted", None):
        return ground_truth(planted[0]).get("heads")
    adapter = getattr(study.pair.tuned, "adapter", None)
    if adapter and (Path(adapter) / "card.json").is_file():
        try:
            return [list(h) for h in load_truth(adapter).changed_heads]
        except ConfigError:            # an adapter card without a truth (not a ladder adapter)
            return None
    return None


def noise_floor(abl: dict) -> tuple[float, float]:
    """``(floor, p0)`` from the ablation step's tensors: the readout's noise floor (3 x the largest
    mean |effect| of the do-nothing variant, at least 1e-5 x (1 + mean |clean readout|)), and the chance
    that noise alone passes it on one prompt, ``(1 + #noise draws above) / (1 + #draws)`` (the changed-head
    test's null)."""
    clean = max(float(abl[f"{s}.clean"].abs().mean()) for s in SIDES)
    floor = max(3 * max(float(abl[f"{s}.noise"].abs().mean(-1).max()) for s in SIDES), 1e-5 * (1 + clean))
    noise = torch.cat([abl[f"{s}.noise"].abs().flatten() for s in SIDES])
    return floor, (1 + int((noise > floor).sum())) / (1 + noise.numel())


def headline_of(s: dict, layers: list[int], n_prompts: int, readout: str, floor: float, imp: str,
                structural: str | None) -> dict:
    """The headline dict of ``s`` (:func:`mechdiff.analyses.heads.summarise_heads`)."""
    churn = s["churn"]
    headline = {"layers": layers, "prompts": n_prompts, "readout": readout, "noise floor": floor}
    if structural:
        ch = churn[structural]
        headline[f"changed heads ({structural}: own change moves the readout)"] = ch["share"]
        if "share_interval" in ch:
            headline[f"changed heads ({structural}), BH at FDR {ch['q']:g}"] = \
                f"{ch['n_changed']} of {ch['n_heads']} = {fmt(ch['share_interval'], '{:.1%}')}"
            headline[f"changed heads ({structural}), Storey share"] = fmt(ch["storey_interval"], "{:.1%}")
        other = churn.get("swap") if structural == "own" else None
        if other and "share_interval" in other:
            headline["changed heads (swap: input-driven, beside)"] = fmt(other["share_interval"], "{:.1%}")
    c = churn.get(imp) or {}
    if c:     # (absent when the models' head counts differ)
        headline.update({f"importance churn ({imp})": c["churn"], f"important heads base / tuned ({imp})":
                         f"{c['share_important_base']:.1%} / {c['share_important_tuned']:.1%}",
                         f"top-{c['k']} Jaccard ({imp})": c["topk_jaccard"], f"Spearman ({imp})": c["spearman"]})
    for key, iv in (c.get("intervals") or {}).items():
        headline[f"{key} ({imp}) 95% interval"] = fmt(iv)
    for m, r in s["planted"].items():
        headline[f"known changed heads (planted / trained) in top-{r['k']} by {m} change"] = \
            f"{r['observed']} (chance {r['expected']:.2f}, p = {r['p_value']:.2g})"
        headline[f"known changed heads recovered by {m}"] = (
            f"AUROC {r['auroc']:.3f} (chance 0.5), precision at the true count {r['precision_at_true_count']:.2f} "
            f"(chance {r['precision_chance']:.2f})" + (f", estimated share {r['estimated_share']:.1%} vs true "
                                                        f"{r['true_share']:.1%}" if "estimated_share" in r else ""))
    return headline


def write_figures(run, per: dict, layers: list[int], churn: dict, curves: dict, imp: str, unit: str) -> dict:
    """head_importance.png, head_churn.png, head_cumulative.png; returns ``{file: caption}``."""
    lab = "attribution" if imp == "attribution" else f"{imp}-ablation effect"
    plot_head_hist({l: {sd: per[imp][sd][i].mean(-1) for sd in SIDES} for i, l in enumerate(layers)},
                   run.figure("head_importance.png"), xlabel=f"{lab} ({unit})")
    if churn:
        plot_churn_bars(layers, {m: r.get("churn_per_layer", r.get("share_per_layer")) for m, r in churn.items()},
                        {m: r.get("churn", r.get("share")) for m, r in churn.items()}, run.figure("head_churn.png"))
    plot_cumulative_topk({k: (list(range(1, len(v["mean"]) + 1)), v["mean"], v["sd"]) for k, v in curves.items()},
                         run.figure("head_cumulative.png"), ylabel=f"effect on the readout ({unit})",
                         reference={f"{k}: every head": v["all_heads"] for k, v in curves.items() if "all_heads" in v})
    return {"head_importance.png": f"head importance ({lab}) per layer, both models",
            "head_churn.png": "per layer: importance-label churn per measurement; swap/own: share of changed heads",
            "head_cumulative.png": "top-k heads zeroed (own ranking) / patched from the other model, k = 1..K"}
