"""Input checks, unbiased HSIC, linear CKA for one pair (Gram and feature forms) and StreamingCKA.

Conventions and formulas: see the package docstring (mechdiff.analyses.cka) and MATH.md.
"""

from __future__ import annotations

import math

import torch

from mechdiff.errors import ConfigError, DataError, NumericsError

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
