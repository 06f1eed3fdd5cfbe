"""The ``response`` stage's summary (see :mod:`mechdiff.experiments.response`), from its step outputs
alone: per responder the RQ2 row (raw vs mapped patch: KL to the tuned model, share of the response gap
closed, drop %) and one RQ3 row per saved handle (share of the gap closed), each share and drop with
its cluster-bootstrap interval over topic groups or the reason it has none -> response.json; the report
hooks' sentences, table and numbers read that file."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from mechdiff.analyses import intervals as I
from mechdiff.artifacts import RunDir
from mechdiff.errors import ConfigError, DataError
from mechdiff.experiments.maps_summary import MIN_RAW_KL

JSON = "response.json"
TENSORS, META = "tensors/response_readout.safetensors", "response/readout.json"
DECISION = "decision token"


def readout_name(k: int, who: str | None = None) -> str:
    """How a number of this stage is read: ``response, first K tokens`` (of whose responses)."""
    return f"response, first {k} tokens" + (f" ({who} model's responses)" if who else "")


@dataclass
class ResponseMapped:
    """RQ2's winner read over one responder's responses (intervals: :mod:`mechdiff.analyses.intervals`
    dicts; a dict with only ``note`` where there is none)."""

    responder: str
    solver: str
    layer: int
    site: str
    alpha: Any
    n_texts: int
    in_sample: bool
    kl_raw: float | None             # mean KL(tuned clean || tuned raw-patched); None: widths differ
    kl_mapped: float | None
    share_raw: dict | None           # share of the response gap KL(base || tuned) the raw patch closes
    share_mapped: dict | None
    drop_pct: dict | None            # 100 (1 - KL_mapped / KL_raw)
    decision_drop_pct: float | None  # RQ2's own drop at the decision token (test prompts)
    note: str = ""


@dataclass
class ResponseHandle:
    """One saved RQ3 handle read over one responder's responses."""

    responder: str
    mode: str
    layer: int
    site: str
    k: int
    alpha: float
    side: str                        # the model it edits (base: towards the tuned; tuned: towards the base)
    n_texts: int
    in_sample: bool
    gap: float | None                # mean KL(other || self) over the response
    kl: float | None                 # mean KL(other || patched)
    share: dict | None
    decision_share: float | None     # RQ3's own test share at its measured token
    kind: str | None = None
    note: str = ""


def _mean(x: torch.Tensor) -> float | None:
    return float(x.double().mean()) if x.numel() else None


def _interval(fn, *args) -> dict:
    try:
        return fn(*args)
    except (DataError, ConfigError) as e:        # too few texts or topic groups: say so
        return {"estimate": None, "note": f"no interval: {e}"}


def _share(kl: torch.Tensor, gap: torch.Tensor, groups) -> dict:
    g = _mean(gap)
    if g is None or not g > 0:
        return {"estimate": None, "note": "undefined: no response gap (the two models agree on these tokens)"}
    iv = _interval(I.share_closed, kl, gap, groups)
    iv["estimate"] = 1.0 - float(kl.double().mean()) / g
    return iv


def _drop(kl_mapped: torch.Tensor, kl_raw: torch.Tensor, groups) -> dict:
    raw = _mean(kl_raw)
    if raw is None or raw < MIN_RAW_KL:
        return {"estimate": None, "note": f"undefined: the raw patch changes nothing over the response (KL_raw "
                                          f"{0.0 if raw is None else raw:.2g} < {MIN_RAW_KL:g})"}
    iv = _interval(I.share_closed, kl_mapped, kl_raw, groups)
    est = 100.0 * (1.0 - float(kl_mapped.double().mean()) / raw)
    return {**iv, "estimate": est, **{k: 100 * iv[k] for k in ("ci_low", "ci_high", "se")
                                     if isinstance(iv.get(k), float)}}


def _held_out(ids: list[str], fitted: list[str]) -> tuple[list[int], bool]:
    """Rows whose prompt is held out (not fitted on, nothing chosen on it); all of them (in-sample)
    where fewer than two would remain."""
    fit = set(fitted)
    keep = [i for i, p in enumerate(ids) if p not in fit]
    return (keep, False) if len(keep) >= 2 else (list(range(len(ids))), bool(fit & set(ids)))


def _rows(meta: dict, t: dict) -> tuple[list[ResponseMapped], list[ResponseHandle], dict]:
    plan, k = meta["plan"], meta["k"]
    rq2_rows, rq3_rows, gaps = [], [], {}
    for who in sorted(meta["responders"], key=lambda w: (w != "tuned", w)):   # the tuned model's responses first
        r = meta["responders"][who]
        groups = torch.tensor(r["groups"], dtype=torch.long)
        gap_t = t[f"{who}/tuned/gap"]
        gaps[who] = _mean(gap_t)
        w = plan.get("rq2")
        if w:
            keep, ins = _held_out(r["ids"], plan["not_held_out"].get("rq2") or [])
            ix, g = torch.tensor(keep, dtype=torch.long), groups[keep].tolist()
            pk = lambda n: t[f"{who}/tuned/{n}/patch_kl"][ix]  # noqa: E731
            to = lambda n: t[f"{who}/tuned/{n}/to_ref"][ix]    # noqa: E731
            raw = w["raw"]
            rq2_rows.append(ResponseMapped(
                responder=who, solver=w["solver"], layer=w["layer"], site=w["site"], alpha=w["alpha"],
                n_texts=len(keep), in_sample=ins, kl_raw=_mean(pk("rq2.raw")) if raw else None,
                kl_mapped=_mean(pk("rq2.mapped")),
                share_raw=_share(to("rq2.raw"), gap_t[ix], g) if raw else None,
                share_mapped=_share(to("rq2.mapped"), gap_t[ix], g),
                drop_pct=_drop(pk("rq2.mapped"), pk("rq2.raw"), g) if raw else
                {"estimate": None, "note": "n/a: no raw patch (the widths differ)"},
                decision_drop_pct=w.get("drop_pct"),
                note=f"{readout_name(k, who)}; patched at every position"))
        for h in plan.get("rq3") or []:
            keep, ins = _held_out(r["ids"], plan["not_held_out"].get("rq3") or [])
            ix, g = torch.tensor(keep, dtype=torch.long), groups[keep].tolist()
            gap_h, kl = t[f"{who}/{h['side']}/gap"][ix], t[f"{who}/{h['side']}/{h['name']}/to_ref"][ix]
            rq3_rows.append(ResponseHandle(
                responder=who, mode=h["mode"], layer=h["layer"], site=h["site"], k=h["k"], alpha=h["alpha"],
                side=h["side"], n_texts=len(keep), in_sample=ins, gap=_mean(gap_h), kl=_mean(kl),
                share=_share(kl, gap_h, g), decision_share=h.get("decision_share"), kind=h.get("kind"),
                note=f"{readout_name(k, who)}; applied at every position"))
    return rq2_rows, rq3_rows, gaps


def summarise_run(run: RunDir, readout: str) -> dict:
    """response.json from the step outputs; returns it with the typed rows beside (``rq2_rows``, ``rq3_rows``)."""
    meta = run.read_json(META)
    t = run.read_tensors(TENSORS) if run.exists(TENSORS) else {}
    rq2_rows, rq3_rows, gaps = _rows(meta, t) if meta["responders"] else ([], [], {})
    k = meta["k"]
    out = {"title": "Response readout: RQ2's mapped patch and RQ3's handles over the response",
           "summary": (f"Each edit applied at every position of prompt + response, teacher-forced on each model's "
                       f"greedy response (tokens stage); means over the first {k} response tokens (shared "
                       "vocabulary). RQ2: KL(tuned clean || tuned patched) for the raw and the mapped patch of "
                       "mapped-patch's winner, the share of the response gap KL(base || tuned) each closes, drop % "
                       "= 100 (1 - KL_mapped / KL_raw). RQ3: share of the gap each saved handle closes (steer/add/"
                       "map in the base towards the tuned model, ablate in the tuned model towards the base). "
                       "Intervals: 95% cluster bootstrap over topic groups. Texts whose prompt the map or handle "
                       "was fitted on, or its winner / k / alpha chosen on (dev), are left out (in_sample where "
                       "fewer than two remain)."),
           "headline": _headline(k, readout, gaps, rq2_rows, rq3_rows, meta["plan"].get("skipped") or {}),
           "k": k, "readout": readout, "readout_name": readout_name(k), "gap": gaps, "ids": meta.get("ids"),
           "skipped": dict(meta["plan"].get("skipped") or {}),
           "rq2": [asdict(r) for r in rq2_rows], "rq3": [asdict(r) for r in rq3_rows],
           "table": [_table_row(r) for r in rq2_rows + rq3_rows]}
    run.write_json(JSON, out)
    return {**out, "rq2_rows": rq2_rows, "rq3_rows": rq3_rows}


def _headline(k: int, readout: str, gaps: dict, rq2_rows: list, rq3_rows: list, skipped: dict) -> dict:
    """The few numbers the explorer's overview shows (the tuned model's responses where read)."""
    head: dict[str, Any] = {"readout": readout_name(k), "study headlines read": readout}
    head.update({f"KL(base || tuned), {who} responses": g for who, g in gaps.items()})
    for r in rq2_rows[:1]:
        head[f"RQ2 drop % ({r.responder} responses)"] = fmt_iv(r.drop_pct, pct=True)
    for r in rq3_rows:
        if r.responder == (rq3_rows[0].responder if rq3_rows else None):
            head[f"RQ3 {r.mode} k={r.k} share ({r.responder} responses)"] = fmt_iv(r.share)
    head.update({f"{part} not measured": why for part, why in skipped.items()})
    return head


def fmt_iv(iv: dict | None, pct: bool = False) -> str:
    """An interval dict as text: ``0.42 [0.31, 0.55]``, or the estimate with why it has no interval, or
    ``n/a (why)`` where it has no estimate."""
    if not iv:
        return "n/a"
    est = iv.get("estimate")
    if est is None:
        return f"n/a ({iv.get('note', 'undefined')})"
    spec = "{:.1f}%" if pct else "{:.3f}"
    lo = iv.get("ci_low")
    if iv.get("note") and not (isinstance(lo, float) and math.isfinite(lo)):
        return f"{spec.format(est)} ({iv['note']})"
    return I.fmt(iv, spec)


def _table_row(r) -> dict:
    if isinstance(r, ResponseMapped):
        return {"RQ": "RQ2", "readout": r.note.split(";")[0], "responder": r.responder,
                "edit": f"mapped patch {r.solver} L{r.layer} {r.site} alpha={r.alpha}", "n_texts": r.n_texts,
                "KL raw": r.kl_raw, "KL mapped": r.kl_mapped, "share closed, raw": fmt_iv(r.share_raw),
                "share closed, mapped": fmt_iv(r.share_mapped), "drop %": fmt_iv(r.drop_pct, pct=True),
                f"drop % ({DECISION})": r.decision_drop_pct, "in-sample": r.in_sample}
    return {"RQ": "RQ3", "readout": r.note.split(";")[0], "responder": r.responder,
            "edit": f"{r.mode} ({r.side}) {r.kind or ''} L{r.layer} k={r.k} alpha={r.alpha:g}".replace("  ", " "),
            "n_texts": r.n_texts, "gap": r.gap, "share closed": fmt_iv(r.share),
            f"share closed ({DECISION})": r.decision_share, "in-sample": r.in_sample}


# ------------------------------------------------------------------------------------- report hooks
def _first(rows: list[dict]) -> list[dict]:
    """The rows of the first responder (the tuned model's responses where read)."""
    who = next((r["responder"] for r in rows if r["responder"] == "tuned"), rows[0]["responder"] if rows else None)
    return [r for r in rows if r["responder"] == who]


def response_sentences(res: dict) -> list[str]:
    """Executive-summary sentences, each naming its readout; [] where the stage has not run."""
    if not res:
        return []
    k, out = res["k"], []
    if "all" in res.get("skipped", {}):
        return [f"Response readout not measured: {res['skipped']['all']}."]
    gaps = "; ".join(f"{g:.3g} nats along the {who} model's responses"
                     for who, g in res["gap"].items() if g is not None)
    if gaps:
        out.append(f"Over the response (first {k} tokens, teacher-forced), KL(base ‖ tuned) is {gaps}; RQ2 and "
                   f"RQ3 themselves read the {DECISION}" + (" (both models read the base tokenizer's ids: the "
                   "tuned tokenizer extends it)" if res.get("ids") == "base ids" else "") + ".")
    for r in _first(res.get("rq2") or []):
        out.append(f"RQ2 read over the response ({readout_name(k, r['responder'])}, patched at every position): the "
                   f"winner's mapped patch ({r['solver']} L{r['layer']} {r['site']}, alpha {r['alpha']}) gives drop "
                   f"{fmt_iv(r['drop_pct'], pct=True)} vs the raw patch (95% interval, topic groups; {DECISION}: "
                   + ("n/a" if r["decision_drop_pct"] is None else f"{r['decision_drop_pct']:.1f}%")
                   + f"); share of the response gap closed: mapped {fmt_iv(r['share_mapped'])}, raw "
                   f"{fmt_iv(r['share_raw'])}" + (" (in-sample)" if r["in_sample"] else "") + ".")
    if "rq2" in res.get("skipped", {}):
        out.append(f"RQ2 over the response: not measured: {res['skipped']['rq2']}.")
    rows = _first(res.get("rq3") or [])
    if rows:
        parts = [f"{r['mode']} k={r['k']} at L{r['layer']} closes {fmt_iv(r['share'])} ({DECISION}: "
                 + ("n/a" if r["decision_share"] is None else f"{r['decision_share']:.3f}") + ")"
                 + (", in-sample" if r["in_sample"] else "") for r in rows]
        out.append(f"RQ3's handles read over the response ({readout_name(k, rows[0]['responder'])}, applied at every "
                   f"position), share of the gap closed with 95% interval: " + "; ".join(parts) + ".")
    if "rq3" in res.get("skipped", {}):
        out.append(f"RQ3 over the response: not measured: {res['skipped']['rq3']}.")
    if res.get("readout") == "response":
        out.append("This study's headlines for RQ2's drop and RQ3's handle shares (compare, verdict) use the "
                   f"response readout ({readout_name(k, 'tuned')}).")
    return out


COLUMNS = ["RQ", "readout", "responder", "edit", "n_texts", "KL raw", "KL mapped", "share closed, raw",
           "share closed, mapped", "drop %", f"drop % ({DECISION})", "gap", "share closed",
           f"share closed ({DECISION})", "in-sample"]


def response_section(sec, res: dict) -> None:
    """The report section: the readouts, then one table of every row (both responders)."""
    if not res or not res.get("table"):
        return
    sec.heading("Response readout (RQ2, RQ3)", 2, "response-readout")
    sec.para(res["summary"])
    sec.row_table(res["table"], COLUMNS)


def response_numbers(res: dict) -> dict[str, Any]:
    """Rows for ``mechdiff compare``; with ``readout = "response"`` RQ2's drop row comes from here."""
    if not res:
        return {}
    rq2 = _first(res.get("rq2") or [])
    d = (rq2[0]["drop_pct"] or {}).get("estimate") if rq2 else None
    out = {"response gap (tuned responses)": (res.get("gap") or {}).get("tuned"), "response mapped drop %": d}
    if res.get("readout") == "response":
        out.update({"mapped drop %": d, "raw patch KL (val)": rq2[0]["kl_raw"] if rq2 else None,
                    "drop readout": readout_name(res["k"], rq2[0]["responder"] if rq2 else "tuned")})
    return out
