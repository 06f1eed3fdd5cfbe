"""Known-answer tests for analyses/maps.py and analyses/map_metrics.py (MATH.md tests 3-6)."""

import json
import math

import pytest
import torch

from mechdiff.errors import ConfigError, SiteError
from mechdiff.analyses.maps import (
    IdentityMap, RidgeMap, ProcrustesMap, PCAProcrustesMap, ScaledProcrustesMap, LogitSubspaceMap,
    Whitener, check_shrinkage, shrink_covariance, load_map,
)
from mechdiff.analyses.map_metrics import map_metrics, rotation_drift, shuffle_control

F64 = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=gen(seed), dtype=F64)


def orth(d, seed=1):
    q, r = torch.linalg.qr(randn(d, d, seed=seed))
    return q * torch.sign(torch.diagonal(r))


def planted_linear(n=200, dx=12, dy=9, noise=0.05, seed=0):
    X = randn(n, dx, seed=seed) * torch.linspace(0.5, 3.0, dx, dtype=F64) + 3.0
    W = randn(dx, dy, seed=seed + 2)
    b = randn(dy, seed=seed + 3)
    Y = X @ W + b + noise * randn(n, dy, seed=seed + 4)
    return X, Y, W, b


# ---------------------------------------------------------------- 3. Procrustes
def test_procrustes_recovers_planted_rotation_and_scale():
    X = randn(100, 16, seed=3) * torch.linspace(0.5, 3, 16, dtype=F64)
    Q, c, b = orth(16, 4), 2.5, randn(16, seed=5)
    Y = c * X @ Q + b
    m = ProcrustesMap().fit(X, Y)
    assert torch.allclose(m.R_, Q, atol=1e-10)
    assert m.scale_ == pytest.approx(c, rel=1e-12)
    assert torch.allclose(m.R_.T @ m.R_, torch.eye(16, dtype=F64), atol=1e-12)
    Xv = randn(10, 16, seed=6)
    assert torch.allclose(m.transform(Xv), c * Xv @ Q + b, atol=1e-10)
    assert ProcrustesMap(scale=False).fit(X, Y).scale_ == 1.0


def test_procrustes_semi_orthogonal_576_to_640():
    dx, dy = 576, 640
    X = randn(700, dx, seed=7)
    Q = torch.linalg.qr(randn(dy, dx, seed=8))[0].T  # [576, 640], Q Q^T = I
    c = 0.7
    Y = c * X @ Q - 1.0
    m = ProcrustesMap().fit(X, Y)
    assert m.R_.shape == (dx, dy)
    assert torch.allclose(m.R_ @ m.R_.T, torch.eye(dx, dtype=F64), atol=1e-10)
    assert torch.allclose(m.R_, Q, atol=1e-8)
    assert m.scale_ == pytest.approx(c, rel=1e-10)


def test_pca_procrustes_on_low_rank_planted():
    Z = randn(150, 4, seed=9) * torch.tensor([5.0, 3, 2, 1], dtype=F64)
    X = Z @ torch.linalg.qr(randn(20, 4, seed=10))[0].T  # rank 4 in 20 dims
    Y = 1.5 * X @ torch.linalg.qr(randn(30, 20, seed=11))[0].T + 2.0  # 20 -> 30
    m = PCAProcrustesMap(q=4).fit(X[:100], Y[:100])
    assert torch.allclose(m.transform(X[100:]), Y[100:], atol=1e-9)
    with pytest.raises(ConfigError):
        PCAProcrustesMap(q=25).fit(X, Y)


# ---------------------------------------------------------------- 4. Ridge
def test_ridge_small_lambda_equals_lstsq_and_planted_recovered():
    X, Y, W, b = planted_linear()
    m = RidgeMap(lambdas=[1e-12]).fit(X, Y)
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    W_ls = torch.linalg.lstsq(Xc, Yc).solution
    assert torch.allclose(m.W_, W_ls, atol=1e-8)
    m2 = RidgeMap().fit(X[:150], Y[:150], X[150:], Y[150:])
    assert m2.score_kind_ == "val" and len(m2.scores_) == 17
    assert torch.allclose(m2.W_, W, atol=0.05)
    assert map_metrics(m2.transform(X[150:]), Y[150:])["r2_vw"] > 0.99


def test_ridge_huge_lambda_predicts_train_mean():
    X, Y, _, _ = planted_linear()
    m = RidgeMap(lambdas=[1e14]).fit(X, Y)
    assert torch.allclose(m.transform(randn(5, 12, seed=1)), Y.mean(0).expand(5, -1), atol=1e-6)


@pytest.mark.parametrize("n,d", [(25, 6), (12, 20)])  # N > d and N < d
def test_fast_loo_equals_bruteforce(n, d):
    X = randn(n, d, seed=2)
    Y = X @ randn(d, 3, seed=3) + randn(n, 3, seed=4)
    lams = [0.01, 1.0, 30.0]
    m = RidgeMap(lambdas=lams, select="loo").fit(X, Y)
    assert m.score_kind_ == "loo"
    for lam, sc in zip(lams, m.scores_):
        press = 0.0
        for i in range(n):
            k = torch.arange(n) != i
            mx, my = X[k].mean(0), Y[k].mean(0)
            Xc, Yc = X[k] - mx, Y[k] - my
            W = torch.linalg.solve(Xc.T @ Xc + lam * torch.eye(d, dtype=F64), Xc.T @ Yc)
            press += float(((Y[i] - my - (X[i] - mx) @ W) ** 2).sum())
        assert sc["mse"] == pytest.approx(press / (n * 3), rel=1e-9)
    assert m.lambda_ == lams[min(range(3), key=lambda j: m.scores_[j]["mse"])]


def test_ridge_dead_dimensions_and_shuffle_control():
    X, Y, _, _ = planted_linear(n=300)
    X[:, 4] = 7.0  # dead dimension
    m = RidgeMap().fit(X[:200], Y[:200])
    assert not bool(m.keep_[4]) and float(m.W_[4].abs().max()) == 0.0
    assert torch.isfinite(m.transform(X[200:])).all()
    for seed in range(3):
        r = shuffle_control(lambda: RidgeMap(), X[:200], Y[:200], X[200:], Y[200:], seed=seed)
        assert r["r2_vw"] <= 0.02


def test_ridge_n_below_d_overfits_train_not_val():
    X, Y = randn(40, 200, seed=5), randn(40, 10, seed=6)  # random targets
    m = RidgeMap(lambdas=[1e-8]).fit(X[:30], Y[:30])
    assert map_metrics(m.transform(X[:30]), Y[:30])["r2_vw"] > 0.999
    assert map_metrics(m.transform(X[30:]), Y[30:], Y_train_mean=Y[:30].mean(0))["r2_vw"] <= 0.0


# ---------------------------------------------------------------- 5. whitening
def test_whitening_identity_noop_and_range():
    X = randn(500, 8, seed=1) @ randn(8, 8, seed=2) + 4.0
    Z = Whitener(shrink=0.0).fit(X).transform(X)
    assert torch.allclose(Z.T @ Z / (500 - 1), torch.eye(8, dtype=F64), atol=1e-10)
    w1 = Whitener(shrink=1.0).fit(X)
    Xc = X - X.mean(0)
    mu = float(torch.trace(Xc.T @ Xc / 499)) / 8
    assert torch.allclose(w1.transform(X), Xc / math.sqrt(mu), atol=1e-10)  # isotropic: shape unchanged
    assert torch.allclose(w1.inverse_transform(w1.transform(X)), X, atol=1e-10)
    for bad in (-0.1, 1.5, float("nan"), "x"):
        with pytest.raises(ConfigError):
            check_shrinkage(bad)
        with pytest.raises(ConfigError):
            Whitener(shrink=bad)
        with pytest.raises(ConfigError):
            ScaledProcrustesMap(shrink=bad)


def test_whitening_n_below_d_matches_explicit_matrix():
    X = randn(15, 40, seed=3) @ randn(40, 40, seed=4)
    a = 0.3
    w = Whitener(shrink=a).fit(X)
    assert w.V.shape == (40, 14)  # never formed d x d
    Xc = X - X.mean(0)
    S_hat = shrink_covariance(Xc.T @ Xc / 14, a)
    ev, V = torch.linalg.eigh(S_hat)
    inv_half = V @ torch.diag(ev ** -0.5) @ V.T
    Xt = randn(5, 40, seed=5)
    assert torch.allclose(w.transform(Xt), (Xt - X.mean(0)) @ inv_half, atol=1e-9)
    assert torch.allclose(w.covariance(), S_hat, atol=1e-8)


# ---------------------------------------------------------------- 6. 1-D correlation rho
@pytest.mark.parametrize("rho", [0.3, 0.5, 0.8])
def test_1d_covariance_matching_vs_ridge(rho):
    n = 400
    u = randn(n, 2, seed=1)
    u = u - u.mean(0)
    q = torch.linalg.qr(u)[0] * math.sqrt(n - 1)  # centred, orthogonal, unit variance columns
    x, e = q[:, :1], q[:, 1:]
    y = rho * x + math.sqrt(1 - rho**2) * e
    X, Y = 2.0 * x + 1.0, 3.0 * y - 5.0
    sp = ScaledProcrustesMap(shrink=0.0).fit(X, Y)
    rg = RidgeMap(lambdas=[0.0]).fit(X, Y)
    assert map_metrics(sp.transform(X), Y)["r2_vw"] == pytest.approx(2 * rho - 1, abs=1e-10)
    assert map_metrics(rg.transform(X), Y)["r2_vw"] == pytest.approx(rho**2, abs=1e-10)
    lsq = ScaledProcrustesMap(shrink=0.0, scale="lstsq").fit(X, Y)  # least-squares scale = ridge in 1-D
    assert map_metrics(lsq.transform(X), Y)["r2_vw"] == pytest.approx(rho**2, abs=1e-10)


# ---------------------------------------------------------------- persistence, guards, metrics
def _all_maps(dx, dy):
    W_U = randn(50, dx, seed=12)
    maps = [RidgeMap(), RidgeMap(select="loo", lambdas=[0.1, 1.0]), ProcrustesMap(), PCAProcrustesMap(q=3),
            ScaledProcrustesMap(shrink=0.1)]
    if dx == dy:
        maps += [IdentityMap(), LogitSubspaceMap(W_U, q=4),
                 LogitSubspaceMap(W_U, q=4, inner="scaled_procrustes", complement="mean")]
    return maps


@pytest.mark.parametrize("dx,dy", [(10, 10), (8, 12)])
def test_save_load_round_trip(tmp_path, dx, dy):
    X = randn(60, dx, seed=1)
    Y = X @ randn(dx, dy, seed=2) + 0.3 * randn(60, dy, seed=3)
    Xv = randn(7, dx, seed=4).float()
    for i, m in enumerate(_all_maps(dx, dy)):
        m.fit(X[:40], Y[:40], X[40:], Y[40:])
        st, js = m.save(tmp_path / f"m{i}")
        cfg = json.load(open(js))
        assert cfg["cls"] == type(m).__name__ and cfg["dx"] == dx and cfg["dy"] == dy
        m2 = load_map(tmp_path / f"m{i}")
        assert type(m2) is type(m)
        out, out2 = m.transform(Xv), m2.transform(Xv)
        assert out.dtype == torch.float32 and out.shape == (7, dy)
        assert torch.equal(out, out2), type(m).__name__
    r = load_map(tmp_path / "m0")
    assert r.lambda_ == json.load(open(tmp_path / "m0.json"))["fitted"]["lambda_"]


def test_width_guards():
    X, Y = randn(30, 8, seed=1), randn(30, 12, seed=2)
    with pytest.raises(SiteError):
        IdentityMap().fit(X, Y)
    with pytest.raises(SiteError):
        LogitSubspaceMap(randn(40, 12, seed=3), q=4).fit(X, Y)
    with pytest.raises(ConfigError):
        load_map("/nonexistent/map")
    with pytest.raises(ConfigError):
        RidgeMap(select="cv")


def test_logit_subspace_only_changes_subspace():
    d, q = 16, 4
    W_U = randn(60, d, seed=1)
    m = LogitSubspaceMap(W_U, q=q, inner="procrustes")
    P = m.P_
    X = randn(200, d, seed=2)
    Y = X + 0.5 * (X @ P) @ P.T  # change only inside the logit subspace (scale 1.5 there)
    m.fit(X, Y)
    assert torch.allclose(m.transform(X), Y, atol=1e-9)


def test_map_metrics_known_values():
    Y = randn(50, 6, seed=1)
    perfect = map_metrics(Y.clone(), Y, X=Y + 3.0)
    for k in ("r2_vw", "r2_uniform", "r2_whitened", "cka_debiased", "cka_biased", "cos_mean", "cos_q10"):
        assert perfect[k] == pytest.approx(1.0, abs=1e-10), k
    ident = perfect["identity"]  # Y_hat = X = Y + 3: perfect shape, wrong mean
    assert ident["cka_debiased"] == pytest.approx(1.0, abs=1e-10) and ident["r2_vw"] < 0
    mean_pred = map_metrics(Y.mean(0).expand(50, -1), Y)
    assert mean_pred["r2_vw"] == pytest.approx(0.0, abs=1e-12)
    assert "identity" not in map_metrics(Y, Y, X=randn(50, 5, seed=2))
    assert rotation_drift(torch.eye(5)) == 0.0
    assert rotation_drift(-torch.eye(5)) == pytest.approx(2.0)
    with pytest.raises(ConfigError):
        rotation_drift(torch.zeros(3, 4))


# ---- Procrustes with few rows (N < d/2): explicit completion, no d x d SVD -------------------

def test_procrustes_few_rows_matches_full_svd_on_the_data_and_is_orthogonal():
    from mechdiff.analyses.maps import procrustes
    g = torch.Generator().manual_seed(3)
    N, d = 12, 64
    A = torch.randn(N, d, generator=g, dtype=torch.float64)
    A = A - A.mean(0)
    Q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    B = A @ Q + 0.01 * torch.randn(N, d, generator=g, dtype=torch.float64)
    B = B - B.mean(0)
    R, S = procrustes(A, B)                                   # few-rows path (2N <= d)
    U, S_full, Vh = torch.linalg.svd(A.T @ B, full_matrices=False)
    R_full = U @ Vh
    assert torch.allclose(R @ R.T, torch.eye(d, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(A @ R, A @ R_full, atol=1e-9)       # same map on the training span
    assert torch.allclose(S.sum(), S_full.sum(), atol=1e-9)


def test_procrustes_few_rows_leaves_the_shared_complement_unchanged():
    from mechdiff.analyses.maps import procrustes
    g = torch.Generator().manual_seed(4)
    N, d = 8, 48
    A = torch.randn(N, d, generator=g, dtype=torch.float64)
    A = A - A.mean(0)
    B = A.clone()
    B[:, :4] = B[:, :4] @ torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))[0]
    R, _ = procrustes(A, B)
    # a direction orthogonal to both row spaces passes through unchanged
    span = torch.linalg.qr(torch.cat([A, B]).T)[0]            # [d, <=2N]
    x = torch.randn(d, generator=g, dtype=torch.float64)
    x = x - span @ (span.T @ x)
    assert torch.allclose(x @ R, x, atol=1e-9)


# ---- Procrustes with N in (d/2, d): identity on the undetermined complement (issue 11) ------------

@pytest.mark.parametrize("cls", [ProcrustesMap, ScaledProcrustesMap])
def test_procrustes_base_equal_tuned_between_half_and_full_rows_is_the_identity(cls):
    """base == tuned with d/2 < N < d: the data fix R on an (N-1)-dim span only; the rest is completed
    with the identity, so R = I, held-out R^2 = 1 to fp precision, and d - (N-1) directions are
    reported as undetermined (the full SVD's arbitrary completion drifted here: issue 11)."""
    from mechdiff.analyses.map_metrics import map_metrics
    d, N = 48, 30
    X = randn(N, d, seed=11) * torch.linspace(0.2, 3.0, d, dtype=F64) + 1.0
    m = cls().fit(X, X.clone())
    assert torch.allclose(m.R_, torch.eye(d, dtype=F64), atol=1e-9), rotation_drift(m.R_)
    assert m.n_underdetermined_ == d - (N - 1)
    Xv = randn(20, d, seed=12) * 2.0 + 1.0                     # off the training span too
    assert map_metrics(m.transform(Xv), Xv)["r2_vw"] == pytest.approx(1.0, abs=1e-10)


def test_procrustes_planted_rotation_between_half_and_full_rows_is_recovered_on_the_span():
    """d/2 < N < d, Y = X Q with Q a rotation inside the data's span S (in a random basis P): R equals
    Q on S and the identity on S's complement, which the data leave undetermined."""
    from mechdiff.analyses.maps import procrustes
    d, N = 40, 28
    P = orth(d, 13)                                            # rows: a random basis of R^d
    C = torch.zeros(N, d, dtype=F64)
    C[:, :N - 1] = randn(N, N - 1, seed=14)
    A = C @ P
    A = A - A.mean(0)                                          # rank N - 1, span S = P[:N-1]
    G = torch.eye(d, dtype=F64)
    G[:6, :6] = orth(6, 15)                                    # a rotation of 6 directions inside S
    Q = P.T @ G @ P
    R, S = procrustes(A, A @ Q)
    assert torch.allclose(R, Q, atol=1e-9)                     # Q on S, the identity off S
    comp = P[N - 1:]                                           # [d - N + 1, d] the complement of S
    assert torch.allclose(comp @ R, comp, atol=1e-9)
    assert torch.allclose(R @ R.T, torch.eye(d, dtype=F64), atol=1e-10)
    assert ProcrustesMap().fit(A, A @ Q).n_underdetermined_ == d - (N - 1)


def test_procrustes_full_rank_reports_nothing_underdetermined_and_saves_the_count(tmp_path):
    X = randn(100, 16, seed=16)
    m = ProcrustesMap().fit(X, X @ orth(16, 17))
    assert m.n_underdetermined_ == 0
    m.save(tmp_path / "p")
    assert load_map(tmp_path / "p").n_underdetermined_ == 0
    few = ProcrustesMap().fit(X[:10], X[:10])
    assert few.n_underdetermined_ == 16 - 9
    assert json.loads((tmp_path / "p.json").read_text())["fitted"]["n_underdetermined_"] == 0


def test_r2_interval_matches_r2_vw_and_covers_it():
    """The test R2 with its topic-group interval is map_metrics' r2_vw (SST about the training mean)."""
    from mechdiff.analyses.map_metrics import map_metrics, r2_interval
    g = torch.Generator().manual_seed(0)
    Y = torch.randn(40, 8, generator=g, dtype=torch.float64)
    Yh = Y + 0.5 * torch.randn(40, 8, generator=g, dtype=torch.float64)
    mu = torch.randn(8, generator=g, dtype=torch.float64) * 0.1
    iv = r2_interval(Yh, Y, mu, torch.arange(40) // 4, n_boot=200)
    assert iv["estimate"] == pytest.approx(map_metrics(Yh, Y, Y_train_mean=mu)["r2_vw"], abs=1e-12)
    assert iv["ci_low"] < iv["estimate"] < iv["ci_high"]
    one = r2_interval(Yh, Y, mu, torch.zeros(40, dtype=torch.long))
    assert math.isnan(one["ci_low"]) and "one topic group" in one["note"]
