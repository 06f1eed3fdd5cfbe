"""The verdict rows: supports / contradicts / not resolved from constructed estimates whose answer is known."""
import math

import pytest

from mechdiff.verdict import (CONTRADICTS, NOT_RESOLVED, SUPPORTS, Estimate, difference, judge, summary_sentence,
                              verdict_rows)


def test_difference_combines_independent_half_widths_per_side():
    d = difference(Estimate(5.0, 4.0, 7.0), Estimate(2.0, 1.0, 2.5))
    assert d.value == 3.0
    assert d.lo == pytest.approx(3.0 - math.hypot(1.0, 0.5))
    assert d.hi == pytest.approx(3.0 + math.hypot(2.0, 1.0))


def test_judge_by_the_side_of_the_interval():
    assert judge(Estimate(1.0, 0.2, 1.8), +1) == SUPPORTS
    assert judge(Estimate(1.0, 0.2, 1.8), -1) == CONTRADICTS
    assert judge(Estimate(-1.0, -1.8, -0.2), -1) == SUPPORTS
    assert judge(Estimate(0.5, -0.1, 1.1), +1) == NOT_RESOLVED
    assert judge(Estimate(0.5), +1) == NOT_RESOLVED          # no interval: never a verdict


def test_rows_for_a_knob_vs_rewiring_pair_and_the_reverse():
    knob = {"rank": Estimate(2, 2, 3), "head_churn": Estimate(0.02, 0.0, 0.05), "map_r2": Estimate(0.9, 0.85, 0.95)}
    rewiring = {"rank": Estimate(14, 11, 16), "head_churn": Estimate(0.3, 0.22, 0.4), "map_r2": Estimate(0.4, 0.3, 0.5)}
    rows = verdict_rows(knob, rewiring)
    assert [r.verdict for r in rows] == [SUPPORTS] * 3
    assert "3 of 3 criteria supports" in summary_sentence(rows) and "towards the hypothesis" in summary_sentence(rows)
    rev = verdict_rows(rewiring, knob)
    assert [r.verdict for r in rev] == [CONTRADICTS] * 3
    assert "against the hypothesis" in summary_sentence(rev)


def test_overlapping_or_missing_estimates_are_not_resolved():
    rows = verdict_rows({"rank": Estimate(3, 1, 6), "transfer": Estimate(0.2, 0.05, 0.4)},
                        {"rank": Estimate(4, 2, 7)})
    assert {r.criterion.key: r.verdict for r in rows} == {"rank": NOT_RESOLVED, "transfer": NOT_RESOLVED}
    assert rows[1].diff.note == "a side has no estimate"
    assert "not resolved at this sample size" in summary_sentence(rows)
    assert rows[0].to_json()["predicted"] == "cultural < cognitive"
