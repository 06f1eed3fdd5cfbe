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


def _run(root, name, domain, rank, share, ablate, own):
    """A run directory holding only what the verdict reads: manifest, rq3.json, rq4.json."""
    import json
    d = root / name
    d.mkdir()
    iv = lambda v, lo, hi: {"estimate": v, "ci_low": lo, "ci_high": hi, "method": "constructed"}  # noqa: E731
    (d / "manifest.json").write_text(json.dumps({"pair": {"name": name, "domain": domain}}))
    (d / "rq3.json").write_text(json.dumps({"result": {
        "rank": {"20": iv(*rank), "22": iv(rank[0] - 1, rank[1] - 1, rank[2] - 1)},
        "by_mode": {"steer": {"cell": {"k": 2, "dev_share": 0.3, "test_share": share[0], "ppl_change_pct_masked": 1.5},
                              "estimates": {"test_share": iv(*share)}},
                    "map": {"cell": {"k": 8, "dev_share": 0.9, "test_share": 0.9}},    # k > 3: not a small handle
                    "ablate": {"cell": {"k": 1, "dev_share": 0.2, "test_share": ablate[0]},
                               "estimates": {"test_share": iv(*ablate)}}}}}))
    (d / "rq4.json").write_text(json.dumps({"churn": {"own": {"share_interval": iv(*own)}}}))
    return d


def test_compare_writes_the_verdict_of_a_constructed_knob_and_rewiring_pair(tmp_path):
    import json

    from mechdiff.compare import compare_runs
    knob = _run(tmp_path, "knob", "cultural", (2, 2, 3), (0.4, 0.3, 0.5), (0.5, 0.35, 0.6), (0.02, 0.0, 0.04))
    rew = _run(tmp_path, "rewiring", "cognitive", (12, 9, 15), (0.05, -0.05, 0.15), (0.45, 0.3, 0.6), (0.3, 0.2, 0.4))
    out = compare_runs([knob, rew], out=tmp_path / "cmp")
    v = json.loads((out / "compare.json").read_text())["verdict"]
    rows = {r["key"]: r for r in v["rows"]}
    assert rows["rank"]["cultural"]["value"] == 2 and rows["rank"]["cognitive"]["value"] == 12   # widest layer
    assert rows["rank"]["verdict"] == SUPPORTS and rows["head_churn"]["verdict"] == SUPPORTS
    assert rows["handle_steer"]["verdict"] == SUPPORTS                 # steer (k=2), not map (k=8)
    assert rows["handle_ablate"]["verdict"] == NOT_RESOLVED            # both ablate about half: no difference
    assert rows["side_effects"]["verdict"] == NOT_RESOLVED             # no interval: never a verdict
    assert "towards the hypothesis" in v["summary"]
    html = (out / "compare.html").read_text()
    assert "Verdict" in html and NOT_RESOLVED in html
    # the same runs with the roles swapped contradict it
    for name, dom in (("knob", "cognitive"), ("rewiring", "cultural")):
        m = tmp_path / name / "manifest.json"
        m.write_text(json.dumps({"pair": {"name": name, "domain": dom}}))
    v2 = json.loads((compare_runs([knob, rew], out=tmp_path / "cmp2") / "compare.json").read_text())["verdict"]
    assert {r["key"]: r["verdict"] for r in v2["rows"]}["rank"] == CONTRADICTS
    assert "against the hypothesis" in v2["summary"]


def test_a_handle_row_needs_a_meaningful_cultural_share():
    """Both handles below 10% (the GPU study: culture -0.0002 [-0.004, 0.003], math -0.33 [-0.40, -0.27]):
    a less negative share is no knob, so the row contradicts, though the difference is positive."""
    rows = {r.criterion.key: r.verdict for r in verdict_rows(
        {"handle_steer": Estimate(-0.0002, -0.0044, 0.0035), "handle_ablate": Estimate(0.3, 0.2, 0.4),
         "transfer": Estimate(0.12, 0.02, 0.3)},
        {"handle_steer": Estimate(-0.33, -0.40, -0.27), "handle_ablate": Estimate(0.02, -0.05, 0.08),
         "transfer": Estimate(0.0, -0.1, 0.1)})}
    assert rows == {"handle_steer": CONTRADICTS, "handle_ablate": SUPPORTS, "transfer": NOT_RESOLVED}


def test_an_exact_zero_difference_contradicts_a_predicted_difference():
    """Every head changed in both pairs (LoRA on every layer): 0.967 [0.967, 0.967] each; the predicted
    cultural < cognitive fails, and no sample size changes that."""
    rows = verdict_rows({"head_churn": Estimate(0.967, 0.967, 0.967)}, {"head_churn": Estimate(0.967, 0.967, 0.967)})
    assert rows[0].diff.lo == rows[0].diff.hi == 0 and rows[0].verdict == CONTRADICTS


def test_the_map_row_reads_the_map_at_rq1s_peak_layer_with_its_interval():
    from mechdiff.verdict import run_estimates
    iv = lambda v, lo, hi: {"estimate": v, "ci_low": lo, "ci_high": hi}  # noqa: E731
    maps = {"table": [
        {"layer": 0, "solver": "ridge", "control_layer": False, "dev_r2_vw": 0.99, "test_r2_vw": 0.99,
         "test_r2_interval": iv(0.99, 0.98, 1.0)},
        {"layer": 28, "solver": "ridge", "control_layer": False, "dev_r2_vw": 0.5, "test_r2_vw": 0.45,
         "test_r2_interval": iv(0.45, 0.3, 0.55)},
        {"layer": 28, "solver": "procrustes_scaled", "control_layer": False, "dev_r2_vw": 0.4, "test_r2_vw": 0.6,
         "test_r2_interval": iv(0.6, 0.5, 0.7)},
        {"layer": 1, "solver": "ridge", "control_layer": True, "dev_r2_vw": 0.9, "test_r2_vw": 0.9}]}
    rq1 = {"layers": {"chosen": [0, 14, 28], "evidence": {"peak": 28}}}
    e = run_estimates({}, {}, {"best map R2": 0.99}, maps, rq1)["map_r2"]
    assert (e.value, e.lo, e.hi) == (0.45, 0.3, 0.55)      # the peak layer, solver chosen on dev (not test)
    assert run_estimates({}, {}, {"best map R2": 0.99})["map_r2"].value == 0.99   # without maps: the best map
