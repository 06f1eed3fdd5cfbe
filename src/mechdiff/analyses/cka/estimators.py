"""Linear CKA: debiased (unbiased HSIC, Song et al. 2012 eq. 5) as the primary number, biased beside it.

Conventions (MATH.md): X [N, dx], Y [N, dy] hold one row per position (prompt); dx may differ from dy.
Xc = X - column mean (computed in float64), rx = row squared norms of Xc.

    biased CKA   = ||Xc^T Yc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)
    n(n-3) HSIC_u = ||Xc^T Yc||^2 - n/(n-2) rx.ry + (sum rx)(sum ry)/((n-1)(n-2))     (feature form)
    debiased CKA = HSIC_u(X,Y) / sqrt(HSIC_u(X,X) HSIC_u(Y,Y));  HSIC_u(.,.) <= 0 on a self term -> NaN

Everything except :func:`cka_per_layer` computes in float64 on the input's device. HSIC_u needs
n > 3 (NumericsError otherwise); NaN/Inf inputs raise NumericsError.
"""

from __future__ import annotations

import math
import warnings

import torch

from mechdiff.errors import ConfigError, DataError, NumericsError
from mechdiff.analyses.resample import delete_group_jackknife, half_sample, unit_ids

__all__ = [
    "linear_cka", "hsic_unbiased", "StreamingCKA", "cka_matrix", "cka_per_layer", "shuffle_null",
    "has_duplicate_rows", "cka_with_ci",
]

F64 = torch.float64


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _check(X, name: str, ndim: int = 2) -> torch.Tensor:
    if not isinstance(X, torch.Tensor):
        X = torch.as_tensor(X)
    if X.ndim != ndim:
        raise DataError(f"{name} must be a {ndim}-D tensor, got shape {tuple(X.shape)}")
    if not X.is_floating_point():
        X = X.to(F64)
    if not bool(torch.isfinite(X).all()):
        bad = int((~torch.isfinite(X)).sum())
        raise NumericsError(f"{name} contains {bad} NaN/Inf values; drop or fix those rows "
                            "(e.g. overflowed fp16 activations) before computing CKA")
    return X


def _check_pair(X, Y, debiased: bool):
    X = _check(X, "X")
    Y = _check(Y, "Y")
    if X.shape[0] != Y.shape[0]:
        raise DataError(f"X and Y need the same number of rows (paired positions); got {X.shape[0]} "
                        f"and {Y.shape[0]}")
    n = X.shape[0]
    if debiased and n <= 3:
        raise NumericsError(f"debiased CKA (unbiased HSIC) is undefined for n <= 3 rows; got n={n}. "
                            "Use more prompts.")
    if n < 2:
        raise NumericsError("CKA needs at least 2 rows")
    return X, Y.to(X.device), n


def _center64(X: torch.Tensor) -> torch.Tensor:
    X = X.to(F64)
    return X - X.mean(0, keepdim=True)


def _ratio(hxy, hxx, hyy) -> float:
    hxy, hxx, hyy = float(hxy), float(hxx), float(hyy)
    if not (hxx > 0 and hyy > 0):
        return float("nan")
    return hxy / math.sqrt(hxx * hyy)


def _hsic_u_parts(ip, rxry, srx, sry, n):
    """n(n-3)-normalised unbiased HSIC from <K,L>, rx.ry, sum rx, sum ry (centred data)."""
    return (ip - n / (n - 2) * rxry + srx * sry / ((n - 1) * (n - 2))) / (n * (n - 3))


def _hsic_u_gram(Kt: torch.Tensor, Lt: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC (Song et al. eq. 5) from Gram matrices with zeroed diagonals [n, n]."""
    n = Kt.shape[0]
    a = Kt.sum(1)
    b = Lt.sum(1)
    tr = (Kt * Lt).sum()
    return (tr + a.sum() * b.sum() / ((n - 1) * (n - 2)) - 2.0 * (a @ b) / (n - 2)) / (n * (n - 3))


def _zero_diag(K: torch.Tensor) -> torch.Tensor:
    K = K.clone()
    K.diagonal().zero_()
    return K


def _sq_fro(A: torch.Tensor) -> torch.Tensor:
    return (A * A).sum()


# ----------------------------------------------------------------------------------------------
# single pair
# ----------------------------------------------------------------------------------------------
def hsic_unbiased(X, Y) -> float:
    """Unbiased HSIC with linear kernels (Song et al. 2012 eq. 5), X [N,dx], Y [N,dy], N > 3."""
    X, Y, n = _check_pair(X, Y, True)
    Xc, Yc = _center64(X), _center64(Y)
    if n < max(X.shape[1], Y.shape[1]):
        return float(_hsic_u_gram(_zero_diag(Xc @ Xc.T), _zero_diag(Yc @ Yc.T)))
    rx, ry = (Xc * Xc).sum(1), (Yc * Yc).sum(1)
    return float(_hsic_u_parts(_sq_fro(Xc.T @ Yc), rx @ ry, rx.sum(), ry.sum(), n))


def linear_cka(X, Y, *, debiased: bool = True, form: str = "auto") -> float:
    """Linear CKA between X [N, dx] and Y [N, dy] (float64).

    form: "gram" (N x N Grams, Song et al. eq. 5 directly), "feature" (dx x dy cross-covariance,
    MATH.md feature form) or "auto" (Gram when N < max(dx, dy)). Both forms give the same number.
    Returns NaN when a self term HSIC(X,X) or HSIC(Y,Y) is <= 0 (e.g. constant data)."""
    if form not in ("auto", "gram", "feature"):
        raise ConfigError(f"form must be 'auto', 'gram' or 'feature', got {form!r}")
    X, Y, n = _check_pair(X, Y, debiased)
    Xc, Yc = _center64(X), _center64(Y)
    use_gram = form == "gram" or (form == "auto" and n < max(X.shape[1], Y.shape[1]))
    if use_gram:
        K, L = Xc @ Xc.T, Yc @ Yc.T
        if debiased:
            Kt, Lt = _zero_diag(K), _zero_diag(L)
            return _ratio(_hsic_u_gram(Kt, Lt), _hsic_u_gram(Kt, Kt), _hsic_u_gram(Lt, Lt))
        return _ratio((K * L).sum(), _sq_fro(K), _sq_fro(L))
    ixy, ixx, iyy = _sq_fro(Xc.T @ Yc), _sq_fro(Xc.T @ Xc), _sq_fro(Yc.T @ Yc)
    if not debiased:
        return _ratio(ixy, ixx, iyy)
    rx, ry = (Xc * Xc).sum(1), (Yc * Yc).sum(1)
    srx, sry = rx.sum(), ry.sum()
    return _ratio(_hsic_u_parts(ixy, rx @ ry, srx, sry, n),
                  _hsic_u_parts(ixx, rx @ rx, srx, srx, n),
                  _hsic_u_parts(iyy, ry @ ry, sry, sry, n))


# ----------------------------------------------------------------------------------------------
# streaming
# ----------------------------------------------------------------------------------------------
class StreamingCKA:
    """Exact single-pass CKA for N too large to hold (MATH.md streaming formulas).

    Rows are shifted by a fixed reference mean in float64 (the first chunk's mean unless given);
    HSIC_u is translation invariant, so the shift only helps numerics. Accumulates C = X^T Y,
    X^T X, Y^T Y (memory O(dx^2 + dy^2 + dx dy) in float64), s_x, s_y, t_x, t_y, q, v_xy, v_yx.
    ``result()`` equals :func:`linear_cka` on the concatenated chunks up to float64 rounding."""

    def __init__(self, dx: int, dy: int, ref_mean_x=None, ref_mean_y=None, device=None):
        self.dx, self.dy = int(dx), int(dy)
        self.device = device
        self.ref_x = None if ref_mean_x is None else torch.as_tensor(ref_mean_x, dtype=F64).reshape(-1)
        self.ref_y = None if ref_mean_y is None else torch.as_tensor(ref_mean_y, dtype=F64).reshape(-1)
        self.n = 0
        self._init = False

    def _alloc(self, dev):
        z = lambda *s: torch.zeros(*s, dtype=F64, device=dev)  # noqa: E731
        self.C, self.Cxx, self.Cyy = z(self.dx, self.dy), z(self.dx, self.dx), z(self.dy, self.dy)
        self.sx, self.sy = z(self.dx), z(self.dy)
        self.vxy, self.vyx, self.vxx, self.vyy = z(self.dy), z(self.dx), z(self.dx), z(self.dy)
        self.tx = self.ty = self.qxy = self.qxx = self.qyy = torch.zeros((), dtype=F64, device=dev)
        self._init = True

    def update(self, X_chunk, Y_chunk) -> "StreamingCKA":
        """Add paired rows X_chunk [n, dx], Y_chunk [n, dy]."""
        X = _check(X_chunk, "X_chunk")
        Y = _check(Y_chunk, "Y_chunk")
        if X.shape[0] != Y.shape[0] or X.shape[1] != self.dx or Y.shape[1] != self.dy:
            raise DataError(f"chunk shapes {tuple(X.shape)}, {tuple(Y.shape)} do not fit "
                            f"dx={self.dx}, dy={self.dy} with equal row counts")
        if X.shape[0] == 0:
            return self
        dev = self.device or X.device
        X, Y = X.to(dev, F64), Y.to(dev, F64)
        if self.ref_x is None:
            self.ref_x = X.mean(0)
        if self.ref_y is None:
            self.ref_y = Y.mean(0)
        if not self._init:
            self._alloc(dev)
        X = X - self.ref_x.to(dev)
        Y = Y - self.ref_y.to(dev)
        rx, ry = (X * X).sum(1), (Y * Y).sum(1)
        self.C += X.T @ Y
        self.Cxx += X.T @ X
        self.Cyy += Y.T @ Y
        self.sx += X.sum(0)
        self.sy += Y.sum(0)
        self.tx = self.tx + rx.sum()
        self.ty = self.ty + ry.sum()
        self.qxy = self.qxy + rx @ ry
        self.qxx = self.qxx + rx @ rx
        self.qyy = self.qyy + ry @ ry
        self.vxy += rx @ Y
        self.vyx += ry @ X
        self.vxx += rx @ X
        self.vyy += ry @ Y
        self.n += X.shape[0]
        return self

    @staticmethod
    def _hsic(n, C, sx, sy, tx, ty, q, vxy, vyx):
        tr = _sq_fro(C) - q
        ok1, ol1 = sx @ sx - tx, sy @ sy - ty
        okl1 = sx @ C @ sy - vxy @ sy - vyx @ sx + q
        return (tr + ok1 * ol1 / ((n - 1) * (n - 2)) - 2.0 * okl1 / (n - 2)) / (n * (n - 3))

    def result(self, debiased: bool = True) -> float:
        n = self.n
        if debiased and n <= 3:
            raise NumericsError(f"debiased CKA is undefined for n <= 3 rows; streamed n={n}")
        if n < 2:
            raise NumericsError("CKA needs at least 2 rows")
        if debiased:
            hxy = self._hsic(n, self.C, self.sx, self.sy, self.tx, self.ty, self.qxy, self.vxy, self.vyx)
            hxx = self._hsic(n, self.Cxx, self.sx, self.sx, self.tx, self.tx, self.qxx, self.vxx, self.vxx)
            hyy = self._hsic(n, self.Cyy, self.sy, self.sy, self.ty, self.ty, self.qyy, self.vyy, self.vyy)
            return _ratio(hxy, hxx, hyy)
        Cc = self.C - torch.outer(self.sx, self.sy) / n
        Cxx = self.Cxx - torch.outer(self.sx, self.sx) / n
        Cyy = self.Cyy - torch.outer(self.sy, self.sy) / n
        return _ratio(_sq_fro(Cc), _sq_fro(Cxx), _sq_fro(Cyy))


# ----------------------------------------------------------------------------------------------
# many layers
# ----------------------------------------------------------------------------------------------
def _layers(Xs, name) -> list:
    if isinstance(Xs, torch.Tensor):
        if Xs.ndim != 3:
            raise DataError(f"{name} must be [L, N, d] or a list of [N, d]; got {tuple(Xs.shape)}")
        return list(Xs.unbind(0))
    return list(Xs)


def _unbiased_centered_gram(X: torch.Tensor) -> torch.Tensor:
    """Gram K' with <K'_x, K'_y> = n(n-3) HSIC_u(X, Y) (google-research center_gram(unbiased=True))."""
    Xc = _center64(X)
    K = _zero_diag(Xc @ Xc.T)
    n = K.shape[0]
    means = K.sum(0) / (n - 2)
    means = means - means.sum() / (2 * (n - 1))
    K = K - means[:, None] - means[None, :]
    K.diagonal().zero_()
    return K


def cka_matrix(Xs, Ys, *, debiased: bool = True, max_gram_bytes: int = 2**31) -> torch.Tensor:
    """CKA for every layer pair of two models of possibly different depth and width.

    Xs: list of [N, dx] (or [Lx, N, dx]); Ys: list of [N, dy] (or [Ly, N, dy]). Returns float64
    [Lx, Ly]. Each layer's (unbiased-)centred N x N Gram is built once in float64; all pairs then come
    from one matmul over the flattened Grams. If the Grams would exceed ``max_gram_bytes``, falls back to
    per-pair feature form with cached self terms (O(N dx dy) per pair)."""
    Xs, Ys = _layers(Xs, "Xs"), _layers(Ys, "Ys")
    Xs = [_check(x, f"Xs[{i}]") for i, x in enumerate(Xs)]
    Ys = [_check(y, f"Ys[{i}]") for i, y in enumerate(Ys)]
    if not Xs or not Ys:
        raise DataError("cka_matrix needs at least one layer on each side")
    n = Xs[0].shape[0]
    if any(t.shape[0] != n for t in Xs + Ys):
        raise DataError("all layers must have the same number of rows N")
    if debiased and n <= 3:
        raise NumericsError(f"debiased CKA is undefined for n <= 3 rows; got n={n}")
    dev = Xs[0].device
    if (len(Xs) + len(Ys)) * n * n * 8 <= max_gram_bytes:
        if debiased:
            gram = _unbiased_centered_gram
        else:
            def gram(X):
                Xc = _center64(X)
                return Xc @ Xc.T
        Gx = torch.stack([gram(x.to(dev)).reshape(-1) for x in Xs])
        Gy = torch.stack([gram(y.to(dev)).reshape(-1) for y in Ys])
        M = Gx @ Gy.T
        sx, sy = (Gx * Gx).sum(1), (Gy * Gy).sum(1)
    else:
        cx = [_center64(x.to(dev)) for x in Xs]
        cy = [_center64(y.to(dev)) for y in Ys]

        def self_term(c):
            r = (c * c).sum(1)
            ip = _sq_fro(c @ c.T) if c.shape[0] < c.shape[1] else _sq_fro(c.T @ c)
            return _hsic_u_parts(ip, r @ r, r.sum(), r.sum(), n) if debiased else ip, r

        stx = [self_term(c) for c in cx]
        sty = [self_term(c) for c in cy]
        sx = torch.stack([s for s, _ in stx])
        sy = torch.stack([s for s, _ in sty])
        M = torch.empty(len(cx), len(cy), dtype=F64, device=dev)
        for i, a in enumerate(cx):
            for j, b in enumerate(cy):
                ip = _sq_fro(a.T @ b)
                if debiased:
                    rx, ry = stx[i][1], sty[j][1]
                    ip = _hsic_u_parts(ip, rx @ ry, rx.sum(), ry.sum(), n)
                M[i, j] = ip
    den = torch.sqrt(sx.clamp_min(0)[:, None] * sy.clamp_min(0)[None, :])
    out = M / den
    bad = (sx <= 0)[:, None] | (sy <= 0)[None, :]
    return out.masked_fill(bad, float("nan"))


def cka_per_layer(X, Y, *, debiased: bool = True, max_chunk_bytes: int = 2**32) -> torch.Tensor:
    """CKA of X[l] vs Y[l] for every layer, batched. X [L, N, dx], Y [L, N, dy] -> float64 [L].

    Precision choice (for speed on GPU): column means are computed in float64 and subtracted, the
    centred data are cast to float32, the d x d (N >= d) or N x N (N < d) products run as float32
    batched matmuls (TF32 is not enabled here), and the squared Frobenius norms, row norms and the
    final HSIC combination are reduced in float64. Agrees with :func:`linear_cka` to ~1e-5 (tested).
    Layers are processed in chunks so temporaries stay under ``max_chunk_bytes``."""
    if not isinstance(X, torch.Tensor) or not isinstance(Y, torch.Tensor) or X.ndim != 3 or Y.ndim != 3:
        raise DataError("cka_per_layer needs X [L, N, dx] and Y [L, N, dy] tensors")
    L, n, dx = X.shape
    if Y.shape[0] != L or Y.shape[1] != n:
        raise DataError(f"X {tuple(X.shape)} and Y {tuple(Y.shape)} need the same L and N")
    dy = Y.shape[2]
    if debiased and n <= 3:
        raise NumericsError(f"debiased CKA is undefined for n <= 3 rows; got n={n}")
    Y = Y.to(X.device)
    gram = n < max(dx, dy)
    m2 = (3 * n * n) if gram else (dx * dy + dx * dx + dy * dy)
    per_layer = 4 * (n * (dx + dy) + 2 * m2)
    step = max(1, min(L, int(max_chunk_bytes // max(per_layer, 1))))
    out = torch.empty(L, dtype=F64, device=X.device)

    def sqsum(A):  # [l, a, b] float32 -> [l] float64, row sums in fp32 then fp64
        return (A * A).sum(-1).to(F64).sum(-1)

    for s in range(0, L, step):
        xb, yb = X[s:s + step], Y[s:s + step]
        if not bool(torch.isfinite(xb).all()) or not bool(torch.isfinite(yb).all()):
            raise NumericsError(f"NaN/Inf in layers {s}..{s + xb.shape[0] - 1}; fix the activations first")
        mx = xb.sum(1, keepdim=True, dtype=F64) / n
        my = yb.sum(1, keepdim=True, dtype=F64) / n
        xc = (xb.to(F64) - mx).to(torch.float32) if xb.dtype == F64 else xb.float() - mx.float()
        yc = (yb.to(F64) - my).to(torch.float32) if yb.dtype == F64 else yb.float() - my.float()
        if gram:
            K = torch.bmm(xc, xc.transpose(1, 2))
            Lg = torch.bmm(yc, yc.transpose(1, 2))
            ixy = (K * Lg).sum(-1).to(F64).sum(-1)
            ixx, iyy = sqsum(K), sqsum(Lg)
            del K, Lg
        else:
            ixy = sqsum(torch.bmm(xc.transpose(1, 2), yc))
            ixx = sqsum(torch.bmm(xc.transpose(1, 2), xc))
            iyy = sqsum(torch.bmm(yc.transpose(1, 2), yc))
        if debiased:
            rx = torch.linalg.vector_norm(xc, dim=-1).to(F64) ** 2
            ry = torch.linalg.vector_norm(yc, dim=-1).to(F64) ** 2
            srx, sry = rx.sum(-1), ry.sum(-1)
            hxy = _hsic_u_parts(ixy, (rx * ry).sum(-1), srx, sry, n)
            hxx = _hsic_u_parts(ixx, (rx * rx).sum(-1), srx, srx, n)
            hyy = _hsic_u_parts(iyy, (ry * ry).sum(-1), sry, sry, n)
        else:
            hxy, hxx, hyy = ixy, ixx, iyy
        res = hxy / torch.sqrt(hxx.clamp_min(0) * hyy.clamp_min(0))
        out[s:s + step] = res.masked_fill((hxx <= 0) | (hyy <= 0), float("nan"))
    return out


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
