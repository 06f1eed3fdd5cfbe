"""RQ1 summary: rq1.json (headline, chosen layers), figures and the report, from the step outputs."""
from __future__ import annotations

import torch

from mechdiff.artifacts import RunDir
from mechdiff.experiments.results import ChosenLayer, Rq1Result
from mechdiff.models.load import LoadedModel
from mechdiff.pairs import Pair
from mechdiff.plots import plot_cka_curve, plot_cka_matrix, plot_patch_kl
from mechdiff.experiments.summaries import entry_phrase
from mechdiff.models.planted import ground_truth
from mechdiff.analyses.resample import delete_group_jackknife


def planted_layers(pair: Pair) -> list[int] | None:
    """Ground-truth layers of a planted pair (None for real pairs)."""
    planted = pair.base.planted if hasattr(pair.base, "planted") else None
    if not planted:
        return None
    return list(ground_truth(planted[0]).get("layers") or []) or None


def _mean_se(values: torch.Tensor, groups: list[int] | None) -> tuple[float, float]:
    """Mean over prompts and its delete-one-cluster jackknife SE (whole topic groups are dropped)."""
    v = values.double()
    if v.numel() < 2:
        return float(v.mean()), float("nan")
    g = torch.tensor(groups) if groups is not None and len(set(groups)) >= 2 else None
    r = delete_group_jackknife(lambda idx: float(v[idx].mean()), v.numel(), groups=g,
                               n_groups=10 ** 6)
    return r["estimate"], r["se"]


def choose_layers(patch: dict | None, cka: dict, n_layers: int, control: int | None, z: float = 2.0) -> dict:
    """Where the divergence enters, and the layers the later stages use, by a stated rule.

    With patching: per layer the mean patch KL over prompts (both directions averaged) with its
    cluster-jackknife SE; the *entry layer* is the first layer whose ``mean - z * SE`` exceeds the
    measured floor (the largest KL of a self-patch, the destination's own state written back, which
    the engine computes as exactly 0). None exceeds it: "no divergence found" and no chosen layers.
    Chosen = {entry, steepest rise (largest increase over the previous layer), peak}, at or after the
    entry and below the last layer (patching the final residual replaces the output). Without
    patching (different widths/depths): the lowest debiased CKA. Control: ``control`` or the most
    similar layer in the first half, never a chosen one.
    """
    if patch:
        layers = patch["layers"]
        dirs = list(patch["directions"].values())
        per_prompt = torch.tensor([d["per_prompt_masked"] for d in dirs], dtype=torch.float64).mean(0)  # [L, N]
        groups = patch.get("groups")
        stats = [_mean_se(per_prompt[j], groups) for j in range(len(layers))]
        floor = max((d.get("floor") or {}).get("max", 0.0) for d in dirs)
        lower = [m - z * (se if se == se else 0.0) for m, se in stats]
        usable = [j for j in range(len(layers)) if layers[j] < n_layers - 1] or list(range(len(layers)))
        above = [j for j in usable if lower[j] > floor]
        score = {layers[j]: stats[j][0] for j in range(len(layers))}
        evidence = {"floor": floor, "z": z, "per_layer": [{"layer": l, "mean": stats[j][0], "se": stats[j][1],
                                                            "lower": lower[j]} for j, l in enumerate(layers)]}
        if not above:
            chosen, entry = [], None
            rule = "no divergence found: no layer's patch KL exceeds the floor by z SE"
        else:
            e = above[0]
            entry = layers[e]
            after = [j for j in usable if j >= e]
            rise = {j: stats[j][0] - (stats[j - 1][0] if j > 0 else 0.0) for j in after}
            steep = max(after, key=lambda j: rise[j])
            peak = max(after, key=lambda j: stats[j][0])
            chosen = sorted({entry, layers[steep], layers[peak]})
            evidence.update(entry=entry, steepest=layers[steep], steepest_rise=rise[steep], peak=layers[peak],
                            peak_kl=stats[peak][0])
            rule = "entry layer (first above the floor), steepest rise, peak"
        pick_ctrl = lambda cands: min(cands, key=lambda l: score[l])  # noqa: E731
        basis = "patch KL: " + rule
    else:
        rows = cka.get("per_layer") or []
        chosen = sorted(r["layer"] for r in sorted(rows, key=lambda r: r["debiased"])[:3])
        score = {r["layer"]: r["debiased"] for r in rows}
        pick_ctrl = lambda cands: max(cands, key=lambda l: score[l])  # noqa: E731
        basis = "lowest debiased CKA (patching needs equal widths)"
        entry, evidence = None, None
    if control is None:
        cands = [l for l in score if l < n_layers // 2 and l not in chosen and l > 0]
        control = pick_ctrl(cands) if cands else None
    return {"chosen": chosen, "control": control, "basis": basis, "entry": entry, "evidence": evidence}


def rq1_result(out: dict, control_given: bool) -> Rq1Result:
    """RQ1's typed result from the rq1.json it wrote: each chosen layer with the rule(s) that chose it."""
    layers, patch = out["layers"], out.get("patch")
    ev = layers.get("evidence") or {}
    if ev:
        picks = (("entry", ev.get("entry")), ("steepest rise", ev.get("steepest")), ("peak", ev.get("peak")))
        chosen = [ChosenLayer(l, " + ".join(r for r, x in picks if x == l)) for l in layers["chosen"]]
        ctrl_rule = "lowest patch KL in the first half"
    else:
        chosen = [ChosenLayer(l, "lowest debiased CKA") for l in layers["chosen"]]
        ctrl_rule = "highest debiased CKA in the first half"
    return Rq1Result(entry=layers["entry"], chosen=chosen, control=layers["control"],
                     control_rule="given (--control-layer)" if control_given else ctrl_rule, basis=layers["basis"],
                     readouts=list((patch or {}).get("readouts") or []), measure=(patch or {}).get("measure"),
                     floor=ev.get("floor"), planted=out.get("planted_layers"))


def summarise_rq1(run: RunDir, pair: Pair, base: LoadedModel, tuned: LoadedModel, opts) -> dict:
    fair = run.read_json("fairness.json")
    cka = run.read_json("cka.json")
    patch = run.read_json("patch.json") if run.exists("patch.json") else None
    beh = run.read_json("behaviour.json") if run.exists("behaviour.json") else None
    truth = planted_layers(pair)
    figures = {}
    if cka.get("per_layer"):
        r = cka["per_layer"]
        col = lambda k: [x[k] for x in r]  # noqa: E731
        plot_cka_curve(col("layer"), col("debiased"), col("ci_low"), col("ci_high"), col("biased"),
                       col("null_mean"), col("null_sd"), run.figure("cka_curve.png"),
                       title=f"CKA per layer ({cka['site']}, n={cka['n']})")
        figures["cka_curve.png"] = ("1 - CKA on a log axis: debiased with jackknife CI, biased, and the row-shuffled "
                                    "independence null (CKA of unrelated states; per-layer permutation seeds)")
    plot_cka_matrix(cka["matrix_debiased"], run.figure("cka_matrix.png"),
                    xlabel="tuned layer", ylabel="base layer", xticks=cka["matrix_layers"]["tuned"],
                    yticks=cka["matrix_layers"]["base"], title="debiased CKA, base x tuned layers")
    figures["cka_matrix.png"] = "layer-by-layer debiased CKA"
    if patch:
        kl = {d: ([x["mean"] for x in v["masked"]], [x["std"] for x in v["masked"]])
              for d, v in patch["directions"].items()}
        plot_patch_kl(patch["layers"], kl, run.figure("patch_kl.png"), planted_layers=truth,
                      title="cross-model layer patching: next-token KL (shared vocab)")
        figures["patch_kl.png"] = "KL(destination clean || patched) per layer and direction"
    choice = choose_layers(patch, cka, base.n_layers, opts.control_layer)
    headline = {
        "prompts used": fair["n_used"],
        "vocab base / tuned": f"{fair['vocab']['vocab_a']} / {fair['vocab']['vocab_b']}",
        "vocab increase %": fair["vocab"]["pct_increase"],
        "shared tokens": fair["vocab"]["shared"],
        "chosen layers": choice["chosen"], "control layer": choice["control"],
        "divergence enters at": (entry_phrase(choice["entry"], patch["layers"]) if choice["entry"] is not None else
                                 "no divergence found" if patch else "n/a (no patching)"),
    }
    if choice["entry"] is not None:
        ev = next(x for x in choice["evidence"]["per_layer"] if x["layer"] == choice["entry"])
        headline["entry evidence"] = (f"KL {ev['mean']:.3g} +- {ev['se']:.2g} (SE over topic groups) vs "
                                      f"floor {choice['evidence']['floor']:.3g}")
    if cka.get("per_layer"):
        low = min(cka["per_layer"], key=lambda x: x["debiased"])
        headline["min debiased CKA (layer)"] = f"{low['debiased']:.3f} ({low['layer']})"
        headline["biased CKA there / null"] = f"{low['biased']:.3f} / {low['null_mean']:.3f}"
    table = []
    if patch:
        for d, v in patch["directions"].items():
            for x in v["masked"]:
                table.append({"direction": d, "layer": x["layer"], "kl_mean": x["mean"], "kl_std": x["std"]})
        headline["clean KL(base || tuned), shared vocab"] = patch["clean_cross_kl_shared"]["mean"]
        top = max(table, key=lambda r: r["kl_mean"])
        headline["max patch KL"] = f"{top['kl_mean']:.3f} (L{top['layer']}, {top['direction']})"
        if choice["control"] is not None:
            ctrl = [r["kl_mean"] for r in table if r["layer"] == choice["control"]]
            headline["control layer KL (max dir)"] = max(ctrl)
        if patch.get("standardise"):
            st = patch["standardise"]
            headline["standardised"] = (f"at layers {st['applied_layers']}; skipped at the bit-equal layers "
                                        f"{st['skipped_bit_equal_layers']} (exact no-op: KL 0)")
    else:
        headline["patching"] = (f"skipped: hidden sizes or depths differ (base d={base.d_model}, "
                                f"L={base.n_layers}; tuned d={tuned.d_model}, L={tuned.n_layers}); "
                                "use `mechdiff mapped-patch` with a map between widths")
    if truth:
        headline["planted layers (ground truth)"] = truth
    out = {"title": "RQ1 — fair baseline", "headline": headline, "layers": choice, "table": table,
           "fairness": fair, "cka": cka, "patch": patch, "behaviour": beh, "planted_layers": truth,
           "figures": figures}
    if beh:
        out["tables"] = {"behaviour (tuned - base)": [{"set": s, **m} for s, m in beh["delta"].items()]}
    run.write_json("rq1.json", out)
    return out
