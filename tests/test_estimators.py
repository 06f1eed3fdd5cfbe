"""Known-answer tests of the estimators in analyses/intervals.py and analyses/rank.py (synthetic truths)."""
import math

import pytest
import torch

from mechdiff.analyses import intervals as I
from mechdiff.analyses import rank as RK
from mechdiff.errors import DataError


def _groups(n, size):
    return torch.arange(n) // size


def test_ratio_interval_covers_truth_and_flags_zero_denominator():
    g = torch.Generator().manual_seed(0)
    n = 120
    den = 2.0 + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    num = 0.5 * den + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    r = I.ratio_of_means(num, den, _groups(n, 4))
    assert r["ci_low"] < 0.5 < r["ci_high"] and not r["undefined"] and r["n_groups"] == 30
    s = I.share_closed(num, den, _groups(n, 4))
    assert s["estimate"] == pytest.approx(1 - r["estimate"]) and s["ci_low"] < 0.5 < s["ci_high"]
    z = I.ratio_of_means(num, torch.randn(n, generator=g, dtype=torch.float64), _groups(n, 4))
    assert z["undefined"] and math.isnan(z["ci_low"]) and "undefined" in I.fmt(z)


def test_cluster_bootstrap_resamples_whole_groups():
    # every row of a group carries the group's value: the interval of the mean is as wide as for the
    # group means alone (30 groups), not as narrow as 120 independent rows would make it
    g = torch.Generator().manual_seed(1)
    vals = torch.randn(30, generator=g, dtype=torch.float64).repeat_interleave(4)
    grouped = I.mean(vals, _groups(120, 4))
    rows = I.mean(vals)
    assert grouped["ci_high"] - grouped["ci_low"] > 1.6 * (rows["ci_high"] - rows["ci_low"])
    one = I.mean(vals, torch.zeros(120))          # prompts of one topic: resampled one by one, and said so
    assert "too few to resample" in one["method"] and one["ci_high"] - one["ci_low"] == pytest.approx(
        rows["ci_high"] - rows["ci_low"], rel=0.2)
    with pytest.raises(DataError):
        I.mean(vals[:1])


def _planted(n, d, r, noise, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))[0]
    coef = torch.randn(n, r, generator=g, dtype=torch.float64) * torch.linspace(3, 1.5, r, dtype=torch.float64)
    return coef @ B.T + noise * torch.randn(n, d, generator=g, dtype=torch.float64), B


@pytest.mark.parametrize("r", [1, 3, 6])
def test_rank_recovers_planted_rank_with_interval(r):
    D, B = _planted(120, 48, r, 0.05, seed=r)
    est = RK.estimate_rank(D, _groups(120, 4), n_boot=30)
    assert est["estimate"] == r and est["ci_low"] <= r <= est["ci_high"]
    assert not est["exact"]                    # noise above float rounding: not exactly low rank
    U = torch.linalg.svd(D, full_matrices=False)[2][:r].T
    assert float(RK.principal_angles(U, B).max()) < 10


def test_rank_exact_low_rank_and_self_pair():
    H = torch.randn(80, 64, dtype=torch.float64)
    D, _ = _planted(80, 64, 2, 0.0)
    est = RK.estimate_rank((H + D).float() - H.float(), _groups(80, 2), scale=float(H.pow(2).mean().sqrt()), n_boot=20)
    assert est["estimate"] == 2 and est["exact"] and (est["ci_low"], est["ci_high"]) == (2, 2)
    zero = RK.estimate_rank(H.float() - H.float(), _groups(80, 2), n_boot=20)
    assert zero["estimate"] == 0 and (zero["ci_low"], zero["ci_high"]) == (0, 0)


def test_rank_against_an_explicit_null():
    D, _ = _planted(160, 96, 3, 0.05, seed=3)
    null = 0.05 * torch.randn(160, 96, dtype=torch.float64)
    assert RK.estimate_rank(D, _groups(160, 4), null=null, n_boot=30)["estimate"] == 3


def test_saturation_is_against_the_whole_difference_not_the_best_k():
    # shares 0.39, 0.40, 0.46 for k = 1..3 and the whole difference closes 0.95: nothing saturates
    # (90% of the best k tried would say k = 1)
    assert RK.saturation_k({1: 0.39, 2: 0.40, 3: 0.46}, 0.95) is None
    assert RK.saturation_k({1: 0.5, 2: 0.9, 3: 0.92}, 0.95) == 2
    n = 48
    gap = 1.0 + 0.1 * torch.rand(n, dtype=torch.float64)
    kl = torch.stack([gap * 0.6, gap * 0.1, gap * 0.08])     # shares 0.4, 0.9, 0.92
    s = RK.smallest_k(kl, [1, 2, 3], gap, _groups(n, 4), kl_full=gap * 0.05, n_boot=50)
    assert s["estimate"] == 2 and s["ci_low"] == 2 == s["ci_high"] and s["full_share"] == pytest.approx(0.95)
    m = RK.smallest_k(kl, [1, 2, 3], gap, _groups(n, 4), threshold=0.5, n_boot=50)
    assert m["estimate"] == 2 and m["not_reached"] == 0.0
    none = RK.smallest_k(kl, [1, 2, 3], gap, _groups(n, 4), threshold=0.99, n_boot=20)
    assert none["estimate"] is None and none["ci_high"] is None and none["not_reached"] == 1.0


def test_principal_angles():
    e = torch.eye(4, dtype=torch.float64)
    a = RK.principal_angles(e[:, :2], torch.stack([e[:, 0], (e[:, 1] + e[:, 2]) / 2 ** .5], 1))
    assert a.tolist() == pytest.approx([0.0, 45.0], abs=1e-6)


# ---- changed heads: per-head test, FDR, Storey share, recovery (analyses/head_counts.py)
from mechdiff.analyses import head_counts as HC  # noqa: E402


def _heads(noise, seed=0, n=16, U=270, m=60):
    g = torch.Generator().manual_seed(seed)
    truth = torch.zeros(U, dtype=torch.bool)
    truth[torch.randperm(U, generator=g)[:m]] = True
    size = 0.02 + 0.2 * torch.rand(U, 1, generator=g, dtype=torch.float64)    # some changes are small
    e = torch.where(truth[:, None], size * (1 + 0.5 * torch.randn(U, n, generator=g, dtype=torch.float64)), 0.0)
    return e + noise * torch.randn(U, n, generator=g, dtype=torch.float64), truth


def test_t_tail():
    assert HC.t_sf(0.0, 10) == pytest.approx(0.5, abs=1e-6)
    assert HC.t_sf(2.228, 10) == pytest.approx(0.025, abs=1e-3)     # the textbook t_{10, 0.975}
    assert HC.t_sf(1.96, math.inf) == pytest.approx(0.025, abs=1e-4)


def test_changed_share_matches_truth_exact_null():
    e, truth = _heads(0.0)
    r = HC.count_changed(e, _groups(16, 2), floor=1e-5, n_boot=50)
    assert r["n_changed"] == 60 and r["share_storey"] == pytest.approx(60 / 270, rel=0.25)
    assert r["share_interval"]["ci_low"] <= 60 / 270 <= r["share_interval"]["ci_high"]
    rec = HC.recovery_vs_truth(r["stat"], truth, r["changed"])
    assert rec["auroc"] == 1.0 and rec["precision_at_true_count"] == 1.0 and rec["false_discovery_proportion"] == 0
    # the within-layer z >= 2 cut this replaces finds at most one head in three per 9-head layer


def test_changed_share_against_a_noise_null():
    e, truth = _heads(0.01, seed=1)
    g = torch.Generator().manual_seed(1)        # its own generator: the null must not depend on test order
    null = HC.head_pvalues(0.01 * torch.randn(400, 16, dtype=torch.float64, generator=g))["stat"]  # self-diff-like
    r = HC.count_changed(e, _groups(16, 2), null=null, q=0.05, n_boot=30)
    rec = HC.recovery_vs_truth(r["stat"], truth, r["changed"])
    assert rec["auroc"] >= 0.9 and rec["false_discovery_proportion"] <= 0.1 and r["n_changed"] == 60
    # Storey's share against a finite empirical null is noisy at 270 units: over 30 null draws it ranged
    # 0.09-0.32 (mean 0.198, truth 0.222) while the BH count was 60-62; this draw gives 0.215
    assert abs(r["share_storey"] - 60 / 270) <= 0.25 * 60 / 270


def test_self_pair_no_changed_head():
    r = HC.count_changed(torch.zeros(270, 8), _groups(8, 2), floor=1e-5, n_boot=20)
    assert r["n_changed"] == 0 and r["share_storey"] == 0.0
    assert (r["share_interval"]["ci_low"], r["share_interval"]["ci_high"]) == (0.0, 0.0)


def test_bh_and_auroc_basics():
    assert HC.bh([0.001, 0.01, 0.03, 0.5], q=0.05).tolist() == [True, True, True, False]
    assert HC.bh([0.04, 0.5], q=0.05).tolist() == [False, False]
    assert HC.auroc([3, 2, 1, 0], [True, False, True, False]) == 0.75


def test_compare_reports_differences_with_intervals(tmp_path):
    """`compare`: the difference of two runs' interval-carrying numbers, "not resolved" when it covers 0."""
    import json

    from mechdiff.compare import differences, intervals
    for name, share, lo, hi in (("a", 0.6, 0.5, 0.7), ("b", 0.2, 0.1, 0.3), ("c", 0.55, 0.45, 0.65)):
        d = tmp_path / name
        d.mkdir()
        (d / "rq4.json").write_text(json.dumps({"churn": {"own": {"share_interval": {
            "estimate": share, "ci_low": lo, "ci_high": hi, "method": "cluster bootstrap"}}}}))
    runs = [{"label": n, "intervals": intervals(tmp_path / n)} for n in "abc"]
    rows = {r["b"]: r for r in differences(runs)}
    assert rows["b"]["verdict"] == "a higher" and rows["b"]["ci_low"] > 0
    assert rows["c"]["verdict"] == "not resolved" and rows["c"]["ci_low"] < 0 < rows["c"]["ci_high"]


def test_rq2_winner_drop_carries_an_interval():
    from mechdiff.experiments.maps_summary import sweep_table
    raw = [1, 1.1, .9, 1, 1.2, .8, 1, 1.1, .9, 1]
    v = {"n_dev": 4, "val_groups": [0, 0, 1, 1, 2, 3, 4, 5, 5, 6], "per_prompt_masked": [raw, [0.4 * x for x in raw]],
         "variants": [{"kind": "raw", "layer": 3, "site": "resid_post", "kl_mean": 1, "kl_dev_mean": 1,
                       "kl_unmasked_mean": 1, "alpha": None},
                      {"kind": "mapped", "solver": "ridge", "layer": 3, "site": "resid_post", "alpha": "1.0",
                       "alpha_value": 1.0, "kl_mean": .4, "kl_dev_mean": .4, "kl_unmasked_mean": .4}]}
    iv = sweep_table(v)["winner"]["drop_interval"]
    assert iv["estimate"] == pytest.approx(60.0) and iv["ci_low"] == pytest.approx(60.0) == iv["ci_high"]
    assert iv["n_groups"] == 5 and not iv["undefined"]        # the five test topic groups


def test_rank_interval_covers_a_graded_spectrum_estimate():
    """A spectrum that decays into the noise (many components near the edge): replicates of ~63%
    distinct groups resolve fewer components, so the raw percentile interval lay wholly below the
    estimate (a GPU run: 35 [22, 33]); the bias-shifted interval covers it."""
    g = torch.Generator().manual_seed(5)
    n, d, r = 96, 64, 40
    B = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))[0]
    coef = torch.randn(n, r, generator=g, dtype=torch.float64) * torch.logspace(0.3, -1.3, r, dtype=torch.float64)
    D = coef @ B.T + 0.02 * torch.randn(n, d, generator=g, dtype=torch.float64)
    est = RK.estimate_rank(D, torch.arange(n) // 2, n_boot=40)
    assert est["bias_shift"] > 0                       # the replicates do count fewer components
    assert est["ci_low"] <= est["estimate"] <= est["ci_high"]


def test_a_model_against_itself_rq2_drop_has_no_interval_and_covers_zero():
    """A model against itself: the raw patch KL is exactly 0 on every prompt, so a drop % has no denominator:
    there is no winner ("no map transfers the change"), and a map's drop interval is undefined (it
    covers 0: evidence of nothing)."""
    from mechdiff.experiments.maps_summary import sweep_table
    zero = [0.0] * 10
    v = {"n_dev": 4, "val_groups": [0, 0, 1, 1, 2, 3, 4, 5, 5, 6], "per_prompt_masked": [zero, zero],
         "variants": [{"kind": "raw", "layer": 3, "site": "resid_post", "kl_mean": 0, "kl_dev_mean": 0,
                       "kl_unmasked_mean": 0, "alpha": None},
                      {"kind": "mapped", "solver": "ridge", "layer": 3, "site": "resid_post", "alpha": "1.0",
                       "alpha_value": 1.0, "kl_mean": 0, "kl_dev_mean": 0, "kl_unmasked_mean": 0}]}
    from mechdiff.experiments.maps_summary import NO_TRANSFER, drop_interval
    t = sweep_table(v)
    assert t["winner"] is None and t["answer"].startswith(NO_TRANSFER) and "every drop is undefined" in t["answer"]
    iv = drop_interval(v, t["best"][0])
    assert iv["undefined"] and math.isnan(iv["ci_low"]) and I.covers(iv, 0.0) and iv["den_ci"] == [0.0, 0.0]
