"""Row-shuffled nulls, duplicate-row guard, and debiased CKA with a CI and jackknife influence."""

from __future__ import annotations

import warnings

import torch

from mechdiff.errors import ConfigError, DataError
from mechdiff.analyses.resample import delete_group_jackknife, half_sample, unit_ids
from mechdiff.analyses.cka.estimators import (
    F64, _center64, _check_pair, _hsic_u_gram, _hsic_u_parts, _ratio, _sq_fro, _zero_diag,
)


# ----------------------------------------------------------------------------------------------
# nulls, guards, confidence intervals
# ----------------------------------------------------------------------------------------------
def _null_values(X, Y, n_perm: int, seed: int):
    """Row-shuffled null: (debiased values, biased values) with self terms computed once."""
    n = X.shape[0]
    Xc, Yc = _center64(X), _center64(Y)
    rx, ry = (Xc * Xc).sum(1), (Yc * Yc).sum(1)
    srx, sry = rx.sum(), ry.sum()
    use_gram = n < max(X.shape[1], Y.shape[1])
    if use_gram:
        K, L = Xc @ Xc.T, Yc @ Yc.T
        ixx, iyy = _sq_fro(K), _sq_fro(L)
    else:
        ixx, iyy = _sq_fro(Xc.T @ Xc), _sq_fro(Yc.T @ Yc)
    hxx = _hsic_u_parts(ixx, rx @ rx, srx, srx, n) if n > 3 else torch.tensor(float("nan"))
    hyy = _hsic_u_parts(iyy, ry @ ry, sry, sry, n) if n > 3 else torch.tensor(float("nan"))
    gen = torch.Generator().manual_seed(seed)
    deb, bia = [], []
    for _ in range(int(n_perm)):
        p = torch.randperm(n, generator=gen).to(X.device)
        ixy = (K * L[p][:, p]).sum() if use_gram else _sq_fro(Xc.T @ Yc[p])
        bia.append(_ratio(ixy, ixx, iyy))
        deb.append(_ratio(_hsic_u_parts(ixy, rx @ ry[p], srx, sry, n), hxx, hyy) if n > 3 else float("nan"))
    return deb, bia


def _mean_sd(v):
    t = torch.tensor(v, dtype=F64)
    t = t[torch.isfinite(t)]
    if t.numel() == 0:
        return float("nan"), float("nan")
    return float(t.mean()), (float(t.std()) if t.numel() > 1 else float("nan"))


def shuffle_null(X, Y, *, n_perm: int = 20, seed: int = 0, debiased: bool = True) -> dict:
    """CKA of X against row-shuffled Y, ``n_perm`` times. Returns dict(mean, sd, values)."""
    X, Y, _ = _check_pair(X, Y, debiased)
    deb, bia = _null_values(X, Y, n_perm, seed)
    v = deb if debiased else bia
    m, s = _mean_sd(v)
    return dict(mean=m, sd=s, values=v)


def has_duplicate_rows(X) -> bool:
    """True if any two rows of X [N, d] are exactly equal (e.g. a resample with replacement)."""
    X = X if isinstance(X, torch.Tensor) else torch.as_tensor(X)
    if X.ndim != 2:
        raise DataError(f"has_duplicate_rows needs [N, d], got {tuple(X.shape)}")
    return torch.unique(X, dim=0).shape[0] < X.shape[0]


def _delete_unit_hsic(Kt: torch.Tensor, Lt: torch.Tensor, uid: torch.Tensor, g: int) -> torch.Tensor:
    """Unbiased HSIC with each unit (group of rows) deleted, all units at once in O(N^2).

    Kt, Lt: zero-diagonal Grams [n, n] (float64); uid [n] unit ids in 0..g-1. Returns [g]
    (NaN where fewer than 4 rows remain). Exact: HSIC_u is translation invariant, so no re-centring."""
    n = Kt.shape[0]
    dev = Kt.device
    uid = uid.to(dev)
    col = uid[:, None]

    def gsum(v):
        return torch.zeros(g, dtype=F64, device=dev).index_add_(0, uid, v)

    def colsum(M):  # [n, g]: sum over columns in each unit
        return torch.zeros(n, g, dtype=F64, device=dev).index_add_(1, uid, M)

    P = Kt * Lt
    a, b = Kt.sum(1), Lt.sum(1)
    PG, KG, LG = colsum(P), colsum(Kt), colsum(Lt)
    T_R = P.sum() - 2 * gsum(P.sum(1)) + gsum(PG.gather(1, col).squeeze(1))
    A_R = a.sum() - 2 * gsum(a) + gsum(KG.gather(1, col).squeeze(1))
    B_R = b.sum() - 2 * gsum(b) + gsum(LG.gather(1, col).squeeze(1))
    kj, lj = KG.gather(1, col).squeeze(1), LG.gather(1, col).squeeze(1)
    D_R = (a @ b - LG.T @ a - KG.T @ b + (KG * LG).sum(0)) - gsum((a - kj) * (b - lj))
    m = n - torch.bincount(uid, minlength=g).to(F64)
    h = (T_R + A_R * B_R / ((m - 1) * (m - 2)) - 2 * D_R / (m - 2)) / (m * (m - 3))
    return h.masked_fill(m <= 3, float("nan"))


def cka_with_ci(X, Y, *, groups=None, method: str = "jackknife", n_half: int = 50, seed: int = 0,
                n_perm: int = 20, n_groups: int = 20, level: float = 0.95,
                max_n: int = 16384) -> dict:
    """Debiased CKA with a CI over prompts, biased CKA, row-shuffled nulls and outlier diagnostics.

    X [N, dx], Y [N, dy]; groups: optional [N] int prompt ids, so all positions of one prompt are
    resampled together. method: "jackknife" (delete-group, ``n_groups`` blocks of prompts) or
    "halfsample" (``n_half`` half-samples without replacement). Never bootstraps with replacement.
    Builds two N x N float64 Grams (N <= max_n).

    Returns dict: debiased, biased, se, ci_low, ci_high (for debiased), null_mean, null_sd (debiased
    row-shuffled null), biased_null_mean, biased_null_sd, n, n_units, duplicate_rows (bool; warns),
    influential_rows (3 rows, or group ids when groups is given, with the largest |jackknife
    influence| (n_units - 1)(theta - theta_{-u}) on the debiased estimate), influence (their values),
    method."""
    if method not in ("jackknife", "halfsample"):
        raise ConfigError(f"method must be 'jackknife' or 'halfsample' (never bootstrap), got {method!r}")
    X, Y, n = _check_pair(X, Y, True)
    if n > max_n:
        raise ConfigError(f"cka_with_ci forms N x N Grams; N={n} > max_n={max_n}. Subsample prompts "
                          "or raise max_n if memory allows.")
    dup = has_duplicate_rows(X) or has_duplicate_rows(Y)
    if dup:
        warnings.warn("duplicate rows in X or Y: debiased CKA is biased upward by repeated rows "
                      "(were positions sampled with replacement, or BOS/sink tokens kept?)", stacklevel=2)
    Xc, Yc = _center64(X), _center64(Y)
    K, L = Xc @ Xc.T, Yc @ Yc.T
    Kt, Lt = _zero_diag(K), _zero_diag(L)

    def stat(idx: torch.Tensor) -> float:
        idx = idx.to(Kt.device)
        if idx.numel() <= 3:
            return float("nan")
        k, l_ = Kt[idx][:, idx], Lt[idx][:, idx]
        return _ratio(_hsic_u_gram(k, l_), _hsic_u_gram(k, k), _hsic_u_gram(l_, l_))

    deb = stat(torch.arange(n))
    bia = _ratio((K * L).sum(), _sq_fro(K), _sq_fro(L))
    if method == "jackknife":
        rs = delete_group_jackknife(stat, n, groups, n_groups=n_groups, seed=seed, level=level)
    else:
        rs = half_sample(stat, n, groups, n_rep=n_half, seed=seed, level=level)
    nd, nb = _null_values(X, Y, n_perm, seed)
    null_mean, null_sd = _mean_sd(nd)
    bnull_mean, bnull_sd = _mean_sd(nb)

    uid, g = unit_ids(n, groups)
    hxy = _delete_unit_hsic(Kt, Lt, uid, g)
    hxx = _delete_unit_hsic(Kt, Kt, uid, g)
    hyy = _delete_unit_hsic(Lt, Lt, uid, g)
    loo = hxy / torch.sqrt(hxx.clamp_min(0) * hyy.clamp_min(0))
    loo = loo.masked_fill((hxx <= 0) | (hyy <= 0), float("nan"))
    infl = ((g - 1) * (deb - loo)).cpu()
    order = torch.argsort(torch.nan_to_num(infl.abs(), nan=-1.0), descending=True)[:3]
    if groups is not None:
        labels = torch.unique(torch.as_tensor(groups).reshape(-1).cpu())
        top = [labels[i].item() for i in order]
    else:
        top = order.tolist()
    return dict(debiased=deb, biased=bia, se=rs["se"], ci_low=rs["ci_low"], ci_high=rs["ci_high"],
                null_mean=null_mean, null_sd=null_sd, biased_null_mean=bnull_mean,
                biased_null_sd=bnull_sd, n=n, n_units=g, duplicate_rows=bool(dup),
                influential_rows=top, influence=[float(infl[i]) for i in order], method=method)
