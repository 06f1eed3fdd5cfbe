"""RQ1 — fair baseline: tokenizer fairness, CKA across layers, cross-model layer patching, behaviour.

Steps (resumable; outputs in the run directory):

1. fairness          shared vocabulary + prompt filter             -> fairness.json
2. ``rq1.capture``   last-content-token states at every layer       -> tensors/rq1_states.safetensors
3. ``rq1.cka``       debiased CKA (+ biased, null, jackknife CI)    -> cka.json
4. ``rq1.patch``     layer patching, both directions, next-token KL -> patch.json
5. ``rq1.behaviour`` behaviour table per model and the delta        -> behaviour.json
then rq1.json (headline, chosen layers), figures/ and report.html from those files.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mechdiff.analyses.cka import cka_matrix, cka_with_ci
from mechdiff.patching.kl import kl_shared, summarise
from mechdiff.artifacts import RunDir
from mechdiff.data.prompts import encode
from mechdiff.errors import ConfigError
from mechdiff.experiments.figure_data import FIG_A
from mechdiff.experiments.results import Rq1Result
from mechdiff.experiments.rq1_summary import rq1_result, summarise_rq1
from mechdiff.experiments.stage import SIDES, Stage, Study, opt, run_stage
from mechdiff.experiments.summaries import rq1_numbers, rq1_sentences
from mechdiff.experiments.steps import (capture_sides, check_layers, clean_run, group_ids, kl_and_gap, patch_measure,
                                        prompt_digest, select_prompts)
from mechdiff.patching import Patch, PatchEngine, patch_kl
from mechdiff.progress import warn
from mechdiff.report.hooks import ReportHooks
from mechdiff.sites.names import sites_at
from mechdiff.sites.names import SITE_NAMES
from mechdiff.sites.hooks import record
from mechdiff.analyses.behaviour import behaviour_delta, behaviour_table
from mechdiff.data.datasets import load_prompt_set

STATES = "tensors/rq1_states.safetensors"
DIRECTIONS = ("base->tuned", "tuned->base")


@dataclass
class RQ1Options:
    n_prompts: int = opt(150, "prompts used (after the fairness filter)")
    stride: int = opt(2, "CKA every STRIDE layers")
    site: str = opt("resid_post", "resid_post | attn_out | mlp_out")
    min_shared_ratio: float = opt(1.0, "keep prompts with at least this fraction of tokens in the shared "
                                       "vocabulary (1.0 strict)")
    layers: list[int] | None = opt(None, "patch only these layers, e.g. 10,20,24 (default: every layer)")
    all_positions: bool = opt(False, "also patch every position (needs identical tokenisation)")
    standardise: bool = opt(False, "standardise source / de-standardise into the destination with a "
                                   "calibration batch before patching")
    behaviour: bool = opt(True, "behaviour table (refusal, style, MC; generation)")
    n_perm: int = opt(20, "row-shuffled permutations for the CKA null")
    behaviour_n: int = opt(24, "prompts per behaviour set")
    max_new_tokens: int = opt(16, "generated tokens per prompt in the behaviour table")
    control_layer: int | None = opt(None, "control layer (default: the most similar layer in the first half)")
    measure: str = opt("decision", "the main readout, where next-token KL is read: decision (the patched "
                                   "token, as in the seeds) | last (the first reply token, end of the prompt)")
    readouts: list[str] = opt(help="readouts reported in patch.json (the main one always): decision,last",
                              factory=lambda: ["decision", "last"])


def check(opts: RQ1Options, n_layers: int) -> None:
    """Options that can be checked before any model work: layer ranges, counts, names."""
    check_layers(n_layers, layers=opts.layers, control_layer=opts.control_layer)
    if opts.stride < 1:
        raise ConfigError(f"--stride must be >= 1, got {opts.stride}")
    bad = [m for m in [opts.measure, *opts.readouts] if m not in READOUTS]
    if bad:
        raise ConfigError(f"--measure/--readouts: unknown readout(s) {bad}; use decision or last")
    if opts.n_prompts < 4:
        raise ConfigError(f"--n-prompts must be >= 4 (debiased CKA needs n > 3), got {opts.n_prompts}")
    if opts.site not in SITE_NAMES or opts.site.startswith("head"):
        raise ConfigError(f"--site: unknown site {opts.site!r}; use resid_post, resid_pre, attn_out or mlp_out")


def cka_layers(n_layers: int, stride: int) -> list[int]:
    """Every ``stride``-th layer counted 1-based (2, 4, 6, ... as in the seeds) plus the last, 0-based."""
    layers = list(range(stride - 1, n_layers, stride))
    return layers if layers and layers[-1] == n_layers - 1 else layers + [n_layers - 1]


def fair_prompts(study: Study, n_prompts: int, min_shared_ratio: float) -> list[dict]:
    """``n_prompts`` prompts that pass the shared-vocabulary filter, stratified by topic and language
    (seeded); writes fairness.json (fewer than asked: a warning and ``n_asked`` beside ``n_used``)."""
    kept = select_prompts(study, n_prompts, min_shared_ratio, seed=study.seed)
    _, report = study.fair_prompts(min_shared_ratio)
    study.run.write_json("fairness.json", {"vocab": study.vocab.report(), "filter": report,
                                           "min_shared_ratio": min_shared_ratio, "n_asked": n_prompts,
                                           "n_used": len(kept), "prompt_ids": [p["id"] for p in kept],
                                           "sampling": "stratified by topic and language, seeded"})
    return kept


def _capture_step(study: Study, prompts, site: str) -> None:
    """``[L, N, d]`` float32 per side: ``site`` at every layer, last content token."""
    out = {}
    for side in ("base", "tuned"):
        sites = sites_at(site, range(study.side(side).n_layers))
        cap = capture_sides(study, prompts, sites, sides=[side])[side]
        out[side] = torch.stack([cap[s] for s in sites])
    study.run.write_tensors(STATES, out)


def _cka_step(run: RunDir, X: torch.Tensor, Y: torch.Tensor, site: str, stride: int, n_perm: int,
              seed: int, groups: torch.Tensor) -> None:
    """Same depth: per-layer CKA with CI and null at the stride's layers; always the full matrix.
    X, Y: ``[L, N, d]`` states of base and tuned; groups ``[N]``: prompt clusters (the jackknife
    deletes whole clusters). The null uses its own seed at each layer (an independence null)."""
    out: dict = {"site": site, "n": X.shape[1], "n_groups": int(groups.max()) + 1 if len(groups) else 0,
                 "null": "row-shuffled independence null, a fresh permutation seed per layer"}
    if torch.cuda.is_available():
        X, Y = X.cuda(), Y.cuda()
    if X.shape[0] == Y.shape[0]:
        rows = []
        for l in cka_layers(X.shape[0], stride):
            r = cka_with_ci(X[l], Y[l], groups=groups if int(groups.max()) + 1 >= 4 else None,
                            method="jackknife", n_perm=n_perm, seed=seed * 1000 + l)
            rows.append({"layer": l, **{k: r[k] for k in ("debiased", "biased", "ci_low", "ci_high", "se",
                                                          "null_mean", "null_sd", "biased_null_mean")},
                         "influential_rows": r.get("influential_rows")})
        out["per_layer"] = rows
    lx, ly = cka_layers(X.shape[0], stride), cka_layers(Y.shape[0], stride)
    out["matrix_layers"] = {"base": lx, "tuned": ly}
    out["matrix_debiased"] = cka_matrix(X[lx], Y[ly], debiased=True).tolist()
    out["matrix_biased"] = cka_matrix(X[lx], Y[ly], debiased=False).tolist()
    run.write_json("cka.json", out)


def _standardiser(src: torch.Tensor, dst: torch.Tensor):
    """Map source states onto the destination's per-dimension mean/std (calibration: all prompts)."""
    ms, ss = src.mean(0), src.std(0).clamp_min(1e-6)
    md, sd = dst.mean(0), dst.std(0)
    return lambda x: (x - ms) / ss * sd + md


READOUTS = {"decision": "the next-token distribution at the patched token itself (the last token of the "
                         "user's text; the seeds' protocol, where the next token is mostly end-of-turn)",
            "last": "the first reply token: the end of the prompt, after the assistant header (what "
                    "shapes the answer)"}
MEANING = {"base->tuned": "the base model's state written into the tuned model; KL to the tuned model's "
                          "own clean output, and gap closed towards the base model's output",
           "tuned->base": "the tuned model's state written into the base model; KL to the base model's "
                          "own clean output, and gap closed towards the tuned model's output"}


def _readout(study: Study, prompts, layers: list[int], opts: RQ1Options, measure: str) -> dict:
    """Layer patching read at ``measure``, both directions: per layer KL(dst clean || patched)
    (masked to the shared vocabulary and unmasked), KL(src clean || patched) and the share of the
    clean gap KL(src || dst) it closes, plus the self-patch floor (dst's own state written back)."""
    sites = sites_at(opts.site, layers)
    clean, own = {}, {}
    for side in SIDES:   # patch sources along the destination engines' own path (exact no-ops)
        clean[side], own[side] = clean_run(study.side(side), prompts, sites, batch_size=study.batch_size,
                                           max_rows=study.max_rows, measure=measure)
    src_values = {side: torch.stack([own[side][str(s)] for s in sites]).float() for side in SIDES}
    std_info = None
    if opts.standardise:
        # Where base and tuned states are bit-equal (layers below a fine-tune's first change) the
        # standardiser is the identity in exact arithmetic but not in float: it is skipped there, so
        # the patch writes back the destination's own state and KL is exactly 0 (the no-op value).
        equal = [torch.equal(src_values["base"][j], src_values["tuned"][j]) for j in range(len(layers))]
        src_values = {src: torch.stack([src_values[src][j] if equal[j] else
                                        _standardiser(src_values[src][j], src_values[dst][j])(src_values[src][j])
                                        for j in range(len(layers))])
                      for src, dst in (d.split("->") for d in DIRECTIONS)}
        std_info = {"applied_layers": [l for l, e in zip(layers, equal) if not e],
                    "skipped_bit_equal_layers": [l for l, e in zip(layers, equal) if e],
                    "note": "standardisation skipped where base and tuned states are bit-equal: their "
                            "patch is the exact no-op (KL 0)"}
    floor_at = sorted({layers[0], layers[len(layers) // 2], layers[-1]})
    ids = {side: study.allowed_ids(side) for side in SIDES}
    cross = kl_shared(clean["base"], clean["tuned"], ids["base"], ids["tuned"])
    out: dict = {"measure": measure, "meaning": READOUTS[measure], "clean_cross_kl_shared": summarise(cross),
                 "floor_layers": floor_at, "directions": {}}
    if std_info is not None:
        out["standardise"] = std_info
    for direction in DIRECTIONS:
        src, dst = direction.split("->")
        variants = [Patch(s, src_values[src][j]) for j, s in enumerate(sites)] + \
                   [Patch(sites[layers.index(l)], own[dst][str(sites[layers.index(l)])]) for l in floor_at]
        k = patch_measure(study.side(dst), prompts, variants, batch_size=study.batch_size, measure=measure,
                          max_rows=study.max_rows, reducer=kl_and_gap(ids[dst], clean[src], ids[src]))   # [L + F, N, 3]
        gap = kl_shared(clean[src], clean[dst], ids[src], ids[dst])            # [N] KL(src || dst clean)
        km, ku, ko, floor = k[:len(layers), :, 0], k[:len(layers), :, 1], k[:len(layers), :, 2], k[len(layers):, :, 0]
        g = float(gap.mean())
        out["directions"][direction] = {
            "meaning": MEANING[direction],
            "masked": [{"layer": l, **summarise(km[j])} for j, l in enumerate(layers)],
            "unmasked": [{"layer": l, **summarise(ku[j])} for j, l in enumerate(layers)],
            "kl_to_source": [{"layer": l, **summarise(ko[j])} for j, l in enumerate(layers)],
            "gap_closed": [{"layer": l, "share": (1 - float(ko[j].mean()) / g) if g > 0 else None}
                           for j, l in enumerate(layers)],
            "clean_gap_kl": summarise(gap),
            "floor": {"layers": floor_at, "max": float(floor.max()), "mean": float(floor.mean())},
            "per_prompt_masked": km.tolist()}
    return out


def _patch_step(study: Study, prompts, opts: RQ1Options) -> None:
    """Layer patching at every layer (or ``opts.layers``), both directions, read at both readouts;
    ``directions`` holds the ``opts.measure`` readout (the file's original layout), ``readouts`` both."""
    layers = opts.layers or list(range(study.base.n_layers))
    readouts = {m: _readout(study, prompts, layers, opts, m) for m in dict.fromkeys([opts.measure, *opts.readouts])}
    main = readouts[opts.measure]
    result: dict = {"site": opts.site, "layers": layers, "measure": opts.measure, "directions": main["directions"],
                    "clean_cross_kl_shared": main["clean_cross_kl_shared"], "readouts": readouts,
                    "groups": group_ids(prompts).tolist()}
    if "standardise" in main:
        result["standardise"] = main["standardise"]
        if main["standardise"]["skipped_bit_equal_layers"]:
            warn(f"--standardise: skipped at layers {main['standardise']['skipped_bit_equal_layers']}, where base "
                 f"and tuned states are bit-equal (their patch KL is the exact no-op value 0)")
    if opts.all_positions:
        result["all_positions"] = _all_positions(study, prompts, layers, opts)
    study.run.write_json("patch.json", result)


def _all_positions(study: Study, prompts, layers, opts) -> dict:
    """Patch every position (needs identical tokenisation on both sides); base->tuned only, in chunks
    of ``--batch-size`` prompts."""
    base, tuned = study.base, study.tuned
    sites, kls = sites_at(opts.site, layers), []
    for i in range(0, len(prompts), study.batch_size):
        chunk = prompts[i:i + study.batch_size]
        bb, bt = encode(base.tokenizer, chunk), encode(tuned.tokenizer, chunk)
        if bb.input_ids.shape != bt.input_ids.shape or not torch.equal(bb.input_ids, bt.input_ids):
            raise ConfigError("--all-positions needs both tokenizers to tokenise the prompts identically; "
                              "they do not (extended vocabulary?): patch the decision token only")
        with torch.no_grad(), record(base.model, sites) as rec:
            base.model(**bb.to(base.device).model_inputs())
        eng = PatchEngine(tuned.model, bt, measure=opts.measure, max_rows=study.max_rows)
        kls.append(patch_kl(eng, [Patch(s, rec[s]) for s in sites], study.allowed_ids("tuned"), positions="all"))
    kl = torch.cat(kls, 1)
    return {"direction": "base->tuned", "masked": [{"layer": l, **summarise(kl[j])}
                                                   for j, l in enumerate(layers)]}


def _behaviour_step(study: Study, prompts, opts: RQ1Options) -> None:
    n = opts.behaviour_n
    sets = {"target": prompts[:n], "refusal_probe": load_prompt_set("refusal_probe")[:n],
            "mc": load_prompt_set("mc")[:n]}
    tables = {name: behaviour_table(study.side(name).model, study.side(name).tokenizer, sets,
                                    allowed_ids=study.allowed_ids(name), max_new_tokens=opts.max_new_tokens,
                                    batch_size=study.batch_size)
              for name in ("base", "tuned")}
    study.run.write_json("behaviour.json", {"base": tables["base"], "tuned": tables["tuned"],
                                            "delta": behaviour_delta(tables["base"], tables["tuned"]),
                                            "n_per_set": {k: len(v) for k, v in sets.items()}})


def run_rq1_stage(study: Study, opts: RQ1Options) -> None:
    """The RQ1 steps (finished ones are skipped on resume)."""
    run_dir = study.run
    prompts = fair_prompts(study, opts.n_prompts, opts.min_shared_ratio)
    digest = prompt_digest(prompts)   # every step's key covers the prompts' content, not only their ids
    run_dir.cached("rq1.capture", lambda: _capture_step(study, prompts, opts.site), [STATES],
                   info={"prompts": digest, "site": opts.site})
    states = run_dir.read_tensors(STATES)
    run_dir.cached("rq1.cka", lambda: _cka_step(run_dir, states["base"], states["tuned"], opts.site,
                                                opts.stride, opts.n_perm, study.seed, group_ids(prompts)),
                   ["cka.json"], depends_on=["rq1.capture"],
                   info={"stride": opts.stride, "n_perm": opts.n_perm, "seed": study.seed})
    if study.same_shape:
        run_dir.cached("rq1.patch", lambda: _patch_step(study, prompts, opts), ["patch.json"],
                       info={"prompts": digest, "site": opts.site, "layers": opts.layers, "measure": opts.measure,
                             "readouts": opts.readouts,
                             "standardise": opts.standardise, "all_positions": opts.all_positions})
    else:
        warn(f"layer patching skipped: the models differ in width or depth (base d={study.base.d_model}, "
             f"L={study.base.n_layers}; tuned d={study.tuned.d_model}, L={study.tuned.n_layers}); use "
             "`mechdiff mapped-patch`, which maps states between widths")
    if opts.behaviour:
        run_dir.cached("rq1.behaviour", lambda: _behaviour_step(study, prompts, opts), ["behaviour.json"],
                       info={"prompts": digest, "behaviour_n": opts.behaviour_n,
                             "max_new_tokens": opts.max_new_tokens})


def summarise_rq1_stage(study: Study, opts: RQ1Options) -> Rq1Result:
    """rq1.json, figures; returns the typed result the later stages read (:class:`Rq1Result`)."""
    out = summarise_rq1(study.run, study.pair, study.base, study.tuned, opts)
    return rq1_result(out, opts.control_layer is not None)


REPORT = ReportHooks(topic="RQ1", sentences=rq1_sentences, figures=(FIG_A,), numbers=rq1_numbers,
                     metrics=("rq1.json",))
STAGE = Stage(
    name="rq1", options=RQ1Options, run=run_rq1_stage, summarise=summarise_rq1_stage, check=check,
    result=Rq1Result, report=REPORT,
    help="RQ1: fairness report, CKA per layer (debiased, CI, null), cross-model layer patching, behaviour.",
    done_message="RQ1 done: {path}  (rq1.json, figures/, report.html)")
STAGES = (STAGE,)


def run_rq1(pair, opts: RQ1Options, out=None, device=None, dtype=None, models=None, **common) -> RunDir:
    """Run RQ1 end to end (resuming finished steps) and return the run directory (``run_stage``)."""
    return run_stage("rq1", pair, opts, out=out, device=device, dtype=dtype, models=models, **common)
