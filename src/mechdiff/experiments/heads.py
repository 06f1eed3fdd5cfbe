"""RQ4 — structure change: which attention heads matter in each model, and which heads changed.

Did fine-tuning rewire circuits (many heads change) or turn a knob (few)? Per head of the analysed
layers, in both models, on the target readout at the decision token (``analyses.attribution.Target``):

- ablation: the head's ``head_z`` slice zeroed (``zero``) or set to its mean over prompts (``mean``);
  effect = readout(clean) - readout(ablated);
- cross-model head patching (same shapes only), effect = readout(patched) - readout(clean):
  ``swap`` puts in the other model's head output (from its own forward pass); ``own`` puts in the
  other model's head applied to *this* model's residual stream (needs identical tokenisation), so
  it isolates the head's own change from changes upstream of it. Where the attention output is
  the sum of the heads' contributions (checked on the recorded states) the contribution is swapped
  (``attn_out += out_src[h] - out_dst[h]``, so output-projection changes count), else the slice of
  ``head_z``;
- attribution: grad x act (or integrated gradients) of the readout on each head's ``head_z``.

All heads (and layers) of a model run as batched variants of the one patching engine. Summary
(:mod:`mechdiff.analyses.heads`): **changed heads** = share of heads whose own change (``own``,
else ``swap``) moves the readout past the importance rule (z >= 2 within the layer or |effect| >=
0.5 nat / 5 points, above the noise floor); **importance churn** per measurement = share of heads
whose important label flips between the models; top-k Jaccard; Spearman over all heads.

Steps (resumable; ``info`` records the options each one depends on):

1. ``rq4.targets``     readout token ids per prompt and side   -> tensors/rq4_targets.safetensors
2. ``rq4.states``      head_z / head_out (+ "own" heads)        -> tensors/rq4_states.safetensors
3. ``rq4.ablate``      zero / mean / swap / own, every head     -> tensors/rq4_ablation.safetensors
4. ``rq4.attribution`` grad x act or IG, every head             -> tensors/rq4_attribution.safetensors
5. ``rq4.cumulative``  top-k heads ablated / swapped together   -> tensors/rq4_cumulative.safetensors
6. ``rq4.path``        path patching of the ``--path`` heads     -> rq4_path.json
then ``rq4.json``, ``rq4_summary.txt`` and figures (:func:`summarise`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from mechdiff.analyses.heads import cumulative_curves, summarise_heads
from mechdiff.errors import ConfigError, DataError
from mechdiff.experiments.figure_data import FIG_D
from mechdiff.experiments.results import HeadsResult
from mechdiff.experiments.stage import SIDES, Stage, Study, opt
from mechdiff.experiments.summaries import rq4_numbers, rq4_sentences
from mechdiff.report.hooks import ReportHooks
from mechdiff.experiments.steps import (check_layers, group_ids, prompt_digest,
                                        select_prompts)
from mechdiff.analyses.path_patching import parse_receiver, path_patch
from mechdiff.atomic import atomic_write_text
from mechdiff.experiments.heads_summary import default_layers, headline_of, known_heads, noise_floor, write_figures
from mechdiff.experiments.heads_steps import (ABLATION, ABLATIONS, ATTRIB, ATTRIBUTIONS, CUMUL, STATES, SWAPS,  # noqa: F401
                                            TARGETS, TARGETS_T, _ablate_step, _attribution_step, _cumulative_step,
                                            _states_step, _targets_step, measured_kinds, scores, targets)


@dataclass
class RQ4Options:
    layers: list[int] | None = opt(None, "layers whose heads are analysed (default: every layer on a GPU; on "
                                         "the CPU RQ1's chosen layers in this run directory, else the pair's, "
                                         "else ~3/4 depth)")
    n_prompts: int = opt(48, "prompts used (after the fairness filter)")
    min_shared_ratio: float = opt(1.0, "keep prompts with at least this fraction of tokens in the shared "
                                       "vocabulary (1.0 strict)")
    target: str = opt("top", "readout: top (log-prob of the base model's clean top token, in both models) | "
                             "answer (first token of each prompt's final_answer/answer) | continuation "
                             "(first token of each prompt's 'target') | refusal (soft refusal of the first "
                             "tokens of a refusal vs a neutral reply, points)")
    measure: str = opt("decision", "where the readout is read: decision (the patched token) | last")
    ablations: list[str] | None = opt(help="head ablations: zero, mean", factory=lambda: ["zero", "mean"])
    swaps: list[str] | None = opt(help="cross-model head patching: swap (the other model's head output), own (the "
                                "other model's head on this model's input)", factory=lambda: ["swap", "own"])
    attribution: str = opt("grad_x_act", "grad_x_act | ig (integrated gradients, zero baseline) | none")
    ig_steps: int = opt(16, "integrated-gradients steps (midpoint rule)")
    importance: str = opt("attribution", "score that ranks heads (top-k, cumulative curve, importance "
                                         "churn): attribution | zero | mean")
    z_threshold: float = opt(2.0, "important head: z-score of |score| within its layer >= this, or ...")
    abs_threshold: float | None = opt(None, "... |score| >= this (default 0.5 nats; 5 points for refusal)")
    top_k: int = opt(10, "K: top-k overlap and the cumulative top-k curve (k = 1..K)")
    fdr: float = opt(0.05, "false-discovery rate of the changed-head count (Benjamini-Hochberg over every head)")
    path: list[str] | None = opt(None, "path patching, LAYER.HEAD:RECEIVER (receiver: logits, attn_out.L, "
                                       "mlp_out.L, head.L.H), e.g. 22.3:logits,22.3:mlp_out.24")


def check(opts: RQ4Options, n_layers: int | None) -> None:
    """Options checked before any model work (``n_layers=None``: everything but the layer ranges)."""
    if n_layers is not None:
        check_layers(n_layers, layers=opts.layers)
    for name, val, allowed in (("target", opts.target, TARGETS), ("attribution", opts.attribution, ATTRIBUTIONS),
                               ("measure", opts.measure, ("decision", "last")),
                               ("importance", opts.importance, ("attribution",) + ABLATIONS)):
        if val not in allowed:
            raise ConfigError(f"--{name} must be one of {', '.join(allowed)}, got {val!r}")
    for name, vals, allowed in (("ablations", opts.ablations or [], ABLATIONS), ("swaps", opts.swaps or [], SWAPS)):
        if any(v not in allowed for v in vals) or len(set(vals)) != len(vals):
            raise ConfigError(f"--{name} takes distinct names among {', '.join(allowed)}, got {vals}")
    if not opts.ablations and not opts.swaps:
        raise ConfigError("give at least one of --ablations, --swaps")
    if opts.importance == "attribution" and opts.attribution == "none":
        raise ConfigError("--importance attribution needs --attribution grad_x_act or ig")
    if opts.importance in ABLATIONS and opts.importance not in (opts.ablations or []):
        raise ConfigError(f"--importance {opts.importance} needs {opts.importance} in --ablations")
    for name, v, lo in (("n-prompts", opts.n_prompts, 2), ("ig-steps", opts.ig_steps, 1), ("top-k", opts.top_k, 1)):
        if v < lo:
            raise ConfigError(f"--{name} must be >= {lo}, got {v}")
    if not 0 < opts.fdr < 1:
        raise ConfigError(f"--fdr must be in (0, 1), got {opts.fdr}")
    if opts.z_threshold <= 0 or (opts.abs_threshold is not None and opts.abs_threshold <= 0):
        raise ConfigError("--z-threshold and --abs-threshold must be > 0")
    for spec in opts.path or []:
        parse_path(spec, n_layers)


def parse_path(spec: str, n_layers: int | None) -> tuple[int, int, str]:
    """``"22.3:logits"`` -> ``(22, 3, "logits")`` (receiver checked against the sender)."""
    try:
        sender, receiver = spec.split(":")
        layer, head = (int(x) for x in sender.split("."))
    except ValueError:
        raise ConfigError(f"--path {spec!r}: use LAYER.HEAD:RECEIVER, e.g. 22.3:logits") from None
    if head < 0:
        raise ConfigError(f"--path {spec!r}: head {head} is negative; heads are 0-based")
    try:
        if n_layers is not None:
            check_layers(n_layers, path=[layer])
        parse_receiver(receiver, layer, n_layers if n_layers is not None else 10**6)
    except ConfigError as e:
        raise ConfigError(f"--path {spec!r}: {e}") from None
    return layer, head, receiver


def _path_step(study: Study, prompts, opts: RQ4Options) -> None:
    tg, rows = targets(study, opts), []
    for spec in opts.path:
        layer, head, receiver = parse_path(spec, study.n_layers)
        for side in SIDES:
            m = study.side(side)
            r = path_patch(m.model, m.tokenizer, prompts, tg[side], layer, head, receiver,
                           measure=opts.measure, batch_size=study.batch_size)
            rows.append({"path": spec, "side": side, "path_effect": float(r["path"].mean()),
                         "total_effect": float(r["total"].mean()), "per_prompt": r["path"].tolist()})
    study.run.write_json("rq4_path.json", {"title": "RQ4 path patching", "unit": tg["base"].unit,
                                           "table": [{k: v for k, v in r.items() if k != "per_prompt"} for r in rows],
                                           "rows": rows})


def run(study: Study, opts: RQ4Options) -> None:
    """The RQ4 steps (finished ones are skipped on resume)."""
    layers = default_layers(study, opts)
    own = "own" in (opts.swaps or []) and study.same_shape
    prompts = select_prompts(study, opts.n_prompts, opts.min_shared_ratio, seed=study.seed, alike=own)
    study.run.write_json("rq4_prompts.json", {"ids": [p["id"] for p in prompts], "groups": group_ids(prompts).tolist()})
    if len(prompts) < 2:
        raise DataError(f"only {len(prompts)} prompt(s) pass the shared-vocabulary filter at "
                        f"--min-shared-ratio {opts.min_shared_ratio}; lower it or give more prompts")
    r = study.run
    base = {"prompts": prompt_digest(prompts), "target": opts.target, "measure": opts.measure}
    same = study.same_shape and all(study.base.info.get(k) == study.tuned.info.get(k) for k in ("n_heads", "head_dim"))
    swaps = list(opts.swaps or []) if same else []
    r.cached("rq4.targets", lambda: _targets_step(study, prompts, opts), [TARGETS_T], info=base)
    r.cached("rq4.states", lambda: _states_step(study, prompts, layers, swaps), [STATES],
             info={"prompts": base["prompts"], "layers": layers, "swaps": swaps})
    r.cached("rq4.ablate", lambda: _ablate_step(study, prompts, layers, opts), [ABLATION],
             depends_on=["rq4.targets", "rq4.states"], info={**base, "ablations": opts.ablations or [], "swaps": swaps})
    deps = ["rq4.states", "rq4.ablate"]
    if opts.attribution != "none":
        r.cached("rq4.attribution", lambda: _attribution_step(study, prompts, layers, opts), [ATTRIB],
                 depends_on=["rq4.targets"], info={**base, "layers": layers, "attribution": opts.attribution,
                                                   "ig_steps": opts.ig_steps if opts.attribution == "ig" else None})
        deps.append("rq4.attribution")
    r.cached("rq4.cumulative", lambda: _cumulative_step(study, prompts, layers, opts), [CUMUL],
             depends_on=deps, info={"importance": opts.importance, "top_k": opts.top_k})
    if opts.path:
        r.cached("rq4.path", lambda: _path_step(study, prompts, opts), ["rq4_path.json"],
                 depends_on=["rq4.targets"], info={**base, "path": opts.path})


def summarise(study: Study, opts: RQ4Options) -> HeadsResult:
    """rq4.json (every head's scores in both models, churn, overlap, cumulative curves, planted-head
    recovery for planted pairs), rq4_summary.txt and the figures, from the step outputs."""
    run = study.run
    layers, unit = default_layers(study, opts), targets(study, opts)["base"].unit
    thr = opts.abs_threshold if opts.abs_threshold is not None else (5.0 if unit == "points" else 0.5)
    abl = run.read_tensors(ABLATION)
    floor, p0 = noise_floor(abl)
    per = {k: scores(study, k) for k in measured_kinds(study, opts)}
    if opts.attribution != "none":
        per["attribution"] = scores(study, "attribution")
    truth = known_heads(study)
    groups = run.read_json("rq4_prompts.json")["groups"] if run.exists("rq4_prompts.json") else None
    s = summarise_heads(per, layers, z_threshold=opts.z_threshold, abs_threshold=thr, k=opts.top_k, planted=truth,
                        floors={m: 0.0 if m == "attribution" else floor for m in per}, groups=groups, q=opts.fdr, p0=p0)
    curves = cumulative_curves(run.read_tensors(CUMUL), json.loads(run.read_tensor_metadata(CUMUL)["orders"]))
    imp, churn = opts.importance, s["churn"]
    structural = next((m for m in ("own", "swap") if m in churn), None)
    headline = headline_of(s, layers, int(abl["base.clean"].shape[0]), f"{opts.target} ({unit}, {opts.measure} token)",
                           floor, imp, structural)
    c = churn.get(imp) or {}
    figures = write_figures(run, per, layers, churn, curves, imp, unit)
    out = {"title": "RQ4 — structure change (attention heads)", "headline": headline,
           "layers": layers, "unit": unit, "thresholds": {"z": opts.z_threshold, "abs": thr, "floor": floor},
           **s, "cumulative": curves, "figures": figures}
    run.write_json("rq4.json", out)
    lines = [f"RQ4 structure change: {study.pair.name}"] + [f"  {k}: {v}" for k, v in headline.items()]
    lines += [f"  cumulative {k}: " + " ".join(f"{x:.3g}" for x in v["mean"]) for k, v in curves.items()]
    atomic_write_text(run.file("rq4_summary.txt"), "\n".join(lines) + "\n")
    ch = churn.get(structural) or {}
    iv = ch.get("share_interval")
    return HeadsResult(layers=list(layers), unit=unit, noise_floor=floor, structural=structural,
                       changed_share=ch.get("share"), importance=imp, importance_churn=c.get("churn"),
                       topk_jaccard=c.get("topk_jaccard"), changed_ci=[iv["ci_low"], iv["ci_high"]] if iv else None,
                       changed_share_storey=ch.get("share_storey"))


STAGE = Stage(
    name="heads", options=RQ4Options, run=run, summarise=summarise, check=check, requires=("rq1",),
    result=HeadsResult, report=ReportHooks(topic="RQ4", sentences=rq4_sentences, figures=(FIG_D,),
                                           numbers=rq4_numbers),
    help="RQ4: per-head ablation, cross-model head patching and attribution in both models; churn, "
         "top-k overlap, cumulative top-k effect.",
    done_message="RQ4 done: {path}  (rq4.json, rq4_summary.txt, figures/)")
STAGES = (STAGE,)
