"""Quality metrics for a mapped activation set Y_hat [N, d] against the target Y [N, d] (MATH.md).

Always score on held-out rows. R^2 alone misleads for covariance-matching maps (2 rho - 1 vs rho^2),
so report R^2 (variance-weighted and uniform), whitened R^2, centred cosine, CKA(mapped, target), an
identity-map baseline and ||R - I|| together.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from mechdiff.errors import ConfigError, DataError, NumericsError
from mechdiff.analyses.cka import linear_cka
from mechdiff.analyses.maps import Whitener, _f64
from mechdiff.analyses.intervals import share_closed

__all__ = ["map_metrics", "rotation_drift", "shuffle_control"]

F64 = torch.float64


def _cka_or_nan(A, B, debiased):
    try:
        return linear_cka(A, B, debiased=debiased)
    except NumericsError:
        return float("nan")


def map_metrics(Y_hat, Y, *, X=None, Y_train_mean=None, Sigma_inv_half=None) -> dict:
    """Metrics of Y_hat [N, d] vs Y [N, d].

    Y_train_mean [d]: the baseline mean for R^2 and the centre for cosines (use the *training* mean
    for out-of-sample R^2; default: Y's own mean). Sigma_inv_half: [d, d] matrix (right-multiplied),
    a fitted :class:`Whitener`, or None (a Whitener with shrinkage 0.05 fitted on Y itself).

    Returns dict: n, mse, r2_vw (1 - SSE/SST over all entries), r2_uniform (mean per-dimension R^2
    over dimensions with variance), r2_whitened, cka_debiased, cka_biased, cos_mean, cos_median,
    cos_q10, cos_q90 (cosine of y_hat - m and y - m per row); with X [N, d] given and d matching, also
    "identity": the same metrics for Y_hat = X."""
    Yh, Yt = _f64(Y_hat, "Y_hat"), _f64(Y, "Y")
    if Yh.shape != Yt.shape:
        raise DataError(f"Y_hat {tuple(Yh.shape)} and Y {tuple(Yt.shape)} must have the same shape")
    Yt = Yt.to(Yh.device)
    n, d = Yt.shape
    m = Yt.mean(0) if Y_train_mean is None else torch.as_tensor(Y_train_mean).to(Yh.device, F64).reshape(-1)
    E = Yt - Yh
    D = Yt - m
    sse_j, sst_j = (E * E).sum(0), (D * D).sum(0)
    sst = float(sst_j.sum())
    r2_vw = 1 - float(sse_j.sum()) / sst if sst > 0 else float("nan")
    live = sst_j > 1e-12 * float(sst_j.max()) if sst > 0 else torch.zeros_like(sst_j, dtype=torch.bool)
    r2_uni = float((1 - sse_j[live] / sst_j[live]).mean()) if bool(live.any()) else float("nan")

    if Sigma_inv_half is None:
        wh = Whitener(0.05).fit(Yt) if n >= 2 else None
        white = (lambda Z: wh._power(Z, -0.5)) if wh is not None else None
    elif isinstance(Sigma_inv_half, Whitener):
        white = lambda Z: Sigma_inv_half._power(Z, -0.5)  # noqa: E731
    elif isinstance(Sigma_inv_half, torch.Tensor):
        A = Sigma_inv_half.to(Yh.device, F64)
        if A.shape != (d, d):
            raise DataError(f"Sigma_inv_half must be [{d}, {d}], got {tuple(A.shape)}")
        white = lambda Z: Z @ A  # noqa: E731
    else:
        raise ConfigError("Sigma_inv_half must be a [d, d] tensor, a Whitener, or None")
    if white is not None:
        we, wd = white(E), white(D)
        den = float((wd * wd).sum())
        r2_w = 1 - float((we * we).sum()) / den if den > 0 else float("nan")
    else:
        r2_w = float("nan")

    Hc = Yh - m
    cos = (Hc * D).sum(1) / (Hc.norm(dim=1) * D.norm(dim=1)).clamp_min(1e-300)
    q = torch.quantile(cos, torch.tensor([0.1, 0.5, 0.9], dtype=F64, device=cos.device))
    out = dict(n=n, mse=float((E * E).mean()), r2_vw=r2_vw, r2_uniform=r2_uni, r2_whitened=r2_w,
               cka_debiased=_cka_or_nan(Yh, Yt, True), cka_biased=_cka_or_nan(Yh, Yt, False),
               cos_mean=float(cos.mean()), cos_median=float(q[1]), cos_q10=float(q[0]), cos_q90=float(q[2]))
    if X is not None:
        Xt = _f64(X, "X")
        if Xt.shape == Yt.shape:
            out["identity"] = map_metrics(Xt, Yt, Y_train_mean=Y_train_mean, Sigma_inv_half=Sigma_inv_half)
    return out


def rotation_drift(R) -> float:
    """||R - I||_F / sqrt(d) for a square R [d, d] (0 for the identity; ~sqrt(2) for a random rotation)."""
    R = _f64(R, "R")
    if R.shape[0] != R.shape[1]:
        raise ConfigError(f"rotation_drift needs a square R, got {tuple(R.shape)} (widths differ)")
    d = R.shape[0]
    return float(torch.linalg.norm(R - torch.eye(d, dtype=F64, device=R.device))) / math.sqrt(d)


def shuffle_control(map_factory: Callable, X_tr, Y_tr, X_val, Y_val, seed: int = 0) -> dict:
    """Fit ``map_factory()`` on row-permuted training targets, score on the real validation pairs.

    No validation data is passed to fit (lambda chosen by LOO). Out-of-sample R^2 (against the
    training mean) must come out <= ~0; anything clearly above flags leakage or a broken pipeline."""
    Yt = _f64(Y_tr, "Y_tr")
    p = torch.randperm(Yt.shape[0], generator=torch.Generator().manual_seed(seed)).to(Yt.device)
    mp = map_factory()
    mp.fit(X_tr, Yt[p])
    out = map_metrics(mp.transform(X_val), Y_val, Y_train_mean=Yt.mean(0))
    out["control"] = "row-shuffled training targets"
    return out


def r2_interval(Y_hat, Y, Y_train_mean, groups=None, **kw) -> dict:
    """Variance-weighted R2 (``1 - sum SSE / sum SST`` about the training mean, as :func:`map_metrics`'
    ``r2_vw``) of rows ``Y_hat``, ``Y`` ``[n, d]`` with a cluster-bootstrap interval over ``groups``
    (``[n]``: each row's topic group; see :func:`mechdiff.analyses.intervals.share_closed`)."""
    Yh, Yt = _f64(Y_hat, "Y_hat"), _f64(Y, "Y")
    m = torch.as_tensor(Y_train_mean).to(Yt.device, F64).reshape(-1)
    sse, sst = (Yt - Yh).pow(2).sum(1), (Yt - m).pow(2).sum(1)
    if len(set(torch.as_tensor(groups if groups is not None else range(len(sse))).tolist())) < 2:
        return {"estimate": 1 - float(sse.sum() / sst.sum()), "ci_low": math.nan, "ci_high": math.nan,
                "note": "one topic group: no interval"}
    return share_closed(sse.cpu(), sst.cpu(), groups, **kw)
