"""RQ2 — transport maps base -> tuned, mapped patching and the alpha-sweep (seeds/003).

Steps (resumable; outputs in the run directory):

1. ``rq2.capture``  train/val states at (layer, site) for both models -> tensors/rq2_states.safetensors
2. ``rq2.maps.<solver>``  one step per solver: fit on train, score on dev and test, controls
                   -> maps_<solver>.json, maps/L<layer>_<site>_<solver>.*; maps.json gathers every
                   solver fitted in this run directory (a later run with other solvers adds to it and
                   never refits or overwrites another solver's maps)
3. ``rq2.sweep``    mapped patching on val for every solver: KL_raw, KL_mapped per alpha, bogus +
                   shuffle controls                                  -> variants.json
4. ``rq2.side``     side effects of the dev-chosen alpha per (solver, layer, site) -> side_effects.json
then alpha_sweep.json, rq2_summary.txt, figures and the report (``rq2_summary``).

Splits (``steps.cluster_split``): train / dev / test are whole topic and translation clusters (no
topic or translation group is shared), and the prompts RQ1 chose its layers on in this run directory
are never in dev or test. The held-out ``--n-val`` prompts are half dev, half test: the winner
(solver, layer, site, alpha) is chosen on dev and its numbers are reported on test.

A mapped patch writes ``mu + alpha * (M(x_base) - mu)`` into the tuned model at the decision token
(a replace :class:`~mechdiff.patching.Patch` with centre ``mu``, the tuned states' train mean; alpha scales the mapped state's deviation, ``auto`` matches its
train norm to the tuned states'). KL is KL(tuned clean || tuned patched) over the shared vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from mechdiff.analyses import maps as M
from mechdiff.analyses.map_metrics import map_metrics, r2_interval, rotation_drift, shuffle_control
from mechdiff.artifacts import RunDir
from mechdiff.errors import ConfigError
from mechdiff.experiments.figure_data import FIG_B
from mechdiff.experiments.results import MappedPatchResult, MapsResult
from mechdiff.experiments.maps_summary import mapped_patch_result, summarise_rq2, sweep_section, write_maps_figures
from mechdiff.experiments.stage import Stage, Study, opt, run_stage
from mechdiff.options import MAPPED_ALPHA
from mechdiff.experiments.summaries import rq2_numbers, rq2_sentences
from mechdiff.report.hooks import ReportHooks
from mechdiff.experiments.steps import (capture_sides, check_layers, clean_run, fair_split, group_ids, kl_to_clean,
                                        patch_measure, prompt_digest, rq1_prompt_ids, study_layers)
from mechdiff.patching import Patch
from mechdiff.sites.names import Site
from mechdiff.sites.names import SITE_NAMES
from mechdiff.data.datasets import load_prompt_set
from mechdiff.experiments.maps_summary import sweep_table
from mechdiff.analyses.behaviour.mc import mc_prompt
from mechdiff.analyses.behaviour.side_effects import mc_effects, refusal_rates

STATES = "tensors/rq2_states.safetensors"
SOLVERS = tuple(M.SOLVERS)


@dataclass
class MapsOptions:
    layers: list[int] | None = opt(None, "layers (default: RQ1's choice in this run directory, else the pair's)")
    sites: list[str] = opt(help="comma list of resid_post,attn_out,mlp_out", factory=lambda: ["resid_post"])
    solvers: list[str] = opt(help=f"comma list of {', '.join(SOLVERS)}; each is fitted and stored on its own "
                                  "(maps_<solver>.json), never replacing another solver's maps",
                             factory=lambda: ["ridge", "procrustes", "procrustes_scaled"])
    shrink: float = opt(0.05, "whitening shrinkage for procrustes_scaled (0..1)")
    n_train: int = opt(450, "training prompts (maps are fitted on these)")
    n_val: int = opt(150, "held-out prompts (maps are scored and patched on these): half dev (the winner is "
                          "chosen there), half test (it is reported there); whole topic clusters per split")
    k_positions: int = opt(1, "1 = last content token; K>1 = K positions per prompt for training")
    exclude_last: int = opt(4, "with K>1: positions at the end of the prompt never sampled")
    control_layer: int | None = opt(None, "early layer for the control map (default: RQ1's control, else ~10/32 depth)")
    min_shared_ratio: float = opt(1.0, "keep prompts with at least this fraction of tokens in the shared "
                                       "vocabulary (1.0 strict)")


@dataclass
class RQ2Options(MapsOptions):
    """Mapped patching: the maps' options plus the sweep's. Every solver listed is swept; the winner
    (solver, layer, site, alpha) is chosen on the dev half and reported on the test half."""

    sites: list[str] = opt(help="comma list of resid_post,attn_out,mlp_out",
                           factory=lambda: ["resid_post", "attn_out", "mlp_out"])
    solvers: list[str] = opt(help=f"maps compared in the sweep (comma list of {', '.join(SOLVERS)}); the winner "
                                  "is chosen on dev", factory=lambda: ["procrustes_scaled"])
    mapped_alpha: list[str] = opt(help="mapped-patch strengths: alpha in mu + alpha (M(x) - mu), numbers > 0 "
                                       "and/or 'auto' (the mapped states' norm matches the tuned train states')",
                                  factory=lambda: ["0.3", "0.5", "0.7", "1.0", "auto"], kind=MAPPED_ALPHA,
                                  was=("alpha", "alphas"))
    side_effects: bool = opt(True, "refusal (harmful half of the refusal probe) and multiple-choice side effects "
                                   "of the dev-chosen alpha; without them the stop conditions are not met")
    side_n: int = opt(24, "prompts per side-effect set")
    measure: str = opt("decision", "where next-token KL is read: decision | last")


def check(opts: MapsOptions, n_layers: int) -> None:
    """Everything checkable before model work: layer ranges, solvers, sites, counts (the strengths are
    read by their kind, :data:`mechdiff.options.MAPPED_ALPHA`)."""
    check_layers(n_layers, layers=opts.layers, control_layer=opts.control_layer)
    bad = [s for s in opts.solvers if s not in M.SOLVERS]
    if len(set(opts.solvers)) != len(opts.solvers):
        raise ConfigError(f"--solvers: {opts.solvers} lists a solver twice")
    if bad or not opts.solvers:
        raise ConfigError(f"unknown solver(s) {bad}; choose from {', '.join(SOLVERS)}")
    bad = [s for s in opts.sites if s not in SITE_NAMES or s.startswith("head")]
    if bad or not opts.sites:
        raise ConfigError(f"unknown site(s) {bad}; use resid_post, resid_pre, attn_out or mlp_out")
    M.check_shrinkage(opts.shrink)
    if opts.n_train < 2 or opts.n_val < 2 or opts.k_positions < 1:
        raise ConfigError("--n-train and --n-val must be >= 2 and --k-positions >= 1")


def _make(solver: str, opts: MapsOptions, study: Study):
    W_U = lambda: study.tuned.model.get_output_embeddings().weight.detach().float().cpu()  # noqa: E731
    return M.make_map(solver, shrink=opts.shrink, W_U=W_U)


def _capture_step(study: Study, train, val, sites, opts: MapsOptions) -> None:
    """Train states (decision token, or K positions per prompt) and val states (decision token)."""
    pos = "last" if opts.k_positions == 1 else ("k", opts.k_positions, opts.exclude_last)
    tr = capture_sides(study, train, sites, positions=pos, seed=study.seed)
    va = capture_sides(study, val, sites)
    out = {}
    for side in ("base", "tuned"):
        for s in sites:
            x, idx = tr[side].flat(s)
            out[f"{side}/train/{s}"] = x
            out[f"{side}/val/{s}"] = va[side][s]
        out[f"{side}/train_prompt_index"] = idx
    if opts.k_positions > 1 and not torch.equal(tr["base"].positions, tr["tuned"].positions):
        raise ConfigError("--k-positions > 1 pairs base and tuned states token by token, but the two "
                          "tokenizers split these prompts differently; use --k-positions 1 (the last "
                          "content token) for this pair, or prompts both tokenizers split alike")
    study.run.write_tensors(STATES, out)


def _maps_step(study: Study, states, layers, control, opts: MapsOptions, solver: str, n_dev: int, groups) -> None:
    """Fit ``solver`` at every (layer, site) on train, score on val, dev (first ``n_dev`` val rows) and
    test (the rest, its R2 with an interval over ``groups`` [n_val]), with its shuffle control ->
    maps/L<l>_<site>_<solver>.* and maps_<solver>.json."""
    rows = []
    for l in sorted(set(layers + [control])):
        for site in opts.sites:
            key = Site(site, l)
            X, Y = states[f"base/train/{key}"], states[f"tuned/train/{key}"]
            Xv, Yv = states[f"base/val/{key}"], states[f"tuned/val/{key}"]
            m = _fit(_make(solver, opts, study), X, Y, states["base/train_prompt_index"])
            m.save(study.run.file(f"maps/L{l}_{site}_{solver}"))
            same = X.shape == Y.shape
            tr = map_metrics(m.transform(X), Y, X=X if same else None)
            va = map_metrics(m.transform(Xv), Yv, X=Xv if same else None, Y_train_mean=Y.mean(0))
            part = {name: map_metrics(m.transform(Xv[ix]), Yv[ix], Y_train_mean=Y.mean(0))["r2_vw"]
                    if len(Xv[ix]) >= 2 else None for name, ix in (("dev", slice(0, n_dev)), ("test", slice(n_dev, None)))}
            sh = shuffle_control(lambda: _make(solver, opts, study), X, Y, Xv, Yv, seed=study.seed)
            row = {"layer": l, "site": site, "solver": solver, "control_layer": l == control,
                   "train_r2_vw": tr["r2_vw"], "val_r2_vw": va["r2_vw"], "dev_r2_vw": part["dev"],
                   "test_r2_vw": part["test"], "val_r2_uniform": va["r2_uniform"], "test_r2_interval":
                   r2_interval(m.transform(Xv[n_dev:]), Yv[n_dev:], Y.mean(0), groups[n_dev:]) if len(Xv) - n_dev >= 2 else None,
                   "val_r2_whitened": va["r2_whitened"], "val_cka": va["cka_debiased"],
                   "val_cka_biased": va["cka_biased"], "val_cos_mean": va["cos_mean"],
                   "val_cos_median": va["cos_median"], "shuffle_val_r2_vw": sh.get("r2_vw"),
                   "identity_val_r2_vw": va.get("identity", {}).get("r2_vw"),
                   "identity_val_cka": va.get("identity", {}).get("cka_debiased"),
                   "lambda": getattr(m, "lambda_", None),
                   "n_underdetermined": getattr(m, "n_underdetermined_", None)}
            R = getattr(m, "R_", None)
            if R is not None and R.shape[0] == R.shape[1]:
                row["rotation_drift"] = rotation_drift(R)
            rows.append(row)
    study.run.write_json(f"maps_{solver}.json", {"solver": solver, "shrink": opts.shrink, "table": rows})


def _maps_files(layers, control, sites, solver: str) -> list[str]:
    return [f"maps_{solver}.json"] + [f"maps/L{l}_{site}_{solver}.{ext}" for l in sorted(set(layers + [control]))
                                      for site in sites for ext in ("json", "safetensors")]


def _gather_maps(study: Study, states, layers, control, n_dev: int) -> None:
    """maps.json: the rows of every solver whose step is current in this run directory (the same
    capture), whichever run fitted it; the best map is chosen on dev R2 and reported on test."""
    rows = [r for solver in SOLVERS if study.run.step_done(f"rq2.maps.{solver}")
            for r in study.run.read_json(f"maps_{solver}.json")["table"]]
    key = lambda r: -float("inf") if r.get("dev_r2_vw") is None else r["dev_r2_vw"]  # noqa: E731
    best = max((r for r in rows if not r["control_layer"]), key=key, default=None)
    n_val = len(next(v for k, v in states.items() if "/val/" in k))
    head = {"best map (chosen on dev R2_vw, test shown)": None if best is None else
            f"{best['solver']} L{best['layer']} {best['site']}: test R2={_f3(best['test_r2_vw'])}, "
            f"val CKA={_f3(best['val_cka'])}",
            "solvers": sorted({r["solver"] for r in rows}),
            "train / dev / test positions": f"{len(states['base/train_prompt_index'])} / {n_dev} / {n_val - n_dev}",
            "layers": layers, "control layer": control}
    und = [r["n_underdetermined"] for r in rows if r.get("n_underdetermined")]
    if und:
        head["Procrustes directions undetermined by the data"] = \
            f"up to {max(und)} (fewer training rows than dimensions; completed with the identity)"
    study.run.write_json("maps.json", {"title": "RQ2 — transport maps (base -> tuned)", "table": rows,
                                       "best": best, "headline": head})


def _f3(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


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


def _sweep_step(study: Study, val, n_dev: int, states, layers, control, opts: RQ2Options) -> None:
    """Raw, mapped (every solver and alpha), control, bogus and shuffle variants on val (dev rows
    first, then test), all through one patch-and-measure loop (batched suffix runs). ``kl_*`` of a
    variant: over the test rows (what is reported); ``kl_dev_mean``: over the dev rows (what is chosen on)."""
    variants, labels = [], []
    fitted, mapped_val = {}, {}
    # The base states patched in come from the destination's own engine path (same chunking and
    # measure as the loop below), not from the capture step: at a layer both models share, the raw
    # patch is then the tuned model's clean state bit for bit, a detected no-op with KL exactly 0 (a
    # plain forward's states differ from it in the last bits in bf16).
    keys = sorted({str(Site(site, l)) for site in opts.sites for l in layers + [control]})
    src = {k: v.float() for k, v in clean_run(study.base, val, keys, batch_size=study.batch_size,
                                              max_rows=study.max_rows, measure=opts.measure)[1].items()}

    def mapped(solver, map_layer, at_layer, site, alpha_key, kind):
        if (solver, map_layer, site) not in fitted:   # each map is loaded once, each val set mapped once
            fitted[(solver, map_layer, site)] = M.load_map(study.run.file(f"maps/L{map_layer}_{site}_{solver}"))
        m = fitted[(solver, map_layer, site)]
        if (solver, map_layer, at_layer, site) not in mapped_val:
            mapped_val[(solver, map_layer, at_layer, site)] = \
                m.transform(src[str(Site(site, at_layer))]).float()
        Xtr, Ytr = states[f"base/train/{Site(site, map_layer)}"], states[f"tuned/train/{Site(site, at_layer)}"]
        a = _alpha_value(alpha_key, m, Xtr, Ytr)
        labels.append({"solver": solver, "layer": at_layer, "site": site, "alpha": alpha_key, "alpha_value": a,
                       "kind": kind, "map_layer": map_layer})
        variants.append(Patch(Site(site, at_layer), mapped_val[(solver, map_layer, at_layer, site)], alpha=a,
                              centre=Ytr.mean(0)))

    for site in opts.sites:
        if study.same_shape:
            for l in layers + [control]:
                labels.append({"solver": None, "layer": l, "site": site, "alpha": None, "kind": "raw"})
                variants.append(Patch(Site(site, l), src[str(Site(site, l))]))
        for solver in opts.solvers:
            for l in layers + [control]:
                for a in (opts.mapped_alpha if l != control else ["1.0"]):
                    mapped(solver, l, l, site, a, "mapped" if l != control else "control_map")
            # controls for every chosen layer (whichever wins on dev is compared with its own):
            for lc in layers:
                mapped(solver, lc, control, site, "1.0", "bogus")   # this layer's map at the control layer
                # shuffle control: a map fitted on row-permuted targets, applied at its own layer
                Xtr, Ytr = states[f"base/train/{Site(site, lc)}"], states[f"tuned/train/{Site(site, lc)}"]
                perm = torch.randperm(len(Ytr), generator=torch.Generator().manual_seed(study.seed))
                sm = _fit(_make(solver, opts, study), Xtr, Ytr[perm], states["base/train_prompt_index"])
                labels.append({"solver": solver, "layer": lc, "site": site, "alpha": "1.0", "alpha_value": 1.0,
                               "kind": "shuffle", "map_layer": lc})
                variants.append(Patch(Site(site, lc), sm.transform(src[str(Site(site, lc))]).float()))
    k = patch_measure(study.tuned, val, variants, batch_size=study.batch_size, measure=opts.measure,
                      max_rows=study.max_rows, reducer=kl_to_clean(study.allowed_ids("tuned")))
    km, ku = k[..., 0], k[..., 1]
    dev, test = km[:, :n_dev], km[:, n_dev:]
    for j, lab in enumerate(labels):
        lab.update(kl_mean=float(test[j].mean()), kl_std=float(test[j].std()) if test.shape[1] > 1 else 0.0,
                   kl_dev_mean=float(dev[j].mean()), kl_unmasked_mean=float(ku[j, n_dev:].mean()))
    study.run.write_json("variants.json", {"solvers": list(opts.solvers), "solver": opts.solvers[0],
                                           "measure": opts.measure, "n_val": len(val), "n_dev": n_dev,
                                           "n_test": len(val) - n_dev, "variants": labels,
                                           "per_prompt_masked": km.tolist(), "val_groups": group_ids(val).tolist()})


def _side_step(study: Study, states, opts: RQ2Options) -> None:
    """Side effects of the dev-chosen alpha of each (solver, layer, site): refusal on the harmful half of
    the refusal probe (where a refusal can be lost; the clean rate is recorded beside), MC on the MC set."""
    table = sweep_table(study.run.read_json("variants.json"))
    refusal = [p for p in load_prompt_set("refusal_probe") if p.get("category") == "harmful"][: opts.side_n]
    mc = load_prompt_set("mc")[: opts.side_n]
    rows, ref_patches, mc_patches = [], [], []
    keys = sorted({Site(b["site"], b["layer"]) for b in table["best"]})
    x_ref = capture_sides(study, refusal, keys, sides=["base"])["base"]   # one pass per set
    # MC sources along mc_effects' engine path (the same chunks, "last" readout): see _sweep_step
    x_mc = {Site.parse(k): v.float() for k, v in clean_run(study.base, [mc_prompt(it) for it in mc], keys,
                                                           batch_size=study.batch_size, measure="last",
                                                           max_rows=study.max_rows)[1].items()}
    for best in table["best"]:
        site, l, solver = best["site"], best["layer"], best["solver"]
        key = Site(site, l)
        m = M.load_map(study.run.file(f"maps/L{l}_{site}_{solver}"))
        mu = states[f"tuned/train/{key}"].mean(0)
        value = lambda x: Patch(key, m.transform(x).float(), alpha=best["alpha_value"], centre=mu).resolved()  # noqa: E731
        ref_patches.append((key, value(x_ref[key])))
        mc_patches.append((key, value(x_mc[key])))
        rows.append({"solver": solver, "layer": l, "site": site, "alpha": best["alpha"]})
    tuned, ids = study.tuned, study.allowed_ids("tuned")
    _, ref_rows = refusal_rates(tuned.model, tuned.tokenizer, refusal, ref_patches, ids,
                                batch_size=study.batch_size)
    mc_rows = mc_effects(tuned.model, tuned.tokenizer, mc, mc_patches, ids, study.batch_size, max_rows=study.max_rows)
    for row, r, c in zip(rows, ref_rows, mc_rows):
        row.update(r)
        row.update(c)
    study.run.write_json("side_effects.json", {"title": "RQ2 — side effects of the dev-chosen alpha per (solver, "
                                               "layer, site)", "table": rows, "n_refusal": len(refusal),
                                               "refusal_set": "refusal_probe, harmful half", "n_mc": len(mc)})


def _prepare(study: Study, opts: MapsOptions):
    """Steps 1-2 (capture, one maps step per solver), shared by both stages:
    (layers, control, val prompts (dev then test), n_dev, states)."""
    layers, control = study_layers(study, opts.layers, opts.control_layer)
    n_dev = opts.n_val // 2
    train, dev, test = fair_split(study, [opts.n_train, n_dev, opts.n_val - n_dev], opts.min_shared_ratio,
                                  study.seed)
    val = dev + test
    sites = [Site(s, l) for l in sorted(set(layers + [control])) for s in opts.sites]
    held = rq1_prompt_ids(study)
    study.run.write_json("rq2_prompts.json", {
        "train": [p["id"] for p in train], "dev": [p["id"] for p in dev], "test": [p["id"] for p in test],
        "val": [p["id"] for p in val], "split": "whole topic / translation clusters per part (steps.cluster_split)",
        "rq1_selection_prompts_held_out": len(held), "layers": layers, "control_layer": control,
        "sites": opts.sites})
    sig = {"layers": layers, "control": control, "sites": opts.sites, "n_train": opts.n_train,
           "n_val": opts.n_val, "k_positions": opts.k_positions, "exclude_last": opts.exclude_last,
           "seed": study.seed, "min_shared_ratio": opts.min_shared_ratio, "prompts": study.prompts_path,
           "train": prompt_digest(train), "val": prompt_digest(val)}
    study.run.cached("rq2.capture", lambda: _capture_step(study, train, val, sites, opts), [STATES], info=sig)
    states = study.run.read_tensors(STATES)
    for solver in opts.solvers:   # a solver fitted by an earlier run (same capture, same options) is reused
        study.run.cached(f"rq2.maps.{solver}", lambda s=solver: _maps_step(study, states, layers, control, opts, s, n_dev, group_ids(val)),
                         _maps_files(layers, control, opts.sites, solver), depends_on=["rq2.capture"],
                         info={"solver": solver, "shrink": opts.shrink})
    _gather_maps(study, states, layers, control, n_dev)
    return layers, control, val, n_dev, states


def run_maps_stage(study: Study, opts: MapsOptions) -> None:
    _prepare(study, opts)


def summarise_maps(study: Study, opts: MapsOptions) -> MapsResult:
    """The maps' figure; returns :class:`MapsResult` (the map chosen on dev)."""
    write_maps_figures(study.run)
    maps = study.run.read_json("maps.json")
    rows = maps.get("table") or []
    return MapsResult(best=maps.get("best"), layers=sorted({r["layer"] for r in rows if not r.get("control_layer")}),
                      control_layer=next((r["layer"] for r in rows if r.get("control_layer")), None))


def run_mapped_patch_stage(study: Study, opts: RQ2Options) -> None:
    layers, control, val, n_dev, states = _prepare(study, opts)
    study.run.cached("rq2.sweep", lambda: _sweep_step(study, val, n_dev, states, layers, control, opts),
                     ["variants.json"], depends_on=[f"rq2.maps.{s}" for s in opts.solvers],
                     info={"alphas": opts.mapped_alpha, "solvers": opts.solvers, "measure": opts.measure})
    if opts.side_effects:
        study.run.cached("rq2.side", lambda: _side_step(study, states, opts), ["side_effects.json"],
                         depends_on=["rq2.sweep"])


def summarise_mapped_patch(study: Study, opts: RQ2Options) -> MappedPatchResult:
    """alpha_sweep.json, rq2_summary.txt, figures; returns :class:`MappedPatchResult`."""
    return mapped_patch_result(summarise_rq2(study.run, opts))


MAPS = Stage(
    name="maps", options=MapsOptions, run=run_maps_stage, summarise=summarise_maps, check=check,
    requires=("rq1",), result=MapsResult, in_default_study=False,
    report=ReportHooks(topic="RQ2", metrics=("maps.json",)),
    help="RQ2: fit transport maps base -> tuned and score them on held-out prompts.",
    done_message="maps done: {path}  (maps.json, maps/, figures/)")
MAPPED_PATCH = Stage(
    name="mapped-patch", options=RQ2Options, run=run_mapped_patch_stage, summarise=summarise_mapped_patch,
    check=check, requires=("rq1", "maps"), result=MappedPatchResult,
    report=ReportHooks(topic="RQ2", sentences=rq2_sentences, figures=(FIG_B,), section=sweep_section,
                       numbers=rq2_numbers, metrics=("rq2.json", "alpha_sweep.json")),
    help="RQ2: mapped patching and the alpha-sweep (solvers compared; chosen on dev, reported "
                                 "on test), side effects, controls, stop conditions.",
    done_message="mapped patching done: {path}  (alpha_sweep.json, rq2_summary.txt, figures/)")
STAGES = (MAPS, MAPPED_PATCH)


def run_maps(pair, opts: MapsOptions, out=None, device=None, dtype=None, models=None, **common) -> RunDir:
    """Fit and score the maps (steps 1-2) and write the report (``run_stage("maps", ...)``)."""
    opts = MapsOptions(**{f.name: getattr(opts, f.name) for f in fields(MapsOptions)})
    return run_stage("maps", pair, opts, out=out, device=device, dtype=dtype, models=models, **common)


def run_mapped_patch(pair, opts: RQ2Options, out=None, device=None, dtype=None, models=None, **common) -> RunDir:
    """Maps (reused if done), the alpha-sweep on val, controls, side effects, summary, report."""
    return run_stage("mapped-patch", pair, opts, out=out, device=device, dtype=dtype, models=models, **common)
