"""RQ2 — transport maps base -> tuned, mapped patching and the alpha-sweep (seeds/003).

Steps (resumable; outputs in the run directory):

1. ``rq2.capture``  train/val states at (layer, site) for both models -> tensors/rq2_states.safetensors
2. ``rq2.maps``     fit each solver on train, score on val, controls  -> maps.json, maps/*.safetensors
3. ``rq2.sweep``    mapped patching on val: KL_raw, KL_mapped per alpha, bogus + shuffle controls
                                                                       -> alpha_sweep.json
4. ``rq2.side``     side effects of the best alpha per (layer, site)   -> side_effects.json
then rq2_summary.txt, figures and the report (``rq2_summary``).

A mapped patch writes ``mu + alpha * (M(x_base) - mu)`` into the tuned model at the decision token
(``mu``: the tuned states' train mean; alpha scales the mapped state's deviation, ``auto`` matches its
train norm to the tuned states'). KL is KL(tuned clean || tuned patched) over the shared vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from mechdiff.analyses import maps as M
from mechdiff.analyses.map_metrics import map_metrics, rotation_drift, shuffle_control
from mechdiff.artifacts import RunDir
from mechdiff.data.prompts import encode, split
from mechdiff.errors import ConfigError
from mechdiff.experiments.common import open_models, open_run, target_prompts
from mechdiff.fairness import SharedVocab, filter_prompts, shared_vocab
from mechdiff.models.load import LoadedModel
from mechdiff.pairs import Pair
from mechdiff.patching import Patch, PatchEngine, kl_reducer
from mechdiff.sites.capture import capture

STATES = "tensors/rq2_states.safetensors"
SOLVERS = ("ridge", "procrustes", "pca_procrustes", "procrustes_scaled", "logit_subspace")


@dataclass
class RQ2Options:
    layers: list[int] | None = None
    sites: list[str] = field(default_factory=lambda: ["resid_post"])
    solvers: list[str] = field(default_factory=lambda: ["ridge", "procrustes", "procrustes_scaled"])
    shrink: float = 0.05
    n_train: int = 450
    n_val: int = 150
    k_positions: int = 1
    exclude_last: int = 4
    alphas: list[str] = field(default_factory=lambda: ["0.3", "0.5", "0.7", "1.0", "auto"])
    control_layer: int | None = None
    side_effects: bool = True
    side_n: int = 24
    min_shared_ratio: float = 1.0
    measure: str = "decision"
    batch_size: int = 32
    seed: int = 0
    prompts: str | None = None


def make_map(solver: str, opts: RQ2Options, tuned: LoadedModel):
    """A fresh, unfitted map estimator for ``solver``."""
    if solver == "ridge":
        return M.RidgeMap(select="val")
    if solver == "procrustes":
        return M.ProcrustesMap()
    if solver == "pca_procrustes":
        return M.PCAProcrustesMap(q=64)
    if solver == "procrustes_scaled":
        return M.ScaledProcrustesMap(shrink=opts.shrink)
    if solver == "logit_subspace":
        return M.LogitSubspaceMap(tuned.model.get_output_embeddings().weight.detach().float().cpu(), q=256)
    raise ConfigError(f"unknown solver {solver!r}; choose from {', '.join(SOLVERS)}")


def default_layers(out, pair: Pair, n_layers: int) -> list[int]:
    """RQ1's chosen layers in the run dir ``out`` (if it has rq1.json), else the pair's fallback
    layers, else ~3/4 and ~0.8 depth."""
    if out is not None and (Path(out) / "rq1.json").is_file():
        chosen = RunDir(out).read_json("rq1.json").get("layers", {}).get("chosen")
        if chosen:
            return list(chosen)
    if pair.layers:
        return [l for l in pair.layers if l < n_layers]
    return sorted({round(0.75 * (n_layers - 1)), round(0.82 * (n_layers - 1))})


def _plan(out, pair: Pair, n_layers: int, opts: RQ2Options) -> tuple[list[int], int]:
    """(layers, control layer), checked against the shallower model before any work is done."""
    layers = opts.layers or default_layers(out, pair, n_layers)
    control = opts.control_layer if opts.control_layer is not None else max(1, round(10 / 32 * n_layers))
    for l in layers + [control]:
        if not 0 <= l < n_layers:
            raise ConfigError(f"layer {l} is out of range 0..{n_layers - 1} for these models")
    return layers, control


def _prompts(pair, base, tuned, opts) -> tuple[SharedVocab, list, list]:
    sv = shared_vocab(base.tokenizer, tuned.tokenizer)
    kept, _ = filter_prompts(target_prompts(pair, opts.prompts), base.tokenizer, tuned.tokenizer, sv,
                             opts.min_shared_ratio)
    train, val = split(kept, opts.n_train, opts.n_val, seed=opts.seed)
    return sv, train, val


def _capture_step(run, base, tuned, train, val, sites, opts) -> None:
    """Train states (decision token, or K positions per prompt) and val states (decision token)."""
    pos = "last" if opts.k_positions == 1 else ("k", opts.k_positions, opts.exclude_last)
    out, train_positions = {}, {}
    for side_name, side in (("base", base), ("tuned", tuned)):
        tr = capture(side.model, side.tokenizer, train, sites, positions=pos, batch_size=opts.batch_size,
                     seed=opts.seed)
        va = capture(side.model, side.tokenizer, val, sites, batch_size=opts.batch_size)
        train_positions[side_name] = tr.positions
        for s in sites:
            x, idx = tr.flat(s)
            out[f"{side_name}/train/{s}"] = x
            out[f"{side_name}/val/{s}"] = va[s]
        out[f"{side_name}/train_prompt_index"] = idx
    if opts.k_positions > 1 and not torch.equal(train_positions["base"], train_positions["tuned"]):
        raise ConfigError("--k-positions > 1 pairs base and tuned states token by token, but the two "
                          "tokenizers split these prompts differently; use --k-positions 1 (the last "
                          "content token) for this pair, or prompts both tokenizers split alike")
    run.write_tensors(STATES, out)


def _maps_step(run, tuned, states, layers, control, opts) -> None:
    rows = []
    for l in sorted(set(layers + [control])):
        for site in opts.sites:
            key = f"{site}.{l}"
            X, Y = states[f"base/train/{key}"], states[f"tuned/train/{key}"]
            Xv, Yv = states[f"base/val/{key}"], states[f"tuned/val/{key}"]
            groups = states["base/train_prompt_index"]
            for solver in opts.solvers:
                m = _fit(make_map(solver, opts, tuned), X, Y, groups)
                m.save(run.file(f"maps/L{l}_{site}_{solver}"))
                tr = map_metrics(m.transform(X), Y, X=X if X.shape == Y.shape else None)
                va = map_metrics(m.transform(Xv), Yv, X=Xv if Xv.shape == Yv.shape else None,
                                 Y_train_mean=Y.mean(0))
                sh = shuffle_control(lambda: make_map(solver, opts, tuned), X, Y, Xv, Yv, seed=opts.seed)
                row = {"layer": l, "site": site, "solver": solver, "control_layer": l == control,
                       "train_r2_vw": tr["r2_vw"], "val_r2_vw": va["r2_vw"], "val_r2_uniform": va["r2_uniform"],
                       "val_r2_whitened": va["r2_whitened"], "val_cka": va["cka_debiased"],
                       "val_cka_biased": va["cka_biased"], "val_cos_mean": va["cos_mean"],
                       "val_cos_median": va["cos_median"], "shuffle_val_r2_vw": sh.get("r2_vw"),
                       "identity_val_r2_vw": va.get("identity", {}).get("r2_vw"),
                       "identity_val_cka": va.get("identity", {}).get("cka_debiased"),
                       "lambda": getattr(m, "lambda_", None)}
                R = getattr(m, "R_", None)
                if R is not None and R.shape[0] == R.shape[1]:
                    row["rotation_drift"] = rotation_drift(R)
                rows.append(row)
    best = max((r for r in rows if not r["control_layer"]), key=lambda r: r["val_r2_vw"])
    run.write_json("maps.json", {
        "title": "RQ2 — transport maps (base -> tuned)", "table": rows,
        "headline": {"best map (val R2_vw)": f"{best['solver']} L{best['layer']} {best['site']}: "
                                              f"R2={best['val_r2_vw']:.3f}, CKA={best['val_cka']:.3f}",
                     "train / val positions": f"{len(states['base/train_prompt_index'])} / "
                                              f"{len(next(v for k, v in states.items() if '/val/' in k))}",
                     "layers": layers, "control layer": control}})


def _fit(m, X: torch.Tensor, Y: torch.Tensor, groups: torch.Tensor):
    """Fit ``m``; ridge picks lambda on the last 20% of training prompts (whole prompts held out, so
    several positions of one prompt never sit on both sides), then refits on all training rows."""
    if not isinstance(m, M.RidgeMap):
        return m.fit(X, Y)
    held = groups >= torch.quantile(groups.float(), 0.8)
    if held.all() or not held.any():
        return m.fit(X, Y)
    lam = m.fit(X[~held], Y[~held], X[held], Y[held]).lambda_
    return M.RidgeMap(lambdas=[lam]).fit(X, Y)


def _alpha_value(a: str, m, X_train: torch.Tensor, Y_train: torch.Tensor) -> float:
    if a != "auto":
        return float(a)
    mu = Y_train.mean(0)
    mapped = m.transform(X_train).float()
    return float((Y_train - mu).norm(dim=1).mean() / (mapped - mu).norm(dim=1).mean().clamp_min(1e-12))


def _sweep_step(run, base, tuned, val, sv, states, layers, control, opts) -> None:
    """All variants for one val chunk go through one engine call (batched suffix runs)."""
    solver = opts.solvers[0]
    variants, labels = [], []
    same_width = base.d_model == tuned.d_model
    fitted, mapped_val = {}, {}

    def mapped(map_layer, at_layer, site, alpha_key, kind):
        if (map_layer, site) not in fitted:   # each map is loaded once, each val set mapped once
            fitted[(map_layer, site)] = M.load_map(run.file(f"maps/L{map_layer}_{site}_{solver}"))
        m = fitted[(map_layer, site)]
        if (map_layer, at_layer, site) not in mapped_val:
            mapped_val[(map_layer, at_layer, site)] = m.transform(states[f"base/val/{site}.{at_layer}"]).float()
        Xtr, Ytr = states[f"base/train/{site}.{map_layer}"], states[f"tuned/train/{site}.{at_layer}"]
        a = _alpha_value(alpha_key, m, Xtr, Ytr)
        mu = Ytr.mean(0)
        v = mu + a * (mapped_val[(map_layer, at_layer, site)] - mu)
        labels.append({"layer": at_layer, "site": site, "alpha": alpha_key, "alpha_value": a, "kind": kind,
                       "map_layer": map_layer})
        variants.append(v)

    for site in opts.sites:
        for l in layers + [control]:
            if same_width:
                labels.append({"layer": l, "site": site, "alpha": None, "kind": "raw"})
                variants.append(states[f"base/val/{site}.{l}"])
            for a in (opts.alphas if l != control else ["1.0"]):
                mapped(l, l, site, a, "mapped" if l != control else "control_map")
        mapped(layers[0], control, site, "1.0", "bogus")   # a late-layer map applied at the control layer
        # shuffle control: a map fitted on row-permuted targets, applied at the first chosen layer
        l0 = layers[0]
        Xtr, Ytr = states[f"base/train/{site}.{l0}"], states[f"tuned/train/{site}.{l0}"]
        perm = torch.randperm(len(Ytr), generator=torch.Generator().manual_seed(opts.seed))
        sm = _fit(make_map(solver, opts, tuned), Xtr, Ytr[perm], states["base/train_prompt_index"])
        labels.append({"layer": l0, "site": site, "alpha": "1.0", "alpha_value": 1.0, "kind": "shuffle",
                       "map_layer": l0})
        variants.append(sm.transform(states[f"base/val/{site}.{l0}"]).float())
    kl_m, kl_u = [], []
    for i in range(0, len(val), opts.batch_size):
        chunk = val[i:i + opts.batch_size]
        eng = PatchEngine(tuned.model, encode(tuned.tokenizer, chunk), measure=opts.measure)
        pv = [Patch(f"{lab['site']}.{lab['layer']}", v[i:i + len(chunk)]) for lab, v in zip(labels, variants)]
        k = eng.run(pv, reduce=kl_reducer(eng, sv.b_ids, with_unmasked=True))
        kl_m.append(k[..., 0])
        kl_u.append(k[..., 1])
    km, ku = torch.cat(kl_m, 1), torch.cat(kl_u, 1)
    for j, lab in enumerate(labels):
        lab.update(kl_mean=float(km[j].mean()), kl_std=float(km[j].std()) if km.shape[1] > 1 else 0.0,
                   kl_unmasked_mean=float(ku[j].mean()))
    run.write_json("variants.json", {"solver": solver, "measure": opts.measure, "n_val": len(val),
                                     "variants": labels, "per_prompt_masked": km.tolist()})


def _side_step(run, base, tuned, sv, states, opts) -> None:
    """Side effects for the best alpha of each (layer, site) (lowest KL_mapped)."""
    from mechdiff.data.datasets import load_prompt_set
    from mechdiff.experiments.rq2_summary import sweep_table
    from mechdiff.experiments.side_effects import mc_effects, mc_prompt, refusal_rates
    table = sweep_table(run.read_json("variants.json"))
    refusal = load_prompt_set("refusal_probe")[: opts.side_n]
    mc = load_prompt_set("mc")[: opts.side_n]
    solver = opts.solvers[0]
    rows, ref_patches, mc_patches = [], [], []
    keys = sorted({f"{b['site']}.{b['layer']}" for b in table["best"]})
    x_ref = capture(base.model, base.tokenizer, refusal, keys, batch_size=opts.batch_size)   # one pass
    x_mc = capture(base.model, base.tokenizer, [mc_prompt(it) for it in mc], keys, batch_size=opts.batch_size)
    for best in table["best"]:
        site, l = best["site"], best["layer"]
        key = f"{site}.{l}"
        m = M.load_map(run.file(f"maps/L{l}_{site}_{solver}"))
        mu = states[f"tuned/train/{key}"].mean(0)
        value = lambda x: mu + best["alpha_value"] * (m.transform(x).float() - mu)  # noqa: E731
        ref_patches.append((key, value(x_ref[key])))
        mc_patches.append((key, value(x_mc[key])))
        rows.append({"layer": l, "site": site, "alpha": best["alpha"]})
    _, ref_rows = refusal_rates(tuned.model, tuned.tokenizer, refusal, ref_patches, sv.b_ids)
    mc_rows = mc_effects(tuned.model, tuned.tokenizer, mc, mc_patches, sv.b_ids)
    for row, r, c in zip(rows, ref_rows, mc_rows):
        row.update(r)
        row.update(c)
    run.write_json("side_effects.json", {"title": "RQ2 — side effects of the best alpha per (layer, site)",
                                         "table": rows, "n_refusal": len(refusal), "n_mc": len(mc)})


def _prepare(pair, opts, out, device, dtype, models, stage):
    base, tuned = models or open_models(pair, device, dtype)
    layers, control = _plan(out, pair, min(base.n_layers, tuned.n_layers), opts)
    run = open_run(out, stage, pair, {"base": base, "tuned": tuned}, {"seed": opts.seed}, opts)
    sv, train, val = _prompts(pair, base, tuned, opts)
    sites = [f"{s}.{l}" for l in sorted(set(layers + [control])) for s in opts.sites]
    run.write_json("rq2_prompts.json", {"train": [p["id"] for p in train], "val": [p["id"] for p in val],
                                        "layers": layers, "control_layer": control, "sites": opts.sites})
    sig = {"layers": layers, "control": control, "sites": opts.sites, "n_train": opts.n_train,
           "n_val": opts.n_val, "k_positions": opts.k_positions, "exclude_last": opts.exclude_last,
           "seed": opts.seed, "min_shared_ratio": opts.min_shared_ratio, "prompts": opts.prompts}
    run.cached("rq2.capture", lambda: _capture_step(run, base, tuned, train, val, sites, opts), [STATES],
               info=sig)
    states = run.read_tensors(STATES)
    run.cached("rq2.maps", lambda: _maps_step(run, tuned, states, layers, control, opts), ["maps.json"],
               depends_on=["rq2.capture"], info={"solvers": opts.solvers, "shrink": opts.shrink})
    return base, tuned, run, layers, control, sv, val, states


def run_maps(pair: Pair, opts: RQ2Options, out=None, device=None, dtype=None, models=None) -> RunDir:
    """Fit and score the maps (steps 1-2) and write the report."""
    from mechdiff.experiments.rq2_summary import write_maps_figures
    from mechdiff.report import write_report
    _, _, run, *_ = _prepare(pair, opts, out, device, dtype, models, "maps")
    write_maps_figures(run)
    write_report(run.path)
    return run


def run_mapped_patch(pair: Pair, opts: RQ2Options, out=None, device=None, dtype=None,
                     models=None) -> RunDir:
    """Maps (reused if done), the alpha-sweep on val, controls, side effects, summary, report."""
    from mechdiff.experiments.rq2_summary import summarise_rq2
    base, tuned, run, layers, control, sv, val, states = _prepare(pair, opts, out, device, dtype, models,
                                                                   "mapped-patch")
    run.cached("rq2.sweep", lambda: _sweep_step(run, base, tuned, val, sv, states, layers, control, opts),
               ["variants.json"], depends_on=["rq2.maps"],
               info={"alphas": opts.alphas, "solver": opts.solvers[0], "measure": opts.measure})
    if opts.side_effects:
        run.cached("rq2.side", lambda: _side_step(run, base, tuned, sv, states, opts), ["side_effects.json"],
                   depends_on=["rq2.sweep"])
    summarise_rq2(run, opts)
    return run
