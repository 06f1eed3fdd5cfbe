"""RQ1 summary: rq1.json (headline, chosen layers), figures and the report, from the step outputs."""
from __future__ import annotations

from mechdiff.artifacts import RunDir
from mechdiff.models.load import LoadedModel
from mechdiff.pairs import Pair
from mechdiff.plots import plot_cka_curve, plot_cka_matrix, plot_patch_kl
from mechdiff.report import write_report


def planted_layers(pair: Pair) -> list[int] | None:
    """Ground-truth layers of a planted pair (None for real pairs)."""
    planted = pair.base.planted if hasattr(pair.base, "planted") else None
    if not planted:
        return None
    from mechdiff.models.planted import ground_truth
    return list(ground_truth(planted[0]).get("layers") or []) or None


def choose_layers(patch: dict | None, cka: dict, n_layers: int, control: int | None, top: int = 3) -> dict:
    """Top-divergence layers and a high-similarity control.

    With patching: the layers where the base->tuned patch KL *enters* (largest increase over the
    previous layer's KL, both directions averaged), since KL stays high after the change is complete.
    Without: the lowest debiased CKA. Control: ``control`` or the most similar layer in the first
    half (highest debiased CKA; with patching, lowest KL), never one of the chosen layers.
    """
    if patch:
        layers = patch["layers"]
        mean = [sum(d["masked"][j]["mean"] for d in patch["directions"].values()) / len(patch["directions"])
                for j in range(len(layers))]
        inc = [mean[0]] + [mean[j] - mean[j - 1] for j in range(1, len(mean))]
        # The last layer is excluded: patching the final residual replaces the output directly.
        order = sorted((j for j in range(len(layers)) if layers[j] < n_layers - 1), key=lambda j: -inc[j])
        chosen = sorted(layers[j] for j in order[:top])
        score = {layers[j]: mean[j] for j in range(len(layers))}
        pick_ctrl = lambda cands: min(cands, key=lambda l: score[l])  # noqa: E731
        basis = "patch KL increase"
    else:
        rows = cka.get("per_layer") or []
        chosen = sorted(r["layer"] for r in sorted(rows, key=lambda r: r["debiased"])[:top])
        score = {r["layer"]: r["debiased"] for r in rows}
        pick_ctrl = lambda cands: max(cands, key=lambda l: score[l])  # noqa: E731
        basis = "lowest debiased CKA"
    if control is None:
        cands = [l for l in score if l < n_layers // 2 and l not in chosen and l > 0]
        control = pick_ctrl(cands) if cands else None
    return {"chosen": chosen, "control": control, "basis": basis}


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
        figures["cka_curve.png"] = "debiased CKA with jackknife CI, biased CKA, row-shuffled null"
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
    }
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
    write_report(run.path)
    return out
