"""CKA over many layers: every layer pair (cka_matrix) and matched layers batched (cka_per_layer)."""

from __future__ import annotations

import torch

from mechdiff.errors import DataError, NumericsError
from mechdiff.analyses.cka.estimators import (
    F64, _center64, _check, _hsic_u_parts, _sq_fro, _zero_diag,
)


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
