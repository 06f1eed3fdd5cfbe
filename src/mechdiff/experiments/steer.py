"""RQ3 — the causal handle: is the fine-tune's change a small, steerable subspace? (stage ``steer``)

At each chosen layer (RQ1's, else fallbacks) rank-k handles are built from fit prompts
(``analyses.steering``): ``diff`` (tuned - base states on the same prompts, no labels), ``contrast``
(aligned = target prompts vs neutral prompts, in the tuned model's space) and a seeded ``random``
basis of the same k (control); with ``--transfer-lang kk`` also handles fitted on that language's
prompts only; the same handles are also applied at RQ1's control layer (control). Fit / dev / test
prompts are disjoint whole topic / translation clusters (``steps.cluster_split``, the split RQ2 uses too;
RQ1's layer-selection prompts in the same run directory are kept out of dev and test). Every
(layer, handle, mode, k, alpha) cell is one batched engine variant:
``steer`` (h + a h U U^T) and ``add`` (h + a s u, s = the mean ||h|| on the fit prompts) in the base,
``ablate`` (h - a h U U^T) in the tuned model.

Metric: the share of the base-to-tuned gap closed, ``1 - mean KL(other || patched) / mean KL(other ||
self)`` over the shared vocabulary at the measured token (other = tuned when steering the base, base
when ablating the tuned). Alpha is chosen on the dev split (best dev share among the alphas within
the side-effect thresholds), effects are reported on held-out test prompts. Side effects per cell
(``analyses.readouts``, for the handles at their own layer; controls choose alpha on dev alone):
next-token perplexity change on the neutral set, gated where the response starts (``--side-measure
last``) and reported beside at the patched token, and the neutral MC accuracy drop (masked and
unmasked). The minimal k is the smallest k whose dev-chosen cell closes >= ``--gap-threshold`` on test
within the side-effect thresholds; the k where the effect saturates (>= 90% of its best) is beside it.
A pair without a gap (a model against itself) gives "nothing to steer".

Steps (resumable): ``rq3.capture`` -> tensors/rq3_states.safetensors; ``rq3.bases`` ->
tensors/rq3_bases.safetensors + rq3_bases.json (logit lens); ``rq3.sweep`` -> tensors/rq3_sweep.safetensors
+ rq3_cells.json; ``rq3.side`` -> rq3_side.json. ``summarise``: rq3.json (every cell), handles/,
figures/steer_vs_k.png, rq3_summary.txt.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mechdiff.analyses import rank as RK
from mechdiff.analyses import readouts as R
from mechdiff.analyses import steering as S
from mechdiff.models.planted import ground_truth, ground_truth_tensors
from mechdiff.patching.kl import kl_shared
from mechdiff.errors import ConfigError, NumericsError
from mechdiff.experiments.figure_data import FIG_C
from mechdiff.experiments.results import SteerResult
from mechdiff.experiments.steer_summary import BASES, STATES, SWEEP, handle_of, summarise
from mechdiff.experiments.stage import Stage, Study, opt
from mechdiff.options import STEER_ALPHA
from mechdiff.experiments.summaries import rq3_numbers, rq3_sentences
from mechdiff.report.hooks import ReportHooks
from mechdiff.experiments.steps import (capture_sides, check_layers, clean_run, cluster_split, fair_split,  # noqa: F401
                                        group_ids, kl_and_gap, patch_measure, prompt_digest, study_layers)
from mechdiff.data.datasets import load_prompt_set
from mechdiff.experiments.common import load_dataset_ref
from mechdiff.patching import Patch

KINDS, SIDE_OF = ("diff", "contrast"), {"steer": "base", "add": "base", "ablate": "tuned", "map": "base"}
OTHER = {"base": "tuned", "tuned": "base"}


@dataclass
class RQ3Options:
    layers: list[int] | None = opt(None, "layers to build handles at (default: RQ1's choice in this run directory)")
    control_layer: int | None = opt(None, "control layer (default: RQ1's control, else ~10/32 depth)")
    site: str = opt("resid_post", "resid_pre | resid_post | attn_out | mlp_out")
    ks: list[int] = opt(help="ranks k (comma list)", factory=lambda: [1, 2, 3, 4, 6, 8], flag="--k")
    steer_alpha: list[float] = opt(help="handle strengths, numbers > 0 (alpha of each mode's formula: steer "
                                        "h + alpha (h U) U^T, add h + alpha s u, ablate h + alpha ((r - h) U) U^T "
                                        "with the values <= 1); chosen on the dev split",
                                   factory=lambda: [0.5, 1.0, 2.0, 3.0], kind=STEER_ALPHA, was=("alpha", "alphas"))
    bases: list[str] = opt(help="handle kinds: diff (tuned - base), contrast (target vs neutral prompts)",
                           factory=lambda: list(KINDS))
    modes: list[str] = opt(help="steer, add (in the base), ablate (in the tuned)", factory=lambda: list(S.MODES))
    n_fit: int = opt(200, "prompts the handles are fitted on (and as many neutral prompts for contrast)")
    n_dev: int = opt(50, "dev prompts (alpha is chosen here)")
    n_test: int = opt(150, "held-out test prompts (effects are reported here)")
    n_neutral: int = opt(48, "neutral prompts for the perplexity side effect")
    n_mc: int = opt(32, "neutral multiple-choice items for the accuracy side effect (0: off)")
    positions: str = opt("decision", "decision (the last content token) | all (every position)")
    measure: str = opt("decision", "where next-token KL to the other model is read: decision (the patched "
                                   "token, as in the seeds) | last (end of the prompt)")
    side_measure: str = opt("last", "where the neutral perplexity side effect is gated: last (the response's "
                                    "first token) | decision (the patched token); the other is reported beside")
    gap_threshold: float = opt(0.1, "share of the gap a handle must close on test prompts")
    max_ppl_pct: float = opt(5.0, "side-effect threshold: neutral perplexity increase, %")
    max_mc_drop_pp: float = opt(5.0, "side-effect threshold: neutral MC accuracy drop, points")
    max_ppl_pct_patched: float = opt(100.0, "side-effect threshold where the patch acts (the other of "
                                            "--side-measure's positions): neutral perplexity increase, %")
    min_gap_kl: float = opt(1e-3, "below this mean KL(base, tuned) (nats) there is nothing to steer")
    transfer_lang: str | None = opt("kk", "also fit handles on this language only and read them on every language")
    min_shared_ratio: float = opt(1.0, "keep prompts with at least this fraction of tokens in the shared vocabulary")


def check(opts: RQ3Options, n_layers: int) -> None:
    """Everything that can be checked before model work (ConfigError naming the option)."""
    check_layers(n_layers, layers=opts.layers, control_layer=opts.control_layer)
    bad = [(f, v, ok) for f, v, ok in (
        ("--site", opts.site, opts.site in ("resid_pre", "resid_post", "attn_out", "mlp_out")),
        ("--k", opts.ks, bool(opts.ks) and all(isinstance(k, int) and 1 <= k <= 4096 for k in opts.ks)),
        ("--steer-alpha", opts.steer_alpha, bool(opts.steer_alpha)),
        ("--bases", opts.bases, bool(opts.bases) and set(opts.bases) <= set(KINDS)),
        ("--modes", opts.modes, bool(opts.modes) and set(opts.modes) <= set(S.MODES)),
        ("--positions", opts.positions, opts.positions in ("decision", "all")),
        ("--measure", opts.measure, opts.measure in ("decision", "last")),
        ("--side-measure", opts.side_measure, opts.side_measure in ("decision", "last")),
        ("--n-fit", opts.n_fit, opts.n_fit > max(opts.ks or [0])),
        ("--n-dev", opts.n_dev, opts.n_dev >= 1), ("--n-test", opts.n_test, opts.n_test >= 1),
        ("--n-neutral", opts.n_neutral, opts.n_neutral >= 0), ("--n-mc", opts.n_mc, opts.n_mc >= 0),
        ("--gap-threshold", opts.gap_threshold, 0 < opts.gap_threshold <= 1),
        ("--max-ppl-pct", opts.max_ppl_pct, opts.max_ppl_pct >= 0),
        ("--max-mc-drop-pp", opts.max_mc_drop_pp, opts.max_mc_drop_pp >= 0),
        ("--max-ppl-pct-patched", opts.max_ppl_pct_patched, opts.max_ppl_pct_patched >= 0),
        ("--min-gap-kl", opts.min_gap_kl, opts.min_gap_kl >= 0),
        ("--min-shared-ratio", opts.min_shared_ratio, 0 <= opts.min_shared_ratio <= 1)) if not ok]
    if opts.ks and all(isinstance(k, int) for k in opts.ks) and opts.n_fit <= max(opts.ks):
        raise ConfigError(f"--k {max(opts.ks)} needs more fit prompts: --n-fit ({opts.n_fit}) must exceed the largest "
                          "k; lower --k or raise --n-fit")
    if bad:
        f, v, _ = bad[0]
        raise ConfigError(f"{f}: invalid value {v!r} (see `mechdiff steer --help`; --n-fit must exceed the "
                          f"largest k, --steer-alpha must be non-empty, --bases from {KINDS}, --modes from {S.MODES})")


# ------------------------------------------------------------------------------------- plan
def _plan(study: Study, opts: RQ3Options) -> dict:
    layers, control = study_layers(study, opts.layers, opts.control_layer)
    fit, dev, test = fair_split(study, [opts.n_fit, opts.n_dev, opts.n_test], opts.min_shared_ratio, study.seed)
    ref = study.pair.datasets.get("neutral")
    pool = load_dataset_ref(ref) if ref is not None else load_prompt_set("neutral")
    target_ids = {p["id"] for p in study.target_prompts}
    pool = [p for p in pool if p["id"] not in target_ids]
    nfit, neutral = cluster_split(pool, [min(opts.n_fit, len(pool) // 2) if "contrast" in opts.bases else 0,
                                         min(opts.n_neutral, len(pool) // 2)], study.seed) if pool else ([], [])
    mc = [it for it in load_prompt_set("mc") if it.get("category") == "general"][: opts.n_mc]
    lang = opts.transfer_lang
    fit_lang = [p for p in fit if p.get("lang") == lang] if lang else []
    return {"layers": layers, "control": control, "all_layers": sorted(set(layers) | {control}),
            "fit": fit, "dev": dev, "test": test, "neutral_fit": nfit, "neutral": neutral, "mc": mc,
            "fit_lang": fit_lang if len(fit_lang) > max(opts.ks) else [],
            "kinds": [k for k in opts.bases if k != "contrast" or nfit] + ["random"]}


def _sites(plan, opts) -> list[str]:
    return [f"{opts.site}.{l}" for l in plan["all_layers"]]


# ------------------------------------------------------------------------------------- steps
def _every_position(batch):
    """Capture positions for ``--positions all``: every non-padding token of each prompt."""
    B, T = batch.input_ids.shape
    return torch.arange(T)[None].expand(B, T), batch.mask.bool()


def _capture(study: Study, plan: dict, opts: RQ3Options) -> None:
    """Fit states of both sides at the positions the handles are applied to (the decision token, or
    every token with ``--positions all``; ``fit_rows`` [M]: each row's prompt), the tuned model's on the
    neutral fit prompts (contrast), and both sides' decision-token states on the dev + test prompts
    (the reference of the sweep's ablation and of the whole-difference patch)."""
    sites, out = _sites(plan, opts), {}
    pos = _every_position if opts.positions == "all" else "last"
    for side, cap in capture_sides(study, plan["fit"], sites, positions=pos).items():
        for s in sites:
            out[f"{side}/fit/{s}"], out["fit_rows"] = cap.flat(s)
    if plan["neutral_fit"]:
        cap = capture_sides(study, plan["neutral_fit"], sites, sides=["tuned"], positions=pos)["tuned"]
        for s in sites:
            out[f"tuned/neutral_fit/{s}"], out["neutral_fit_rows"] = cap.flat(s)
    for side, cap in capture_sides(study, plan["dev"] + plan["test"], sites).items():
        out.update({f"{side}/eval/{s}": cap[s] for s in sites})
    study.run.write_tensors(STATES, out)


def _bases(study: Study, plan: dict, opts: RQ3Options, states: dict) -> None:
    """One basis of the largest k per (handle, chosen layer): smaller k are its first columns (nested;
    a difference of exactly rank r < k gives r columns: ``exact_rank`` in rq3_bases.json).
    ``scale.<layer>``: the base's mean state norm on the fit prompts there (the size of an ``add`` step);
    ``mean.base.<layer>``: the base's mean state there (a deployed ablation's reference);
    ``mapA|mapc.<handle>@<layer>.k<k>``: the map handle's affine map at each layer it is applied to.
    ``rank.<layer>`` (JSON): the rank estimate of the difference (:func:`mechdiff.analyses.rank.estimate_rank`)."""
    kmax, out, info = max(opts.ks), {}, {}
    groups = group_ids(plan["fit"])[states["fit_rows"]]
    lang_of = lambda ps, rows: [i for i, j in enumerate(rows.tolist())  # noqa: E731  (rows -> their prompt)
                                if ps[j].get("lang") == opts.transfer_lang]
    lang_rows = lang_of(plan["fit"], states["fit_rows"])
    nlang = lang_of(plan["neutral_fit"], states["neutral_fit_rows"]) if plan["neutral_fit"] else []
    for l in plan["all_layers"]:
        s = f"{opts.site}.{l}"
        T, N, Bs = states[f"tuned/fit/{s}"], states.get(f"tuned/neutral_fit/{s}"), states[f"base/fit/{s}"]
        out[f"scale.{l}"] = Bs.norm(dim=-1).mean().reshape(1)
        out[f"mean.base.{l}"] = Bs.mean(0)
        if l in plan["layers"] and T.shape == Bs.shape:
            info[f"rank.{l}"] = rank_info(study, T, Bs, groups, l)
        for kind in plan["kinds"] if l in plan["layers"] else []:
            for lang in [None] + ([opts.transfer_lang] if plan["fit_lang"] and kind != "random" else []):
                key, rows = f"{kind}{'@' + lang if lang else ''}.{l}", (lang_rows if lang else slice(None))
                try:
                    if kind == "random":
                        U = S.random_basis(T.shape[1], kmax, seed=study.seed + l)
                    elif kind == "diff":
                        U = S.diff_basis(T[rows], Bs[rows], kmax, at_most=True)
                    else:
                        U = S.contrast_basis(T[rows], N[nlang] if lang and len(nlang) > 1 else N, kmax)
                except (NumericsError, ConfigError) as e:
                    info[key] = {"skipped": str(e)}
                    continue
                out[key] = U
                info[key] = {"lens": S.logit_lens(study.tuned.model, study.tuned.tokenizer, U[:, :min(kmax, 4)]),
                             **({"exact_rank": U.shape[1]} if U.shape[1] < kmax else {})}
                for at in ([l] + ([plan["control"]] if plan["control"] not in plan["layers"] else [])) \
                        if not lang and "map" in opts.modes and study.same_width else []:
                    sa = f"{opts.site}.{at}"
                    for k in (k for k in opts.ks if k <= U.shape[1]):
                        out[f"mapA.{key}@{at}.k{k}"], out[f"mapc.{key}@{at}.k{k}"] = S.fit_map(
                            U[:, :k], states[f"tuned/fit/{sa}"], states[f"base/fit/{sa}"])
    study.run.write_tensors(BASES, out)
    study.run.write_json("rq3_bases.json", info)


def rank_info(study: Study, T: torch.Tensor, Bs: torch.Tensor, groups: torch.Tensor, layer: int) -> dict:
    """The rank estimate of ``T - Bs`` (fit rows) with its interval over topic groups; where the pair
    carries a planted truth (``u`` [d, r]), the principal angles between the top-r basis and it."""
    D = RK.differences(T, Bs)
    est = RK.estimate_rank(D, groups, scale=float(Bs.double().pow(2).mean().sqrt()), seed=study.seed)
    truth = planted_subspace(study, layer)
    if truth is not None and est["estimate"] >= 1:
        r = truth.shape[1]
        top = torch.linalg.svd(D, full_matrices=False)[2][:r].T
        est["truth_rank"], est["principal_angles_deg"] = r, RK.principal_angles(top, truth.double()).tolist()
    return est


def planted_subspace(study: Study, layer: int) -> torch.Tensor | None:
    """``[d, r]`` the planted column space of a planted pair's change at ``layer`` (None elsewhere)."""
    planted = getattr(study.pair.base, "planted", None)
    if not planted:
        return None
    gt = ground_truth(planted[0])
    t = ground_truth_tensors(planted[0])
    return t["u"] if "u" in t and layer in (gt.get("layers") or []) else None


def _cells(plan: dict, opts: RQ3Options, bases: dict, same_width: bool) -> list[dict]:
    """Every (layer, handle, mode, k, alpha). At the control layer: the same handles (fitted at each
    chosen layer, ``basis_layer``) applied there, random and per-language ones left out."""
    cells, control = [], plan["control"]
    for key in handle_keys(bases):
        name, bl = key.rsplit(".", 1)
        kind, _, lang = name.partition("@")
        at = [int(bl)] + ([control] if kind != "random" and not lang and control not in plan["layers"] else [])
        for l in at:
            for mode in opts.modes:
                if SIDE_OF[mode] == "base" and not same_width or mode == "map" and f"mapA.{key}@{l}.k1" not in bases:
                    continue
                alphas = ([a for a in opts.steer_alpha if a <= 1] or [1.0]) if mode == "ablate" else opts.steer_alpha
                for k in ([1] if mode == "add" else sorted(k for k in set(opts.ks) if k <= bases[key].shape[1])):
                    cells += [{"layer": l, "basis_layer": int(bl), "kind": kind, "fit_lang": lang or None,
                               "mode": mode, "k": k, "alpha": a, "control_layer": l == control and l != int(bl),
                               "side": SIDE_OF[mode]} for a in alphas]
    if opts.positions == "decision" and any(k.startswith("diff.") for k in bases):   # the whole difference
        for l in plan["layers"]:
            cells += [{"layer": l, "basis_layer": l, "kind": "full", "fit_lang": None, "mode": f"patch_{side}",
                       "k": None, "alpha": 1.0, "control_layer": False, "side": side}
                      for side in ("base", "tuned") if side == "tuned" or same_width]
    return cells


def handle_keys(bases: dict) -> list[str]:
    """The handle bases among the stored tensors (``<kind>[@lang].<layer>``)."""
    return sorted(k for k in bases if k.split(".")[0].split("@")[0] in KINDS + ("random",))


def _variants(cells, bases, opts, states: dict | None = None) -> list:
    """Engine variants of ``cells``. With the dev + test ``states``: an ablation moves the subspace
    component to the other model's state on the same prompt, and ``full`` cells patch the other
    model's whole state (the whole difference) at the layer."""
    out = []
    for c in cells:
        site = f"{opts.site}.{c['layer']}"
        other = states.get(f"{OTHER[c['side']]}/eval/{site}") if states else None
        if c["kind"] == "full":
            out.append(Patch(site, other, mode="replace"))
        else:
            out.append(handle_of(c, bases, opts.site).patch(
                reference=other if c["mode"] == "ablate" and opts.positions == "decision" else None))
    return out


def _sweep(study: Study, plan: dict, opts: RQ3Options, bases: dict, states: dict) -> None:
    """The gap and every cell on the dev + test prompts, in three clean runs: the tuned model's
    (reference for steering the base), the base's with its variants (its clean logits, collected
    chunk by chunk, are the reference for ablating the tuned), the tuned's with its variants (skipped
    without a gap). Per cell and prompt: KL(clean || patched) masked / unmasked and KL(other || patched)."""
    ev, pos = plan["dev"] + plan["test"], {"positions": "all"} if opts.positions == "all" else {}
    ids = {s: study.allowed_ids(s) for s in ("base", "tuned")}
    cells = _cells(plan, opts, bases, study.same_width)
    handles = any(c["kind"] not in ("random", "full") for c in cells)   # none: no difference to build a handle from
    mine = {s: [c for c in cells if c["side"] == s] if handles else [] for s in ("base", "tuned")}
    run = lambda side, clean: clean_run(study.side(side), ev, batch_size=study.batch_size,  # noqa: E731
                                        max_rows=study.max_rows, measure=opts.measure)[0] if clean else None
    ref, res = {"tuned": run("tuned", True)}, {}
    if mine["base"]:
        chunks: list = []
        res["base"] = patch_measure(study.base, ev, _variants(mine["base"], bases, opts, states), batch_size=study.batch_size,
                                    max_rows=study.max_rows,
                                    measure=opts.measure, reducer=kl_and_gap(ids["base"], ref["tuned"], ids["tuned"]),
                                    on_chunk=lambda eng, i, j: chunks.append(eng.clean_logits.cpu()), **pos)
        ref["base"] = torch.cat(chunks)
    else:
        ref["base"] = run("base", True)
    gap = {s: kl_shared(ref[OTHER[s]], ref[s], ids[OTHER[s]], ids[s]) for s in ("base", "tuned")}  # KL(other||self)
    meta = {"eval_ids": [p["id"] for p in ev], "eval_lang": [p.get("lang") for p in ev], "n_dev": len(plan["dev"]),
            "eval_groups": group_ids(ev).tolist(),
            "gap_mean": {s: float(gap[s].mean()) for s in gap}, "cells": cells, "handles": handles}
    meta["nothing_to_steer"] = max(meta["gap_mean"].values()) <= opts.min_gap_kl
    out = {f"{s}/gap": gap[s] for s in gap}
    if not meta["nothing_to_steer"]:
        if mine["tuned"]:
            res["tuned"] = patch_measure(study.tuned, ev, _variants(mine["tuned"], bases, opts, states),
                                         batch_size=study.batch_size, max_rows=study.max_rows, measure=opts.measure,
                                         reducer=kl_and_gap(ids["tuned"], ref["base"], ids["base"]), **pos)
        for s, v in res.items():                          # [n, N, (masked, unmasked, to_other)]
            out.update({f"{s}/kl": v[..., 2], f"{s}/self_kl": v[..., 0]})
    study.run.write_tensors(SWEEP, out)
    study.run.write_json("rq3_cells.json", meta)


def measured(cell: dict) -> bool:
    """Cells whose side effects are measured: the handles at their own layer. Controls (random basis,
    control layer) and per-language handles choose alpha on dev alone (an advantage to the control)."""
    return cell["kind"] not in ("random", "full") and not cell["fit_lang"] and cell["layer"] == cell["basis_layer"]


def _side(study: Study, plan: dict, opts: RQ3Options, bases: dict) -> None:
    """Side effects of every handle cell (:func:`measured`) on the neutral prompts and MC items."""
    cells = study.run.read_json("rq3_cells.json")["cells"]
    rows: list = [{} for _ in cells]
    for side in ("base", "tuned"):
        idx = [i for i, c in enumerate(cells) if c["side"] == side and measured(c)]
        if idx:
            res = R.side_effects(study.side(side), plan["neutral"], plan["mc"], _variants([cells[i] for i in idx],
                                 bases, opts), study.allowed_ids(side), batch_size=study.batch_size,
                                 max_rows=study.max_rows,
                                 measure=opts.side_measure, also=opts.measure, positions=opts.positions)
            for j, i in enumerate(idx):
                rows[i] = res[j]
    study.run.write_json("rq3_side.json", {"rows": rows, "n_neutral": len(plan["neutral"]), "n_mc": len(plan["mc"]),
                                           "measure": opts.side_measure})


def run_rq3(study: Study, opts: RQ3Options) -> None:
    """The RQ3 steps (finished ones are skipped on resume; ``info`` holds every option a step reads)."""
    run, plan = study.run, _plan(study, opts)
    run.write_json("rq3_prompts.json", {k: [p["id"] for p in plan[k]] for k in
                                        ("fit", "dev", "test", "neutral_fit", "neutral", "mc", "fit_lang")}
                   | {"layers": plan["layers"], "control_layer": plan["control"]})
    common = {"layers": plan["all_layers"], "site": opts.site, "n_fit": opts.n_fit, "n_dev": opts.n_dev,
              "n_test": opts.n_test, "n_neutral": opts.n_neutral, "n_mc": opts.n_mc, "seed": study.seed,
              "min_shared_ratio": opts.min_shared_ratio, "prompts": study.prompts_path,
              "bases": opts.bases, "fit": prompt_digest(plan["fit"] + plan["neutral_fit"]),
              "positions": opts.positions, "eval": prompt_digest(plan["dev"] + plan["test"])}
    run.cached("rq3.capture", lambda: _capture(study, plan, opts), [STATES], info=common)
    states = run.read_tensors(STATES)
    run.cached("rq3.bases", lambda: _bases(study, plan, opts, states), [BASES, "rq3_bases.json"],
               depends_on=["rq3.capture"], info={**common, "ks": opts.ks, "transfer_lang": opts.transfer_lang,
                                                 "modes": opts.modes})
    bases = run.read_tensors(BASES) if run.exists(BASES) else {}
    sweep_info = {**common, "ks": opts.ks, "alphas": opts.steer_alpha, "modes": opts.modes, "positions": opts.positions,
                  "measure": opts.measure, "min_gap_kl": opts.min_gap_kl, "transfer_lang": opts.transfer_lang,
                  "eval": prompt_digest(plan["dev"] + plan["test"])}
    run.cached("rq3.sweep", lambda: _sweep(study, plan, opts, bases, states), [SWEEP, "rq3_cells.json"],
               depends_on=["rq3.bases"], info=sweep_info)
    meta = run.read_json("rq3_cells.json")
    if meta["handles"] and not meta["nothing_to_steer"]:
        run.cached("rq3.side", lambda: _side(study, plan, opts, bases), ["rq3_side.json"],
                   depends_on=["rq3.sweep"], info={**sweep_info, "side_measure": opts.side_measure,
                                                   "side": prompt_digest(plan["neutral"] + plan["mc"])})


def summarise_rq3(study: Study, opts: RQ3Options) -> SteerResult:
    """rq3.json, rq3_summary.txt, handles/, the figure; returns :class:`SteerResult`."""
    out = summarise(study, opts)
    res, prompts = out["result"], study.run.read_json("rq3_prompts.json")
    text = res.get("text")
    return SteerResult(status=res["status"], minimal_k=res["minimal_k"], layers=list(prompts["layers"]),
                       control_layer=prompts["control_layer"], text=[text] if isinstance(text, str) else list(text or []),
                       rank={l: {k: r[k] for k in ("estimate", "ci_low", "ci_high", "exact")}
                             for l, r in (res.get("rank") or {}).items()},
                       handles=list(out.get("handles") or []))


REPORT = ReportHooks(topic="RQ3", sentences=rq3_sentences, figures=(FIG_C,), numbers=rq3_numbers)
STAGE = Stage(
    name="steer", options=RQ3Options, run=run_rq3, summarise=summarise_rq3, check=check,
    requires=("rq1",), result=SteerResult, report=REPORT,
    help="RQ3: rank-k steering (base) and ablation (tuned) handles, minimal k, side effects, controls, transfer.",
    done_message="RQ3 done: {path}  (rq3.json, rq3_summary.txt, handles/, figures/steer_vs_k.png)")
STAGES = (STAGE,)
