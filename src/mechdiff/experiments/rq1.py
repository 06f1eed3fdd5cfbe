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
from mechdiff.analyses.kl import kl_shared, summarise
from mechdiff.artifacts import RunDir
from mechdiff.data.prompts import encode
from mechdiff.errors import ConfigError
from mechdiff.experiments.common import open_models, open_run, target_prompts
from mechdiff.fairness import SharedVocab, filter_prompts, shared_vocab
from mechdiff.models.load import LoadedModel
from mechdiff.pairs import Pair
from mechdiff.patching import Patch, PatchEngine, kl_reducer, patch_kl
from mechdiff.sites.capture import capture

STATES = "tensors/rq1_states.safetensors"
DIRECTIONS = ("base->tuned", "tuned->base")


@dataclass
class RQ1Options:
    n_prompts: int = 150
    stride: int = 2
    site: str = "resid_post"
    min_shared_ratio: float = 1.0
    layers: list[int] | None = None   # patch these layers (default: every layer)
    all_positions: bool = False
    standardise: bool = False
    behaviour: bool = True
    batch_size: int = 32
    seed: int = 0
    prompts: str | None = None
    n_perm: int = 20
    behaviour_n: int = 24
    max_new_tokens: int = 16
    control_layer: int | None = None
    measure: str = "decision"   # next-token KL at the patched token (seeds); "last": end of prompt


def check_layers(opts: RQ1Options, n_layers: int) -> None:
    """--layers and --control-layer must index existing layers (ConfigError naming the range)."""
    for what, ls in (("--layers", opts.layers or []), ("--control-layer",
                                                       [] if opts.control_layer is None else [opts.control_layer])):
        for l in ls:
            if not 0 <= l < n_layers:
                raise ConfigError(f"{what}: layer {l} is out of range 0..{n_layers - 1} for these models")


def cka_layers(n_layers: int, stride: int) -> list[int]:
    """Every ``stride``-th layer counted 1-based (2, 4, 6, ... as in the seeds) plus the last, 0-based."""
    layers = list(range(stride - 1, n_layers, stride))
    return layers if layers and layers[-1] == n_layers - 1 else layers + [n_layers - 1]


def fair_prompts(pair: Pair, base: LoadedModel, tuned: LoadedModel, opts: RQ1Options,
                 run: RunDir) -> tuple[SharedVocab, list[dict]]:
    """Shared vocabulary + the prompts that pass the filter (first ``n_prompts``); fairness.json."""
    sv = shared_vocab(base.tokenizer, tuned.tokenizer)
    prompts = target_prompts(pair, opts.prompts)
    kept, report = filter_prompts(prompts, base.tokenizer, tuned.tokenizer, sv, opts.min_shared_ratio)
    kept = kept[: opts.n_prompts]
    run.write_json("fairness.json", {"vocab": sv.report(), "filter": report,
                                     "min_shared_ratio": opts.min_shared_ratio,
                                     "n_used": len(kept), "prompt_ids": [p["id"] for p in kept]})
    return sv, kept


def _capture_all(side: LoadedModel, prompts, site: str, opts: RQ1Options) -> torch.Tensor:
    """``[L, N, d]`` float32: ``site`` at every layer, last content token."""
    sites = [f"{site}.{l}" for l in range(side.n_layers)]
    cap = capture(side.model, side.tokenizer, prompts, sites, batch_size=opts.batch_size)
    return torch.stack([cap[s] for s in sites])


def _cka_step(run: RunDir, X: torch.Tensor, Y: torch.Tensor, opts: RQ1Options) -> None:
    """Same depth: per-layer CKA with CI and null at the stride's layers; always the full matrix."""
    out: dict = {"site": opts.site, "n": X.shape[1]}
    if torch.cuda.is_available():
        X, Y = X.cuda(), Y.cuda()
    if X.shape[0] == Y.shape[0]:
        rows = []
        for l in cka_layers(X.shape[0], opts.stride):
            r = cka_with_ci(X[l], Y[l], method="jackknife", n_perm=opts.n_perm, seed=opts.seed)
            rows.append({"layer": l, **{k: r[k] for k in ("debiased", "biased", "ci_low", "ci_high", "se",
                                                          "null_mean", "null_sd", "biased_null_mean")},
                         "influential_rows": r.get("influential_rows")})
        out["per_layer"] = rows
    lx, ly = cka_layers(X.shape[0], opts.stride), cka_layers(Y.shape[0], opts.stride)
    out["matrix_layers"] = {"base": lx, "tuned": ly}
    out["matrix_debiased"] = cka_matrix(X[lx], Y[ly], debiased=True).tolist()
    out["matrix_biased"] = cka_matrix(X[lx], Y[ly], debiased=False).tolist()
    run.write_json("cka.json", out)


def _standardiser(src: torch.Tensor, dst: torch.Tensor):
    """Map source states onto the destination's per-dimension mean/std (calibration: all prompts)."""
    ms, ss = src.mean(0), src.std(0).clamp_min(1e-6)
    md, sd = dst.mean(0), dst.std(0)
    return lambda x: (x - ms) / ss * sd + md


def _patch_step(run: RunDir, base: LoadedModel, tuned: LoadedModel, prompts, sv: SharedVocab,
                states: dict[str, torch.Tensor], opts: RQ1Options) -> None:
    """KL(dst clean || dst with src state at layer L) per prompt, both directions, every layer; and
    the clean cross-model KL(base || tuned) over the shared vocabulary in common order."""
    layers = opts.layers or list(range(base.n_layers))
    sides = {"base": (base, sv.a_ids), "tuned": (tuned, sv.b_ids)}
    kl = {d: {"masked": [], "unmasked": []} for d in DIRECTIONS}
    cross = []
    src_values = dict(states)   # per side [L, N, d]; standardised once onto the other side's statistics
    if opts.standardise:
        for direction in DIRECTIONS:
            src, dst = direction.split("->")
            src_values[src] = torch.stack([_standardiser(states[src][l], states[dst][l])(states[src][l])
                                           for l in range(states[src].shape[0])])
    for i in range(0, len(prompts), opts.batch_size):
        chunk = prompts[i:i + opts.batch_size]
        engines = {name: PatchEngine(side.model, encode(side.tokenizer, chunk), measure=opts.measure)
                   for name, (side, _) in sides.items()}
        cross.append(kl_shared(engines["base"].clean_logits, engines["tuned"].clean_logits, sv.a_ids, sv.b_ids))
        for direction in DIRECTIONS:
            src, dst = direction.split("->")
            variants = [Patch(f"{opts.site}.{l}", src_values[src][l, i:i + len(chunk)]) for l in layers]
            k = engines[dst].run(variants, reduce=kl_reducer(engines[dst], sides[dst][1], with_unmasked=True))
            kl[direction]["masked"].append(k[..., 0])
            kl[direction]["unmasked"].append(k[..., 1])
    result: dict = {"site": opts.site, "layers": layers, "measure": opts.measure, "directions": {},
                    "clean_cross_kl_shared": summarise(torch.cat(cross))}
    for direction in DIRECTIONS:
        km, ku = torch.cat(kl[direction]["masked"], 1), torch.cat(kl[direction]["unmasked"], 1)  # [L, N]
        result["directions"][direction] = {
            "masked": [{"layer": l, **summarise(km[j])} for j, l in enumerate(layers)],
            "unmasked": [{"layer": l, **summarise(ku[j])} for j, l in enumerate(layers)],
            "per_prompt_masked": km.tolist()}
    if opts.all_positions:
        result["all_positions"] = _all_positions(base, tuned, prompts, layers, sv, opts)
    run.write_json("patch.json", result)


def _all_positions(base, tuned, prompts, layers, sv, opts) -> dict:
    """Patch every position (needs identical tokenisation on both sides); base->tuned only."""
    from mechdiff.sites.hooks import record
    bb, bt = encode(base.tokenizer, prompts), encode(tuned.tokenizer, prompts)
    if bb.input_ids.shape != bt.input_ids.shape or not torch.equal(bb.input_ids, bt.input_ids):
        raise ConfigError("--all-positions needs both tokenizers to tokenise the prompts identically; "
                          "they do not (extended vocabulary?): patch the decision token only")
    sites = [f"{opts.site}.{l}" for l in layers]
    with torch.no_grad(), record(base.model, sites) as rec:
        base.model(**bb.to(base.device).model_inputs())
    eng = PatchEngine(tuned.model, bt, measure=opts.measure)
    kl = patch_kl(eng, [Patch(s, rec[s]) for s in sites], sv.b_ids, positions="all")
    return {"direction": "base->tuned", "masked": [{"layer": l, **summarise(kl[j])}
                                                   for j, l in enumerate(layers)]}


def _behaviour_step(run: RunDir, base: LoadedModel, tuned: LoadedModel, sv: SharedVocab,
                    prompts, opts: RQ1Options) -> None:
    from mechdiff.analyses.behaviour import behaviour_delta, behaviour_table
    from mechdiff.data.datasets import load_prompt_set
    n = opts.behaviour_n
    sets = {"target": prompts[:n], "refusal_probe": load_prompt_set("refusal_probe")[:n],
            "mc": load_prompt_set("mc")[:n]}
    tables = {name: behaviour_table(side.model, side.tokenizer, sets, allowed_ids=ids,
                                    max_new_tokens=opts.max_new_tokens)
              for name, side, ids in (("base", base, sv.a_ids), ("tuned", tuned, sv.b_ids))}
    run.write_json("behaviour.json", {"base": tables["base"], "tuned": tables["tuned"],
                                      "delta": behaviour_delta(tables["base"], tables["tuned"]),
                                      "n_per_set": {k: len(v) for k, v in sets.items()}})


def run_rq1(pair: Pair, opts: RQ1Options, out=None, device=None, dtype=None,
            models: tuple[LoadedModel, LoadedModel] | None = None) -> RunDir:
    """Run RQ1 end to end (resuming finished steps) and return the run directory."""
    from mechdiff.experiments.rq1_summary import summarise_rq1
    base, tuned = models or open_models(pair, device, dtype)
    check_layers(opts, min(base.n_layers, tuned.n_layers))   # before any expensive work
    run = open_run(out, "rq1", pair, {"base": base, "tuned": tuned}, {"seed": opts.seed}, opts)
    sv, prompts = fair_prompts(pair, base, tuned, opts, run)

    def capture_step():
        run.write_tensors(STATES, {"base": _capture_all(base, prompts, opts.site, opts),
                                   "tuned": _capture_all(tuned, prompts, opts.site, opts)})
    run.cached("rq1.capture", capture_step, [STATES])
    states = run.read_tensors(STATES)
    run.cached("rq1.cka", lambda: _cka_step(run, states["base"], states["tuned"], opts), ["cka.json"],
               depends_on=["rq1.capture"])
    if base.d_model == tuned.d_model and base.n_layers == tuned.n_layers:
        run.cached("rq1.patch", lambda: _patch_step(run, base, tuned, prompts, sv, states, opts),
                   ["patch.json"], depends_on=["rq1.capture"])
    if opts.behaviour:
        run.cached("rq1.behaviour", lambda: _behaviour_step(run, base, tuned, sv, prompts, opts),
                   ["behaviour.json"])
    summarise_rq1(run, pair, base, tuned, opts)
    return run
