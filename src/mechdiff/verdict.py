"""The verdict on the study's hypothesis, one row per criterion of the seeds.

Hypothesis: the *cultural* fine-tune is a low-rank policy knob and the *cognitive* (math)
fine-tune distributed rewiring. Each criterion names a quantity measured in every run (with an
interval) and the sign the hypothesis predicts for ``cultural - cognitive``. A row's verdict:

- *supports*: the difference's interval lies wholly on the predicted side;
- *contradicts*: it lies wholly on the other side;
- *not resolved at this sample size*: it covers 0, or a side has no estimate or no interval; an
  interval of zero width at 0 (the two are equal and no resample moves them) *contradicts*.

The handle rows (does a rank-k<=3 handle close a meaningful share, >= 10%, of the gap?) are judged on
each side's interval against that share first (:func:`judge_handle`): a cultural handle that closes
less than 10% contradicts the knob however the other pair fares.

Intervals of two runs are independent (different models, their own prompts), so the difference's
interval combines each side's half-widths in quadrature, per side (lower: sqrt(dl_a^2 + du_b^2),
upper: sqrt(du_a^2 + dl_b^2)); for percentile-bootstrap intervals this is the normal approximation.
The sentence that sums the rows up is generated from them (:func:`summary_sentence`), never written.

    rows = verdict_rows({"cultural": est_c, "cognitive": est_m})
    summary_sentence(rows)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

SUPPORTS, CONTRADICTS, NOT_RESOLVED = "supports", "contradicts", "not resolved at this sample size"


@dataclass(frozen=True)
class Estimate:
    """One run's number for one criterion: point value and interval (``lo <= value <= hi``)."""

    value: float | None
    lo: float | None = None
    hi: float | None = None
    note: str = ""           # e.g. "90% cluster bootstrap over 12 topics", or why there is no interval

    @property
    def has_interval(self) -> bool:
        return all(v is not None and math.isfinite(v) for v in (self.value, self.lo, self.hi))


@dataclass(frozen=True)
class Criterion:
    """A quantity and the sign of ``cultural - cognitive`` that the hypothesis predicts (+1 / -1)."""

    key: str
    label: str
    predicted_sign: int
    why: str


#: a handle closes a *meaningful* share of the gap at this share (RQ3's minimal-k target)
MEANINGFUL_SHARE = 0.10
HANDLE_KEYS = ("handle_steer", "handle_ablate", "transfer")

#: the seeds' criteria; ``key`` is what :func:`mechdiff.compare` extracts from each run
CRITERIA = (
    Criterion("map_r2", "held-out R2 of the transport map at the layers carrying the change", +1,
              "a policy knob is carried by a simple linear map; rewiring is not"),
    Criterion("rank", "rank estimate of the change (components above the null)", -1,
              "a knob is low rank; rewiring spreads over many directions"),
    Criterion("handle_steer", "share of the response-level gap a rank-k<=3 handle closes (steer the base up)", +1,
              "a low-rank handle reproduces a knob, not a rewiring"),
    Criterion("handle_ablate", "share of the response-level gap a rank-k<=3 ablation removes (tuned down)", +1,
              "removing a knob's few directions undoes it"),
    Criterion("side_effects", "side effects of that handle (neutral perplexity change, %)", -1,
              "a knob moves one behaviour and little else"),
    Criterion("head_churn", "share of heads whose own computation changed (all heads)", -1,
              "rewiring changes many heads; a knob few"),
    Criterion("transfer", "handle transfer across languages (share closed in another language)", +1,
              "a cultural knob acts across the languages of its culture"),
)


@dataclass(frozen=True)
class Row:
    criterion: Criterion
    cultural: Estimate
    cognitive: Estimate
    diff: Estimate
    verdict: str

    def to_json(self) -> dict:
        return {"key": self.criterion.key, "criterion": self.criterion.label,
                "predicted": "cultural > cognitive" if self.criterion.predicted_sign > 0 else "cultural < cognitive",
                "cultural": asdict(self.cultural), "cognitive": asdict(self.cognitive),
                "difference": asdict(self.diff), "verdict": self.verdict}


def difference(a: Estimate, b: Estimate) -> Estimate:
    """``a - b`` with an interval from independent intervals (quadrature of half-widths per side)."""
    if a.value is None or b.value is None:
        return Estimate(None, note="a side has no estimate")
    d = a.value - b.value
    if not (a.has_interval and b.has_interval):
        return Estimate(d, note="a side has no interval")
    lo = d - math.hypot(a.value - a.lo, b.hi - b.value)
    hi = d + math.hypot(a.hi - a.value, b.value - b.lo)
    return Estimate(d, lo, hi, "independent intervals combined in quadrature")


def judge(diff: Estimate, predicted_sign: int) -> str:
    """supports / contradicts / not resolved, from the difference's interval alone."""
    if not diff.has_interval:
        return NOT_RESOLVED
    if diff.lo == diff.hi == 0:     # no difference, and no resampling moves it: the prediction fails
        return CONTRADICTS
    if diff.lo > 0 or diff.hi < 0:
        return SUPPORTS if (diff.lo > 0) == (predicted_sign > 0) else CONTRADICTS
    return NOT_RESOLVED


def _meaningful(e: Estimate, floor: float) -> bool | None:
    """True: the interval lies at or above ``floor``; False: wholly below; None: it straddles (or none)."""
    if not e.has_interval:
        return None
    return True if e.lo >= floor else False if e.hi < floor else None


def judge_handle(cultural: Estimate, cognitive: Estimate, diff: Estimate, floor: float) -> str:
    """A handle row asks whether a rank-k<=3 handle closes a *meaningful* share (>= ``floor``) of the
    gap: the hypothesis predicts it does for the cultural pair and not for the cognitive one. A
    cultural handle whose interval lies wholly below ``floor`` contradicts it (whatever the other
    pair does: a less negative share is no knob); one at or above ``floor`` supports it where the
    cognitive one lies wholly below, else the difference decides (:func:`judge`); a cultural
    interval that straddles ``floor`` is not resolved."""
    c, m = _meaningful(cultural, floor), _meaningful(cognitive, floor)
    if c is False:
        return CONTRADICTS
    if c is True:
        return SUPPORTS if m is False else judge(diff, +1)
    return NOT_RESOLVED


def verdict_rows(cultural: dict[str, Estimate], cognitive: dict[str, Estimate]) -> list[Row]:
    """One row per criterion measured in at least one of the two runs."""
    rows = []
    for c in CRITERIA:
        a, b = cultural.get(c.key), cognitive.get(c.key)
        if a is None and b is None:
            continue
        a, b = a or Estimate(None, note="not measured"), b or Estimate(None, note="not measured")
        d = difference(a, b)
        v = judge_handle(a, b, d, MEANINGFUL_SHARE) if c.key in HANDLE_KEYS else judge(d, c.predicted_sign)
        rows.append(Row(c, a, b, d, v))
    return rows


def summary_sentence(rows: list[Row]) -> str:
    """The one sentence that sums the rows up (counts and the criteria behind them)."""
    if not rows:
        return "No criterion of the hypothesis was measured in both runs: no verdict."
    by = {v: [r.criterion.key for r in rows if r.verdict == v] for v in (SUPPORTS, CONTRADICTS, NOT_RESOLVED)}
    n = len(rows)
    parts = [f"{len(by[v])} of {n} {'criterion' if n == 1 else 'criteria'} {v}" + (f" ({', '.join(by[v])})" if by[v] else "")
             for v in (SUPPORTS, CONTRADICTS, NOT_RESOLVED)]
    if by[SUPPORTS] and not by[CONTRADICTS]:
        overall = "the data lean towards the hypothesis"
    elif by[CONTRADICTS] and not by[SUPPORTS]:
        overall = "the data lean against the hypothesis"
    elif by[SUPPORTS] and by[CONTRADICTS]:
        overall = "the criteria disagree"
    else:
        overall = "the hypothesis is not resolved at this sample size"
    return (f"Is the cultural fine-tune a low-rank knob and the cognitive one distributed rewiring? "
            f"{'; '.join(parts)}: {overall}.")


#: the modes that move the base towards the tuned model (criterion handle_steer) and the one that
#: removes the tuned model's change (handle_ablate)
STEER_MODES, ABLATE_MODE, MAX_K = ("steer", "add", "map"), "ablate", 3


def _map_at_peak(maps: dict, rq1: dict) -> Estimate | None:
    """The transport map at RQ1's peak layer (where the patch KL is largest: the layer carrying the
    most change), its solver chosen on dev R2: test R2 with its interval over topic groups."""
    lay = (rq1 or {}).get("layers") or {}
    peak = (lay.get("evidence") or {}).get("peak")
    peak = peak if peak is not None else max(lay.get("chosen") or [], default=None)
    rows = [r for r in (maps or {}).get("table") or [] if r.get("layer") == peak and not r.get("control_layer")
            and r.get("dev_r2_vw") is not None and r.get("test_r2_vw") is not None]
    if not rows:
        return None
    r = max(rows, key=lambda r: r["dev_r2_vw"])
    iv, what = r.get("test_r2_interval") or {}, f"{r['solver']} at L{peak} (RQ1's peak)"
    lo, hi = iv.get("ci_low"), iv.get("ci_high")
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return Estimate(float(r["test_r2_vw"]), note=f"{what}: no interval")
    return Estimate(float(r["test_r2_vw"]), float(lo), float(hi), f"{what}: 95% cluster bootstrap over topic groups")


def run_estimates(intervals: dict[str, Estimate], rq3: dict, numbers: dict, maps: dict | None = None,
                  rq1: dict | None = None, response: dict | None = None) -> dict[str, Estimate]:
    """One run's estimate per criterion, from its interval-carrying headlines (``compare.intervals``),
    its ``rq3.json`` and its compare numbers. Rules (chosen before looking at any result):

    - rank: the largest rank estimate over the layers RQ3 analysed (where the change is widest);
    - handle_steer: of the steering modes whose handle was chosen on dev at k <= 3, the one with the
      best *dev* share; its test share with interval (never the best test share: that is selection);
    - handle_ablate: the ablation handle's test share where its k <= 3;
    - side_effects: that steering handle's neutral perplexity change (%), no interval (not resolved);
    - head_churn: the changed-head share of the ``own`` measure (else ``swap``);
    - map_r2: the test R2 of the map at RQ1's peak layer (``maps``, ``rq1``: those runs' maps.json
      and rq1.json), its solver chosen on dev; without them the best map's (no interval).

    ``response`` (the run's response.json): where its ``readout`` is ``"response"``, the two handle
    rows read the same handles' shares over the response (the tuned model's responses, first K
    tokens; :func:`response_handle`) instead of the decision token, and their notes say so.
    """
    out: dict[str, Estimate] = {}
    ranks = [e for k, e in intervals.items() if k.startswith("RQ3 rank of the difference at L")]
    if ranks:
        out["rank"] = max(ranks, key=lambda e: e.value)
    by_mode = (rq3.get("result") or {}).get("by_mode") or {}

    def cell(mode):
        c = (by_mode.get(mode) or {}).get("cell") or {}
        return c if c.get("k") is not None and c["k"] <= MAX_K else None
    steer = [(m, cell(m)) for m in STEER_MODES if cell(m) and cell(m).get("dev_share") is not None]
    if steer:
        steer.sort(key=lambda mc: -mc[1]["dev_share"])
        mode, c = steer[0]
        est = intervals.get(f"RQ3 {mode}: test share of the gap closed")
        out["handle_steer"] = est or Estimate(c.get("test_share"), note=f"{mode} k={c['k']}: no interval")
        ppl = c.get("ppl_change_pct_masked", c.get("ppl_change_pct_unmasked"))
        if ppl is not None:
            out["side_effects"] = Estimate(float(ppl), note=f"{mode} k={c['k']}: no interval")
    if cell(ABLATE_MODE):
        c = cell(ABLATE_MODE)
        out["handle_ablate"] = intervals.get(f"RQ3 {ABLATE_MODE}: test share of the gap closed") or \
            Estimate(c.get("test_share"), note=f"k={c['k']}: no interval")
    if (response or {}).get("readout") == "response":
        for key, mode in (("handle_steer", steer[0][0] if steer else None), ("handle_ablate", ABLATE_MODE)):
            if key in out and mode is not None:
                out[key] = response_handle(response, mode, out[key])
    churn = intervals.get("RQ4 changed heads (own)") or intervals.get("RQ4 changed heads (swap)")
    if churn:
        out["head_churn"] = churn
    peak_map = _map_at_peak(maps, rq1)
    if peak_map is not None:
        out["map_r2"] = peak_map
    elif numbers.get("best map R2") is not None:
        out["map_r2"] = Estimate(float(numbers["best map R2"]), note="held-out R2 of one split: no interval")
    return out


def response_handle(response: dict, mode: str, decision: Estimate) -> Estimate:
    """The share of the gap RQ3's saved ``mode`` handle closes over the response (the response stage's
    row for the tuned model's responses, else the first responder's), with its interval; where the
    response stage has no row for it, the decision-token ``decision`` with a note saying so."""
    rows = [r for r in response.get("rq3") or [] if r.get("mode") == mode]
    r = next((r for r in rows if r.get("responder") == "tuned"), rows[0] if rows else None)
    if r is None:
        return Estimate(decision.value, decision.lo, decision.hi,
                        f"{decision.note}; decision token (the response stage has no {mode} row)")
    iv, what = r.get("share") or {}, (f"response, first {response.get('k')} tokens ({r['responder']} model's "
                                      f"responses), {mode} k={r.get('k')}")
    lo, hi = iv.get("ci_low"), iv.get("ci_high")
    if iv.get("estimate") is None:
        return Estimate(None, note=f"{what}: {iv.get('note', 'undefined')}")
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return Estimate(float(iv["estimate"]), note=f"{what}: {iv.get('note') or 'no interval'}")
    return Estimate(float(iv["estimate"]), float(lo), float(hi), f"{what}: {iv.get('method', '')}")


def verdict_for(runs: list[dict]) -> dict | None:
    """The verdict table of a comparison: ``runs`` as compare builds them (``domain``, ``label``,
    ``estimates``). Needs exactly one ``cultural`` and one ``cognitive`` run; else None."""
    cult = [r for r in runs if r.get("domain") == "cultural"]
    cogn = [r for r in runs if r.get("domain") == "cognitive"]
    if len(cult) != 1 or len(cogn) != 1:
        return None
    rows = verdict_rows(cult[0]["estimates"], cogn[0]["estimates"])
    return {"cultural": cult[0]["label"], "cognitive": cogn[0]["label"], "rows": [r.to_json() for r in rows],
            "summary": summary_sentence(rows)}
