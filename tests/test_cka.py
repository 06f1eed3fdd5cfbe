"""Known-answer tests for analyses/cka.py and analyses/resample.py (MATH.md tests 1-2)."""

import math

import pytest
import torch

from mechdiff.errors import NumericsError, ConfigError, DataError
from mechdiff.analyses.cka import (
    linear_cka, hsic_unbiased, StreamingCKA, cka_matrix, cka_per_layer, shuffle_null,
    has_duplicate_rows, cka_with_ci, _delete_unit_hsic, _zero_diag, _center64, _hsic_u_gram,
)
from mechdiff.analyses.resample import delete_group_jackknife, half_sample, t_quantile

F64 = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def related(n=60, dx=40, dy=25, noise=2.0, seed=0):
    g = gen(seed)
    X = torch.randn(n, dx, generator=g, dtype=F64) @ torch.randn(dx, dx, generator=g, dtype=F64)
    Y = X @ torch.randn(dx, dy, generator=g, dtype=F64) + noise * torch.randn(n, dy, generator=g, dtype=F64) * 5
    return X, Y


def orth(d, seed=1):
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen(seed), dtype=F64))
    return q * torch.sign(torch.diagonal(r))


# ---------------------------------------------------------------- 1. invariances / forms
@pytest.mark.parametrize("debiased", [True, False])
@pytest.mark.parametrize("shape", [(30, 50), (80, 20)])  # N < d (Gram) and N > d (feature)
def test_self_one_and_symmetric(debiased, shape):
    X, Y = related(shape[0], shape[1], 15)
    assert linear_cka(X, X, debiased=debiased) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(X, Y, debiased=debiased) == pytest.approx(linear_cka(Y, X, debiased=debiased), abs=1e-12)


@pytest.mark.parametrize("debiased", [True, False])
def test_invariant_to_scaled_rotation_and_shift_not_to_general_linear(debiased):
    X, Y = related(50, 30, 20)
    base = linear_cka(X, Y, debiased=debiased)
    Xt = 3.7 * X @ orth(30) + torch.randn(30, generator=gen(5), dtype=F64) * 100
    Yt = 0.02 * Y @ orth(20, 2) - 7.0
    assert abs(linear_cka(Xt, Yt, debiased=debiased) - base) < 1e-10
    A = torch.diag(torch.logspace(-2, 2, 30, dtype=F64)) @ torch.randn(30, 30, generator=gen(9), dtype=F64)
    assert abs(linear_cka(X @ A, Y, debiased=debiased) - base) > 1e-3


@pytest.mark.parametrize("debiased", [True, False])
@pytest.mark.parametrize("shape", [(12, 40, 30), (70, 8, 11)])
def test_gram_equals_feature(debiased, shape):
    X, Y = related(*shape)
    a = linear_cka(X, Y, debiased=debiased, form="gram")
    b = linear_cka(X, Y, debiased=debiased, form="feature")
    assert a == pytest.approx(b, abs=1e-12)
    assert not math.isnan(a)


def test_hsic_matches_song_eq5_bruteforce():
    X, Y = related(9, 4, 3)
    n = 9
    K, L = _zero_diag(X @ X.T), _zero_diag(Y @ Y.T)  # uncentred: HSIC_u is translation invariant
    one = torch.ones(n, dtype=F64)
    ref = (torch.trace(K @ L) + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2))
           - 2 * (one @ K @ L @ one) / (n - 2)) / (n * (n - 3))
    assert hsic_unbiased(X, Y) == pytest.approx(float(ref), rel=1e-10)
    assert hsic_unbiased(X + 1e3, Y) == pytest.approx(float(ref), rel=1e-8)


@pytest.mark.parametrize("debiased", [True, False])
def test_streaming_any_split_equals_full(debiased):
    X, Y = related(57, 12, 9)
    X = X + 50.0  # large common offset: reference-mean shift must handle it
    full = linear_cka(X, Y, debiased=debiased)
    for seed in range(3):
        cuts = sorted(torch.randint(1, 57, (4,), generator=gen(seed)).tolist())
        bounds = [0] + cuts + [57]
        s = StreamingCKA(12, 9, ref_mean_x=torch.zeros(12) if seed == 2 else None)
        for a, b in zip(bounds[:-1], bounds[1:]):
            s.update(X[a:b], Y[a:b])
        assert s.n == 57
        # a poor reference mean (zeros vs an offset of 50) costs a few digits of float64 cancellation
        assert s.result(debiased=debiased) == pytest.approx(full, abs=1e-12 if seed < 2 else 1e-9)


def test_permutations():
    X, Y = related(40, 15, 12)
    base = linear_cka(X, Y)
    p = torch.randperm(40, generator=gen(3))
    assert linear_cka(X[p], Y[p]) == pytest.approx(base, abs=1e-12)
    assert linear_cka(X[:, torch.randperm(15, generator=gen(4))], Y[:, torch.randperm(12, generator=gen(5))]) \
        == pytest.approx(base, abs=1e-12)
    assert abs(linear_cka(X[p], Y) - base) > 0.05  # a non-joint permutation does change it


# ---------------------------------------------------------------- 2. nulls and guards
def test_biased_null_formula_and_debiased_near_zero():
    n, d = 200, 800
    g = gen(11)
    X = torch.randn(n, d, generator=g, dtype=F64)
    Y = torch.randn(n, d, generator=g, dtype=F64)
    expected = 1 / math.sqrt((1 + n / d) * (1 + n / d))  # PR = d for isotropic data
    assert linear_cka(X, Y, debiased=False) == pytest.approx(expected, abs=0.02)
    r = cka_with_ci(X, Y, n_perm=5)
    assert r["biased"] == pytest.approx(expected, abs=0.02)
    assert abs(r["debiased"]) < 3 * r["se"]
    assert r["se"] > 0


def test_row_shuffled_null_is_near_zero():
    X, Y = related(120, 20, 20, noise=0.1)
    assert linear_cka(X, Y) > 0.5
    null = shuffle_null(X, Y, n_perm=20, seed=0)
    assert len(null["values"]) == 20
    assert abs(null["mean"]) < 0.05 and null["sd"] < 0.1
    nb = shuffle_null(X, Y, n_perm=5, debiased=False)
    assert nb["mean"] > null["mean"]  # biased null sits above 0


def test_small_n_nan_inf_and_degenerate():
    X, Y = related(3, 5, 5)
    with pytest.raises(NumericsError):
        linear_cka(X, Y)
    with pytest.raises(NumericsError):
        cka_matrix([X], [Y])
    with pytest.raises(NumericsError):
        cka_per_layer(X[None], Y[None])
    X, Y = related(20, 5, 5)
    X[3, 2] = float("nan")
    with pytest.raises(NumericsError, match="NaN/Inf"):
        linear_cka(X, Y)
    X[3, 2] = float("inf")
    with pytest.raises(NumericsError):
        linear_cka(X, Y, debiased=False)
    const = torch.ones(20, 5, dtype=F64)
    assert math.isnan(linear_cka(const, Y))
    assert math.isnan(linear_cka(const, Y, debiased=False))
    with pytest.raises(DataError):
        linear_cka(Y[:10], Y)
    with pytest.raises(ConfigError):
        linear_cka(Y, Y, form="bogus")


def test_duplicate_rows_detected_and_inflate_debiased():
    n, d = 60, 300
    g = gen(2)
    X = torch.randn(n, d, generator=g, dtype=F64)
    Y = torch.randn(n, d, generator=g, dtype=F64)
    assert not has_duplicate_rows(X)
    boot = torch.randint(0, n, (n,), generator=g)  # bootstrap with replacement: what must not be done
    Xb, Yb = X[boot], Y[boot]
    assert has_duplicate_rows(Xb)
    assert linear_cka(Xb, Yb) > linear_cka(X, Y) + 0.2
    with pytest.warns(UserWarning, match="duplicate"):
        r = cka_with_ci(Xb, Yb, n_perm=2)
    assert r["duplicate_rows"] is True


# ---------------------------------------------------------------- many layers
def test_cka_matrix_diagonal_and_pairs_and_fallback():
    g = gen(7)
    base = torch.randn(30, 16, generator=g, dtype=F64)
    Xs = [base @ torch.randn(16, 16, generator=g, dtype=F64) + 0.5 * torch.randn(30, 16, generator=g, dtype=F64)
          for _ in range(4)]
    Ys = [base @ torch.randn(16, 24, generator=g, dtype=F64) for _ in range(3)]
    for deb in (True, False):
        M = cka_matrix(Xs, Ys, debiased=deb)
        Mf = cka_matrix(torch.stack(Xs), torch.stack(Ys), debiased=deb, max_gram_bytes=0)
        assert M.shape == (4, 3)
        ref = torch.tensor([[linear_cka(x, y, debiased=deb) for y in Ys] for x in Xs], dtype=F64)
        assert torch.allclose(M, ref, atol=1e-10) and torch.allclose(Mf, ref, atol=1e-10)
        # same depth: diagonal equals per-layer CKA
        Xs3 = torch.stack([x[:, :16] for x in Xs[:3]])
        Ys3 = torch.stack(Ys)
        diag = torch.diagonal(cka_matrix(Xs3, Ys3, debiased=deb))
        assert torch.allclose(diag, cka_per_layer(Xs3, Ys3, debiased=deb), atol=1e-5)


@pytest.mark.parametrize("debiased", [True, False])
@pytest.mark.parametrize("shape", [(3, 400, 64, 48), (2, 50, 96, 80)])  # N > d and N < d
def test_cka_per_layer_float32_matches_float64(debiased, shape):
    L, n, dx, dy = shape
    g = gen(4)
    X = torch.randn(L, n, dx, generator=g) * 3 + 10.0  # offset tests the float64 mean
    Y = torch.einsum("lnd,de->lne", X, torch.randn(dx, dy, generator=g)) + 20 * torch.randn(L, n, dy, generator=g)
    out = cka_per_layer(X, Y, debiased=debiased, max_chunk_bytes=1)  # also exercises chunking
    ref = torch.tensor([linear_cka(X[l].double(), Y[l].double(), debiased=debiased) for l in range(L)], dtype=F64)
    assert out.dtype == F64 and out.shape == (L,)
    assert torch.allclose(out, ref, atol=1e-5)


# ---------------------------------------------------------------- resampling
def test_delete_unit_formula_matches_bruteforce():
    X, Y = related(26, 10, 7)
    Kt = _zero_diag(_center64(X) @ _center64(X).T)
    Lt = _zero_diag(_center64(Y) @ _center64(Y).T)
    for uid, g in [(torch.arange(26), 26), (torch.arange(26) % 7, 7)]:
        fast = _delete_unit_hsic(Kt, Lt, uid, g)
        brute = torch.stack([_hsic_u_gram(Kt[uid != u][:, uid != u], Lt[uid != u][:, uid != u]) for u in range(g)])
        assert torch.allclose(fast, brute, rtol=1e-9, atol=1e-9)


def test_jackknife_of_mean_is_classical_se_and_groups_move_together():
    x = torch.randn(30, generator=gen(0), dtype=F64)
    r = delete_group_jackknife(lambda idx: float(x[idx].mean()), 30, n_groups=30)
    assert r["se"] == pytest.approx(float(x.std() / math.sqrt(30)), rel=1e-10)
    assert r["ci_low"] < r["estimate"] < r["ci_high"]
    groups = torch.arange(30) // 3  # 10 prompts x 3 positions
    seen = []

    def fn(idx):
        kept = set(groups[idx].tolist())
        assert all((groups[idx] == k).sum() == 3 for k in kept)  # whole prompts only
        seen.append(len(kept))
        return float(x[idx].mean())

    r = delete_group_jackknife(fn, 30, groups=groups, n_groups=5)
    assert r["n_units"] == 10 and r["n_blocks"] == 5 and set(seen[1:]) == {8}
    h = half_sample(fn, 30, groups=groups, n_rep=10)
    assert h["n_units"] == 10 and set(seen[-10:]) == {5}


def test_half_sample_se_matches_sampling_sd():
    x = torch.randn(400, generator=gen(1), dtype=F64)
    h = half_sample(lambda idx: float(x[idx].mean()), 400, n_rep=400, seed=1)
    assert h["se"] == pytest.approx(float(x.std() / 20), rel=0.15)
    assert t_quantile(0.975, float("inf")) == pytest.approx(1.959964, abs=1e-5)
    assert t_quantile(0.975, 19) == pytest.approx(2.093024, abs=2e-3)


def test_cka_with_ci_groups_and_influential_outlier():
    X, Y = related(60, 20, 15)
    X[17] += 200 * torch.randn(20, generator=gen(8), dtype=F64)  # one massive-activation row
    groups = torch.arange(60) // 3 + 100
    r = cka_with_ci(X, Y, groups=groups, n_perm=4)
    assert r["influential_rows"][0] == 17 // 3 + 100 and r["n_units"] == 20
    assert r["ci_low"] <= r["debiased"] <= r["ci_high"]
    r2 = cka_with_ci(X, Y, method="halfsample", n_half=20, n_perm=4)
    assert r2["influential_rows"][0] == 17
    assert set(r2) >= {"debiased", "biased", "ci_low", "ci_high", "se", "null_mean", "null_sd",
                       "biased_null_mean", "n", "duplicate_rows", "influential_rows"}
    with pytest.raises(ConfigError):
        cka_with_ci(X, Y, method="bootstrap")
