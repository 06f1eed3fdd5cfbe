"""The verdict on the study's hypothesis, one row per criterion of the seeds.

Hypothesis: the *cultural* fine-tune is a low-rank policy knob and the *cognitive* (math)
fine-tune distributed rewiring. Each criterion names a quantity measured in every run (with an
interval) and the sign the hypothesis predicts for ``cultural - cognitive``. A row's verdict:

- *supports*: the difference's interval lies wholly on the predicted side;
- *contradicts*: it lies wholly on the other side;
- *not resolved at this sample size*: it covers 0, or a side has no estimate or no interval.

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
    if diff.lo > 0 or diff.hi < 0:
        return SUPPORTS if (diff.lo > 0) == (predicted_sign > 0) else CONTRADICTS
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
        rows.append(Row(c, a, b, d, judge(d, c.predicted_sign)))
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
