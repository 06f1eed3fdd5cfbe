"""The ``tokens`` stage: per-token divergence of the two models over whole texts.

For each prompt of the stage's set, each model's greedy response (``--max-new-tokens``; generated
once and cached in the run) is appended to the prompt as each model's chat template renders it and
both models read the result teacher-forced; neutral texts (the pair's ``neutral`` set, raw) are read
the same way. Per token (per aligned span where the tokenizers differ: :mod:`mechdiff.texts.alignment`)
the KL both ways masked to the shared vocabulary and unmasked, the mass the mask dropped, and the
log-prob and rank of the actual token under each model (:mod:`mechdiff.texts.divergence`).

Steps (resumable): ``tokens.responses`` -> tokens/responses.json; ``tokens.divergence`` ->
tokens/per_token.safetensors + tokens/texts.json. ``summarise``: tokens.json (the format pinned in
:mod:`mechdiff.texts.result`, plus the curve along the response, the top divergent tokens, per-prompt
rows and the divergence by category/language/topic with cluster SEs) and figures/tokens_curve.png.
"""
from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mechdiff.analyses.behaviour.generation import generate
from mechdiff.analyses.diff_lens import diff_lens, lens_handles
from mechdiff.data.datasets import load_prompt_set
from mechdiff.data.prompts import format_prompt
from mechdiff.errors import ConfigError, DataError
from mechdiff.experiments.common import load_dataset_ref
from mechdiff.experiments.results import result_of
from mechdiff.experiments.stage import SIDES, Stage, Study, opt, run_stage
from mechdiff.experiments.steps import check_layers, study_layers
from mechdiff.patching.response import response_patch
from mechdiff.plots.tokens import plot_tokens_curve
from mechdiff.progress import progress
from mechdiff.report.hooks import Figure, ReportHooks
from mechdiff.report.tokens import tokens_section
from mechdiff.texts import summaries as S
from mechdiff.texts.divergence import RowReducer, divergence_rows, pair_text, same_tokenizer
from mechdiff.texts.result import SCHEMA, TOKEN_FIELDS, TextSummary, load_texts

RESPONSES, PER_TOKEN, TEXTS = "tokens/responses.json", "tokens/per_token.safetensors", "tokens/texts.json"
LENS, LENS_JSON = "tensors/diff_lens.safetensors", "diff_lens.json"
PATCH_JSON = "response_patch.json"
INT_FIELDS = ("start", "end", "rank_in_base", "rank_in_tuned")


@dataclass
class TokensOptions:
    n_prompts: int = opt(24, "prompts whose responses are read (seeded sample of the stage's set)")
    max_new_tokens: int = opt(32, "greedy response length per model")
    n_neutral: int = opt(16, "neutral texts read as they are (0: none)")
    top_n: int = opt(20, "most divergent tokens listed with their context")
    curve_len: int = opt(64, "response positions shown in the divergence curve")
    response_k: int = opt(8, "response readout of layer patching: mean KL over the first K response tokens, "
                             "patched at every position of prompt + response (0: off; needs one set of ids: one "
                             "tokenizer, or a tuned tokenizer extending the base's)")
    patch_layers: list[int] | None = opt(None, "layers patched for the response readout (default: RQ1's choice "
                                               "in this run directory and its control)")
    lens_tokens: int = opt(5, "activation-difference lens: first content tokens of each neutral text averaged "
                              "(0: off; models of one shape only)")


def check(opts: TokensOptions, n_layers: int) -> None:
    """Counts before any model work."""
    for name in ("n_prompts", "max_new_tokens", "top_n", "curve_len"):
        if getattr(opts, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(opts, name)}")
    check_layers(n_layers, layers=opts.patch_layers)
    for name in ("n_neutral", "lens_tokens", "response_k"):
        if getattr(opts, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(opts, name)}")


def _prompts(study: Study, n: int) -> list[dict]:
    rows = list(study.target_prompts)
    random.Random(study.seed).shuffle(rows)
    return rows[:n]


def _neutral(study: Study, n: int) -> list[dict]:
    if n == 0:
        return []
    ref = (study.pair.datasets or {}).get("neutral")
    rows = load_dataset_ref(ref) if ref is not None else load_prompt_set("neutral")
    return rows[:n]


def _responses(study: Study, opts: TokensOptions) -> None:
    prompts = _prompts(study, opts.n_prompts)
    out = {"ids": [p["id"] for p in prompts]}
    for side in SIDES:
        m = study.side(side)
        texts = generate(m.model, m.tokenizer, prompts, max_new_tokens=opts.max_new_tokens,
                         batch_size=study.batch_size)
        out[side] = dict(zip(out["ids"], texts))
    study.run.write_json(RESPONSES, out)


def _templated(tok) -> bool:
    return bool(getattr(tok, "chat_template", None))


def _texts(study: Study, opts: TokensOptions) -> list[tuple[dict, object]]:
    """(summary fields, PairText) for every text the stage reads."""
    out = _prompt_texts(study)
    same = same_tokenizer(study.base.tokenizer, study.tuned.tokenizer)
    for p in _neutral(study, opts.n_neutral):
        unit = "token" if same else "span"
        out.append((_meta(p, "neutral", None, p["text"], 0, unit),
                    pair_text(study.base.tokenizer, study.tuned.tokenizer, p["text"], unit=unit)))
    return out


def _prompt_texts(study: Study) -> list[tuple[dict, object]]:
    """(summary fields, PairText) of every prompt + cached response (each responder in turn)."""
    ta, tb = study.base.tokenizer, study.tuned.tokenizer
    same = same_tokenizer(ta, tb)
    resp = study.run.read_json(RESPONSES)
    by_id = {p["id"]: p for p in study.target_prompts}
    out = []
    for pid in resp["ids"]:
        p = by_id.get(pid)
        if p is None:
            raise DataError(f"{RESPONSES} names prompt {pid!r}, which the prompt set no longer holds; "
                            "rerun into a new --out")
        (ra, (ca0, ca1)), (rb, (cb0, cb1)) = format_prompt(ta, p), format_prompt(tb, p)
        for who in SIDES:
            r = resp[who][pid]
            xa, xb = ra + r, rb + r
            unit = "token" if same and xa == xb else "span"
            pt = pair_text(ta, tb, xa, xb, [(ca0, ca1), (len(ra), len(xa))], [(cb0, cb1), (len(rb), len(xb))],
                           unit=unit, add_special_tokens=(not _templated(ta), not _templated(tb)))
            out.append((_meta(p, "prompts", who, xa, len(ra), unit), pt))
    return out


def response_inputs(study: Study, who: str) -> tuple[list[list[int]], list[int], list[dict]]:
    """What a response readout reads for responder ``who`` (the base's tokenization, which both models
    read: :attr:`Study.id_space`): each prompt + ``who``'s
    cached greedy response as token ids, the index of its first response token, and the text's
    fields (``id``, ``topic`` ...); texts with an empty response are left out."""
    sel = [(m, pt) for m, pt in _prompt_texts(study) if m["responder"] == who]
    ids = [pt.a.ids for _, pt in sel]
    starts = [next((i for i, (s, _) in enumerate(pt.a.offsets) if s >= m["response_start"] and not pt.a.special[i]),
                   len(pt.a.ids)) for m, pt in sel]
    keep = [i for i, (st, x) in enumerate(zip(starts, ids)) if 0 < st < len(x)]
    return [ids[i] for i in keep], [starts[i] for i in keep], [sel[i][0] for i in keep]


def _meta(p: dict, set_: str, who, text: str, response_start: int, unit: str) -> dict:
    return {"id": str(p["id"]), "set": set_, "responder": who, "category": str(p.get("category", "all")),
            "lang": str(p.get("lang", "")), "topic": str(p.get("topic", "")), "text": text,
            "response_start": response_start, "unit": unit}


def _divergence(study: Study, opts: TokensOptions) -> None:
    ta, tb = study.base.tokenizer, study.tuned.tokenizer
    texts = _texts(study, opts)
    red = RowReducer(study.base.model, study.tuned.model, study.allowed_ids("base"), study.allowed_ids("tuned"),
                     full=same_tokenizer(ta, tb))
    rows: list[dict] = []
    bs = study.batch_size
    for i in progress(range(0, len(texts), bs), f"tokens ({len(texts)} texts)", total=-(-len(texts) // bs)):
        rows += divergence_rows(red, ta, tb, [pt for _, pt in texts[i:i + bs]])
    summaries = []
    for idx, ((meta, pt), r) in enumerate(zip(texts, rows)):
        resp = r["start"] >= meta["response_start"] if meta["responder"] else torch.ones_like(r["start"], dtype=torch.bool)
        summaries.append(dataclasses.asdict(TextSummary(
            idx=idx, n_rows=int(r["start"].numel()), mean_kl_bt=_nanmean(r["kl_bt"][resp]),
            mean_kl_tb=_nanmean(r["kl_tb"][resp]),
            coverage=pt.alignment.coverage if pt.alignment is not None else 1.0, **meta)))
    offsets = torch.tensor([0] + [int(r["start"].numel()) for r in rows]).cumsum(0)
    tensors = {k: torch.cat([r[k] for r in rows]).to(torch.int64 if k in INT_FIELDS else torch.float32)
               for k in TOKEN_FIELDS}
    tensors["row_offsets"] = offsets.to(torch.int64)
    study.run.write_tensors(PER_TOKEN, tensors, allow_nonfinite=True)
    study.run.write_json(TEXTS, {"texts": summaries})


def _nanmean(x: torch.Tensor) -> float:
    x = x[torch.isfinite(x)]
    return float(x.double().mean()) if x.numel() else float("nan")


def run(study: Study, opts: TokensOptions) -> None:
    info = {"n_prompts": opts.n_prompts, "max_new_tokens": opts.max_new_tokens, "seed": study.seed,
            "prompts": study.prompts_path}
    study.run.cached("tokens.responses", lambda: _responses(study, opts), outputs=[RESPONSES], info=info)
    study.run.cached("tokens.divergence", lambda: _divergence(study, opts), outputs=[PER_TOKEN, TEXTS],
                     depends_on=["tokens.responses"], info={**info, "n_neutral": opts.n_neutral})
    if opts.response_k and study.same_shape and study.id_space:
        layers = _patch_layers(study, opts)
        study.run.cached("tokens.response_patch", lambda: _response_patch(study, opts, layers),
                         outputs=[PATCH_JSON], depends_on=["tokens.responses"],
                         info={**info, "response_k": opts.response_k, "layers": layers, "ids": study.id_space})
    if opts.lens_tokens and study.same_shape and opts.n_neutral:
        study.run.cached("tokens.diff_lens", lambda: _diff_lens(study, opts), outputs=[LENS, LENS_JSON],
                         info={"lens_tokens": opts.lens_tokens, "n_neutral": opts.n_neutral})


def _patch_layers(study: Study, opts: TokensOptions) -> list[int]:
    layers, control = study_layers(study, opts.patch_layers)
    return sorted(set(layers) | ({control} if not opts.patch_layers else set()))


def _response_patch(study: Study, opts: TokensOptions, layers: list[int]) -> None:
    """RQ1's layer patching read over the response: patched at every position of prompt + response
    (teacher-forced on each model's response in turn), the mean KL over the first K response tokens."""
    tok = study.base.tokenizer
    rows = []
    for who in SIDES:
        ids, starts, metas = response_inputs(study, who)
        topics = [m["topic"] or m["id"] for m in metas]
        for src, dst in (("base", "tuned"), ("tuned", "base")):
            out = response_patch(study.side(src).model, study.side(dst).model, tok, ids, starts, layers,
                                 opts.response_k, study.allowed_ids(src), study.allowed_ids(dst), study.batch_size)
            gap = S.cluster_mean(out["gap"].tolist(), topics)
            for l in layers:
                kl = S.cluster_mean(out["patch_kl"][l].tolist(), topics)
                rows.append({"readout": f"response (first {opts.response_k} tokens)", "responder": who,
                             "direction": f"{src}->{dst}", "layer": l, "patch_kl": kl["mean"], "patch_kl_se": kl["se"],
                             "gap": gap["mean"], "gap_se": gap["se"], "share_closed": out["share_closed"][l],
                             "n_texts": kl["n"]})
    study.run.write_json(PATCH_JSON, {
        "title": "Layer patching read over the response (tokens stage)",
        "summary": (f"resid_post of one model written into the other at every position of prompt + response, "
                    f"teacher-forced on each model's greedy response; patch KL = KL(destination clean || patched), "
                    f"gap = KL(source clean || destination clean), share closed = 1 - KL(source || patched) / gap, "
                    f"each the mean over the first {opts.response_k} response tokens (shared vocabulary), "
                    "SEs over topic clusters. RQ1's own patch.json reads the decision/last token instead."
                    + (" The tuned tokenizer extends the base's: both models read the base's tokenization of "
                       "each text." if study.id_space == "base ids" else "")),
        "table": rows, "layers": layers, "ids": study.id_space})


def _diff_lens(study: Study, opts: TokensOptions) -> None:
    """The activation-difference lens on the neutral texts; its per-layer directions as add handles
    under handles/ (``Handle.load(run / "handles/diff_lens_L{l}_resid_post_add")``)."""
    out = diff_lens(study.base, study.tuned, _neutral(study, opts.n_neutral), opts.lens_tokens,
                    study.batch_size)
    study.run.write_tensors(LENS, {"delta": out["delta"]})
    handles = []
    for h in lens_handles(out["delta"], {"n_positions": out["n"], "n_tokens": opts.lens_tokens}):
        prefix = f"handles/diff_lens_L{h.layer}_resid_post_add"
        h.save(study.run.file(prefix))
        handles.append(prefix)
    rows = [{"layer": r["layer"], "norm": r["norm"],
             "tuned_lens_promoted": " ".join(r["tuned"]["promoted"][:8]),
             "tuned_lens_suppressed": " ".join(r["tuned"]["suppressed"][:8]),
             "base_lens_promoted": " ".join(r["base"]["promoted"][:8])} for r in out["lens"]]
    study.run.write_json(LENS_JSON, {
        "title": "Activation-difference lens (tuned - base on neutral text)",
        "summary": (f"Mean tuned-minus-base resid_post over the first {opts.lens_tokens} content tokens of the "
                    f"neutral texts ({out['n']} positions), read through each model's final norm and unembedding. "
                    "Each layer's direction is saved as a rank-1 add handle (alpha 1 adds the mean difference)."),
        "table": rows, "lens": out["lens"], "handles": handles, "n_positions": out["n"]})


@result_of("tokens")
@dataclass
class TokensResult:
    """What later stages and the report read of the ``tokens`` stage (the full numbers: tokens.json)."""

    unit: str | None = None
    n_texts: int = 0
    kl_bt_base_response: float | None = None
    kl_bt_base_response_se: float | None = None
    kl_bt_tuned_response: float | None = None
    kl_bt_tuned_response_se: float | None = None
    coverage_mean: float | None = None
    response_patch_layers: list[int] = field(default_factory=list)


def summarise(study: Study, opts: TokensOptions) -> TokensResult:
    out = summarise_run(study.run, opts)
    h = out["headline"]
    rp = study.run.read_json(PATCH_JSON) if study.run.exists(PATCH_JSON) else {}
    return TokensResult(unit=h.get("unit"), n_texts=int(h.get("n_texts") or 0),
                        kl_bt_base_response=h.get("kl_bt_base_response"),
                        kl_bt_base_response_se=h.get("kl_bt_base_response_se"),
                        kl_bt_tuned_response=h.get("kl_bt_tuned_response"),
                        kl_bt_tuned_response_se=h.get("kl_bt_tuned_response_se"),
                        coverage_mean=h.get("coverage_mean"), response_patch_layers=list(rp.get("layers") or []))


def summarise_run(run, opts: TokensOptions) -> dict:
    """tokens.json and the curve figure from the step outputs alone."""
    texts_meta = run.read_json(TEXTS)["texts"]
    run.write_json("tokens.json", {"schema": SCHEMA, "texts": texts_meta, "headline": {}})
    texts = load_texts(run.path)
    prompts = [t for t in texts if t.summary.set == "prompts"]
    neutral = [t for t in texts if t.summary.set == "neutral"]
    curve = S.curve(prompts, "kl_bt", opts.curve_len)
    headline: dict = {"unit": texts[0].summary.unit if texts else None, "n_texts": len(texts)}
    for who in SIDES:
        ts = [t for t in prompts if t.summary.responder == who]
        s = S.cluster_mean([S.text_mean(t) for t in ts], [t.summary.topic or t.summary.id for t in ts])
        headline[f"kl_bt_{who}_response"], headline[f"kl_bt_{who}_response_se"] = s["mean"], s["se"]
        c = curve.get(who) or {}
        if c.get("pos") and c["pos"][0] == 0:
            headline[f"kl_bt_{who}_response_first_token"] = c["mean"][0]
    if neutral:
        s = S.cluster_mean([S.text_mean(t) for t in neutral], [t.summary.topic or t.summary.id for t in neutral])
        headline["kl_bt_neutral"], headline["kl_bt_neutral_se"] = s["mean"], s["se"]
    for key in ("dropped_base", "dropped_tuned"):
        vals = [S.text_mean(t, key) for t in texts]
        s = S.cluster_mean(vals, [t.summary.topic or t.summary.id for t in texts])
        headline[f"{key}_mean"], headline[f"{key}_se"] = s["mean"], s["se"]
    headline["coverage_mean"] = sum(t.summary.coverage for t in texts) / len(texts) if texts else None
    figures = {}
    if any(c["pos"] for c in curve.values()):
        plot_tokens_curve([{"label": run.path.name, "curves": curve}], run.figure("tokens_curve.png"))
        figures["tokens_curve.png"] = ("Per-token KL(base || tuned) over the shared vocabulary along each model's "
                                       "own greedy response: mean over prompts, 95% band from the topic-cluster SE")
    out = {
        "schema": SCHEMA, "title": "Per-token divergence over whole texts (tokens)",
        "summary": ("KL between the two models' next-token distributions at every response token "
                    f"({'aligned spans across tokenizers' if headline['unit'] == 'span' else 'shared tokenizer'}); "
                    "means over texts with topic-cluster SEs."),
        "headline": headline, "texts": texts_meta, "curve": curve, "figures": figures,
        "tables": {"top_tokens": S.top_tokens(texts, opts.top_n), "per_prompt": S.per_prompt(texts),
                   "by_category": S.by_group(texts, "category"), "by_lang": S.by_group(texts, "lang"),
                   "by_topic": S.by_group(texts, "topic")},
    }
    run.write_json("tokens.json", out)
    return out


def run_tokens(pair, opts: TokensOptions | None = None, **kw):
    """``run_stage("tokens", pair, opts, **kw)``."""
    return run_stage("tokens", pair, opts or TokensOptions(), **kw)


def _headline(run_dir: Path) -> dict:
    f = Path(run_dir) / "tokens.json"
    return (json.loads(f.read_text(encoding="utf-8")).get("headline") or {}) if f.is_file() else {}


def tokens_sentences(run_dir: Path) -> list[str]:
    """One executive-summary sentence: the per-token KL along each model's response, with its SE."""
    h = _headline(run_dir)
    if not h:
        return []
    parts = []
    for who in SIDES:
        m, se = h.get(f"kl_bt_{who}_response"), h.get(f"kl_bt_{who}_response_se")
        if m is not None:
            parts.append(f"{m:.3g}" + (f" ± {se:.2g}" if se is not None else " (no SE: one topic)") +
                         f" nats along the {who} model's responses")
    if not parts:
        return []
    return [f"Per token, KL(base ‖ tuned) over the shared vocabulary is {' and '.join(parts)} "
            f"(± topic-cluster SE; unit: {h.get('unit')}, coverage {h.get('coverage_mean') or 0:.3g})."]


def tokens_numbers(run_dir: Path) -> dict:
    h = _headline(run_dir)
    return {"per-token KL, tuned responses": h.get("kl_bt_tuned_response"),
            "per-token KL, base responses": h.get("kl_bt_base_response")} if h else {}


def curve_data(run_dir: Path) -> dict | None:
    """Figure E's data: the curve along the response (None: the stage has not run there)."""
    f = Path(run_dir) / "tokens.json"
    curves = json.loads(f.read_text(encoding="utf-8")).get("curve") if f.is_file() else None
    if not isinstance(curves, dict) or not any(isinstance(c, dict) and c.get("pos") for c in curves.values()):
        return None
    return {"curves": curves}


FIG_E = Figure("E", "Figure E — per-token KL(base ‖ tuned) over the shared vocabulary along each model's own greedy "
                    "response, teacher-forced in both (mean over prompts, 95% band from the topic-cluster SE).",
               curve_data, lambda runs, path: plot_tokens_curve(runs, path), "per-token divergence along the response")
REPORT = ReportHooks(topic="Per-token divergence", sentences=tokens_sentences, figures=(FIG_E,), section=tokens_section,
                     numbers=tokens_numbers, metrics=("tokens.json", PATCH_JSON, LENS_JSON))
STAGE = Stage(
    name="tokens", help="per-token divergence over whole texts (responses and neutral text), across tokenizers",
    options=TokensOptions, run=run, summarise=summarise, check=check, result=TokensResult, report=REPORT,
    done_message="per-token divergence written to tokens.json and tokens/per_token.safetensors")
STAGES = (STAGE,)
