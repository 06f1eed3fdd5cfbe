"""The ``response`` stage: RQ2's mapped patch and RQ3's handles read over the response (issue 23).

RQ2 and RQ3 read the next-token distribution at the decision token (the end of the user turn). A
fine-tune can barely differ there and differ a lot in its reply, so this stage reads the same edits
over the first ``K`` tokens of each model's greedy response (cached by the ``tokens`` stage),
teacher-forced, each edit applied at every position of prompt + response
(:func:`mechdiff.patching.response.response_readout`, the loop RQ1's response readout uses too):

- **RQ2**: the winner of ``mapped-patch`` (its solver, layer, site and dev-chosen alpha) base -> tuned,
  ``mu + alpha (M(x_base) - mu)`` with ``M`` its saved map and ``mu`` the tuned train mean, beside the
  raw patch at the same site (the base's states): the KL of each to the tuned model's own output,
  the share of the response gap (KL(base || tuned)) each closes, and the drop
  ``100 (1 - KL_mapped / KL_raw)``;
- **RQ3**: every saved handle (``handles/`` of ``steer``: mode, layer, k and the alpha RQ3 chose on
  dev): steer / add / map in the base towards the tuned model, ablate in the tuned model towards the
  base (its reference: the base's states at every position); the share of the gap closed.

For each responder (the tuned model's response and, separately, the base's). Shares and drops carry
cluster-bootstrap intervals over topic groups (:mod:`mechdiff.analyses.intervals`). Texts whose prompt
the map or handle was fitted on, or its winner / k / alpha chosen on (dev), are left out of its
numbers (all are used, and the row says "in-sample", where fewer than two would remain).

``requires = ("tokens", "mapped-patch", "steer")``. The tokens stage is needed (its cached responses
are what is read): without them the stage stops with a DataError naming the command. A part whose
stage has not run in this directory (or found no winner / saved no handle) is skipped, with the
reason in response.json and the report. Both models read one set of ids: those of their one
tokenizer, or, where the tuned tokenizer extends the base's (new tokens appended, e.g. planted-cultural),
the base's tokenization (the tuned model then reads text as the base tokenizer splits it; the report
says so); pairs whose tokenizers differ otherwise are recorded as not measured.

``readout = "response"`` makes these numbers the study's headlines for RQ2's drop and RQ3's handle
shares in ``mechdiff compare`` and the verdict (each row says which readout it uses); the default,
``decision``, keeps RQ2's and RQ3's own decision-token numbers there.

Steps (resumable): ``response.readout`` -> tensors/response_readout.safetensors (per text: gap,
patch KL, KL to the reference) + response/readout.json. ``summarise``: response.json.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mechdiff.analyses import maps as M
from mechdiff.analyses import steering as S
from mechdiff.errors import ConfigError, DataError
from mechdiff.experiments.maps import STATES as RQ2_STATES
from mechdiff.experiments.response_summary import (JSON, ResponseHandle, ResponseMapped, response_numbers,
                                                   response_section, response_sentences, summarise_run)
from mechdiff.experiments.results import MappedPatchResult, SteerResult, load_result, result_of
from mechdiff.experiments.stage import SIDES, Stage, Study, opt
from mechdiff.experiments.steer import SIDE_OF
from mechdiff.experiments.steps import group_ids
from mechdiff.experiments.tokens import RESPONSES, response_inputs
from mechdiff.patching import Patch
from mechdiff.patching.response import raw_patch, response_readout
from mechdiff.report.hooks import ReportHooks

TENSORS, META = "tensors/response_readout.safetensors", "response/readout.json"
READOUTS = ("decision", "response")
OTHER = {"base": "tuned", "tuned": "base"}


@dataclass
class ResponseOptions:
    response_k: int = opt(8, "response tokens read: mean KL over the first K tokens of each response (as the "
                             "tokens stage's --response-k)")
    responders: list[str] = opt(help="whose greedy responses are read (comma list of tuned, base)",
                                factory=lambda: ["tuned", "base"])
    readout: str = opt("decision", "the readout of the study's headlines for RQ2's drop and RQ3's handle shares "
                                   "(mechdiff compare, the verdict): decision (the decision token, RQ2's and RQ3's "
                                   "own) | response (this stage's, first K response tokens of the tuned model's "
                                   "responses)")


def check(opts: ResponseOptions, n_layers: int) -> None:
    """Option errors before any model work."""
    if opts.response_k < 1:
        raise ConfigError(f"--response-k must be >= 1, got {opts.response_k}")
    if not opts.responders or len(set(opts.responders)) != len(opts.responders) or \
            not set(opts.responders) <= set(SIDES):
        raise ConfigError(f"--responders: {opts.responders!r}; give tuned and/or base, each once")
    if opts.readout not in READOUTS:
        raise ConfigError(f"--readout must be one of {', '.join(READOUTS)}, got {opts.readout!r}")


# ------------------------------------------------------------------------------------- plan
def _plan(study: Study) -> dict:
    """What can be read in this run directory: RQ2's winner, RQ3's saved handles, and why not."""
    run, skipped = study.run, {}
    rq2 = load_result(run, MappedPatchResult)
    winner = None
    if rq2 is None:
        skipped["rq2"] = "mapped-patch has not run in this run directory (no winner to read)"
    elif rq2.winner is None:
        skipped["rq2"] = rq2.answer or "mapped-patch found no winner (no map transfers the change)"
    else:
        w = rq2.winner
        alpha = w.alpha_value if w.alpha_value is not None else (float(w.alpha) if w.alpha != "auto" else None)
        if alpha is None:
            skipped["rq2"] = "the winner's alpha ('auto') has no recorded value: rerun mapped-patch"
        else:
            winner = {"solver": w.solver, "layer": w.layer, "site": w.site, "alpha": w.alpha, "alpha_value": alpha,
                      "map": f"maps/L{w.layer}_{w.site}_{w.solver}", "raw": study.same_width,
                      "kl_raw": w.kl_raw, "kl_mapped": w.kl_mapped, "drop_pct": w.drop_pct}
    rq3 = load_result(run, SteerResult)
    handles = []
    if rq3 is None:
        skipped["rq3"] = "steer has not run in this run directory (no handle to read)"
    elif not rq3.handles:
        skipped["rq3"] = f"steer saved no handle (status: {rq3.status})"
    for prefix in rq3.handles if rq3 is not None else []:
        h = S.Handle.load(run.file(prefix))
        handles.append({"name": f"rq3.{h.mode}.L{h.layer}.k{h.k}", "prefix": prefix, "mode": h.mode, "layer": h.layer,
                        "site": h.site, "k": h.k, "alpha": h.alpha, "side": SIDE_OF[h.mode],
                        "kind": h.provenance.get("kind"), "decision_share": h.provenance.get("test_share")})
    # prompts a map or handle was fitted on, or its winner / k / alpha chosen on (dev): not held out
    held = {"rq2": _ids(run, "rq2_prompts.json", ("train", "dev")) if winner else [],
            "rq3": _ids(run, "rq3_prompts.json", ("fit", "neutral_fit", "dev")) if handles else []}
    return {"rq2": winner, "rq3": handles, "skipped": skipped, "not_held_out": held}


def _ids(run, name: str, keys) -> list[str]:
    data = run.read_json(name) if run.exists(name) else {}
    return sorted({str(i) for k in keys for i in data.get(k) or []})


# ------------------------------------------------------------------------------------- step
def _variants(study: Study, plan: dict) -> dict[str, dict]:
    """``{destination side: {name: build}}``: the tuned model reads the raw and mapped patches and the
    ablations (reference: the base), the base the steering handles (reference: the tuned model)."""
    out: dict[str, dict] = {"tuned": {}, "base": {}}
    w = plan["rq2"]
    if w:
        key = f"{w['site']}.{w['layer']}"
        prefix, on = study.run.file(w["map"]), {}                  # the map, loaded once per device
        mu = study.run.read_tensors(RQ2_STATES)[f"tuned/train/{key}"].float().mean(0)

        def mapped(states, key=key, mu=mu, a=w["alpha_value"]):
            x = states(key)                                        # [B, T, d_base], on the model's device
            if x.device not in on:
                on[x.device] = M.load_map(prefix, device=x.device)
            y = on[x.device].transform(x.reshape(-1, x.shape[-1]).float()).float()   # [B T, d_tuned], there
            return Patch(key, y.reshape(*x.shape[:2], -1), alpha=a, centre=mu)
        if w["raw"]:
            out["tuned"]["rq2.raw"] = raw_patch(key)
        out["tuned"]["rq2.mapped"] = mapped
    for h in plan["rq3"]:
        handle = S.Handle.load(study.run.file(h["prefix"]))
        if h["mode"] == "ablate":
            out[h["side"]][h["name"]] = lambda states, hd=handle: hd.patch(reference=states(hd.key))
        else:
            out[h["side"]][h["name"]] = lambda states, hd=handle: hd.patch()
    return out


def _measure(study: Study, opts: ResponseOptions, plan: dict, id_space: str) -> None:
    variants, tensors = _variants(study, plan), {}
    by_id = {str(p["id"]): p for p in study.target_prompts}
    meta: dict[str, Any] = {"k": opts.response_k, "plan": plan, "responders": {}, "ids": id_space}
    for who in opts.responders:
        ids, starts, metas = response_inputs(study, who)
        pids = [str(m["id"]) for m in metas]
        meta["responders"][who] = {"ids": pids, "groups": group_ids([by_id[p] for p in pids]).tolist() if pids else []}
        for dst in ("tuned", "base"):
            if dst == "base" and not variants["base"]:
                continue                                  # the gap is read with the tuned model as destination
            out = response_readout(study.side(dst).model, study.side(OTHER[dst]).model, study.base.tokenizer, ids,
                                   starts, opts.response_k, variants[dst], study.allowed_ids(dst),
                                   study.allowed_ids(OTHER[dst]), study.batch_size)
            tensors[f"{who}/{dst}/gap"] = out["gap"]
            for name in variants[dst]:
                tensors[f"{who}/{dst}/{name}/patch_kl"] = out["patch_kl"][name]
                tensors[f"{who}/{dst}/{name}/to_ref"] = out["to_ref"][name]
    study.run.write_tensors(TENSORS, tensors)
    study.run.write_json(META, meta)


def run(study: Study, opts: ResponseOptions) -> None:
    if not study.run.exists(RESPONSES):
        raise DataError(f"the response stage reads the tokens stage's cached responses ({RESPONSES}), which this "
                        "run directory does not hold: run `mechdiff tokens --out DIR` first (or add tokens to "
                        "--stages)")
    ids = study.id_space
    if ids is None:
        study.run.write_json(META, {"k": opts.response_k, "responders": {}, "ids": None, "plan": {
            "rq2": None, "rq3": [], "not_held_out": {}, "skipped": {"all": "the two tokenizers differ (and the tuned "
                                                                 "one does not extend the base's): a response cannot "
                                                                 "be read on one set of ids"}}})
        return
    plan = _plan(study)
    deps = ["tokens.responses"] + [s for s in ("rq2.sweep", "rq3.sweep") if study.run.step_done(s)]
    study.run.cached("response.readout", lambda: _measure(study, opts, plan, ids), [TENSORS, META], depends_on=deps,
                     info={"response_k": opts.response_k, "responders": opts.responders, "plan": plan, "ids": ids})


@result_of("response")
@dataclass
class ResponseResult:
    """The response readout of RQ2's winner and RQ3's handles (full numbers: response.json)."""

    k: int
    readout: str                                   # the study's headline readout (option ``readout``)
    gap: dict[str, float | None] = field(default_factory=dict)   # responder -> mean KL(base || tuned)
    rq2: list[ResponseMapped] = field(default_factory=list)
    rq3: list[ResponseHandle] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def summarise(study: Study, opts: ResponseOptions) -> ResponseResult:
    out = summarise_run(study.run, opts.readout)
    return ResponseResult(k=out["k"], readout=out["readout"], gap=out["gap"], rq2=out["rq2_rows"],
                          rq3=out["rq3_rows"], skipped=out["skipped"])


def _response_json(run_dir: Path) -> dict:
    f = Path(run_dir) / JSON
    return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}


REPORT = ReportHooks(topic="Response readout", sentences=lambda d: response_sentences(_response_json(d)),
                     section=lambda sec, d: response_section(sec, _response_json(d)),
                     numbers=lambda d: response_numbers(_response_json(d)), metrics=(JSON,))
STAGE = Stage(
    name="response", options=ResponseOptions, run=run, summarise=summarise, check=check,
    requires=("tokens", "mapped-patch", "steer"), result=ResponseResult, report=REPORT,
    help="RQ2's mapped patch and RQ3's handles read over the first K tokens of each model's response "
         "(patched at every position), with intervals",
    done_message="response readout written to response.json")
STAGES = (STAGE,)
