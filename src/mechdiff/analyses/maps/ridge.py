"""Ridge regression from base to fine-tune activations: :class:`RidgeMap` (thin-SVD solution with an
unpenalised intercept, lambda chosen on validation data or by exact leave-one-out)."""

from __future__ import annotations


import torch

from mechdiff.analyses.maps.base import F64, _Map, _out, _pair
from mechdiff.errors import ConfigError, DataError, NumericsError


class RidgeMap(_Map):
    """Ridge regression with unpenalised intercept, through the thin SVD Xc = U S V^T (MATH.md).

    W = V diag(s / (s^2 + lam)) U^T Yc; each lambda then costs O(r dy). Lambda grid: ``lambdas`` as
    absolute values, else s_max^2 * 10^linspace(-6, 2, 17). Selection: with ``select="val"`` and
    validation data given, the lambda with the smallest validation MSE; otherwise (or with
    ``select="loo"``) exact fast leave-one-out, e_i / (1 - h_i), h_i = 1/N + sum_k f_k U_ik^2,
    f = s^2 / (s^2 + lam). Columns of X whose train variance is below ``var_floor`` * max variance are
    dropped (their rows of W are 0).

    Fitted: W_ [dx, dy], mu_x_ [dx], mu_y_ [dy], keep_ [dx] bool, lambda_, score_kind_ ("val"/"loo"),
    scores_ (list of {lambda, r2, mse} per grid point; r2 against the scored set's own mean for val,
    against the train mean for loo)."""

    _tensors = ("W_", "mu_x_", "mu_y_", "keep_")
    _fitted = ("lambda_", "score_kind_", "scores_")

    def __init__(self, lambdas=None, var_floor: float = 1e-8, select: str = "val"):
        if select not in ("val", "loo"):
            raise ConfigError(f"select must be 'val' or 'loo', got {select!r}")
        if lambdas is not None:
            lambdas = [float(x) for x in (lambdas.tolist() if isinstance(lambdas, torch.Tensor) else lambdas)]
            if not lambdas or any(not (x >= 0) for x in lambdas):
                raise ConfigError("lambdas must be a non-empty list of non-negative numbers")
        self.lambdas = lambdas
        self.var_floor = float(var_floor)
        self.select = select

    def hparams(self):
        return dict(lambdas=self.lambdas, var_floor=self.var_floor, select=self.select)

    def fit(self, X, Y, X_val=None, Y_val=None) -> "RidgeMap":
        X, Y = _pair(X, Y, 3)
        N, dx = X.shape
        dy = Y.shape[1]
        self.dx_, self.dy_ = dx, dy
        mu_x, mu_y = X.mean(0), Y.mean(0)
        Xc, Yc = X - mu_x, Y - mu_y
        var = (Xc * Xc).mean(0)
        if float(var.max()) <= 0:
            raise NumericsError("X is constant on the training rows; nothing to regress on")
        keep = var > self.var_floor * var.max()
        U, s, Vh = torch.linalg.svd(Xc[:, keep], full_matrices=False)
        r = int((s > s[0] * max(N, int(keep.sum())) * torch.finfo(F64).eps).sum())
        U, s, Vh = U[:, :r], s[:r], Vh[:r]
        UtY = U.T @ Yc
        grid = self.lambdas if self.lambdas is not None else \
            (float(s[0]) ** 2 * torch.logspace(-6, 2, 17, dtype=F64)).tolist()
        use_val = self.select == "val" and X_val is not None
        if (X_val is None) != (Y_val is None):
            raise ConfigError("pass both X_val and Y_val, or neither")
        scores = []
        if use_val:
            Xv, Yv = _pair(X_val, Y_val, 1)
            if Xv.shape[1] != dx or Yv.shape[1] != dy:
                raise DataError("validation widths differ from training widths")
            XvV = (Xv.to(X.device) - mu_x)[:, keep] @ Vh.T
            Yv = Yv.to(X.device)
            Yvc = Yv - mu_y
            sst = float(((Yv - Yv.mean(0)) ** 2).sum())
            for lam in grid:
                E = Yvc - (XvV * (s / (s * s + lam))) @ UtY
                sse = float((E * E).sum())
                scores.append(dict(lam=lam, mse=sse / E.numel(), r2=1 - sse / sst if sst > 0 else float("nan")))
        else:
            U2 = U * U
            sst = float((Yc * Yc).sum())
            for lam in grid:
                f = s * s / (s * s + lam)
                h = 1.0 / N + U2 @ f
                E = (Yc - (U * f) @ UtY) / (1 - h)[:, None]
                press = float((E * E).sum())
                scores.append(dict(lam=lam, mse=press / E.numel(), r2=1 - press / sst if sst > 0 else float("nan")))
        best = min(range(len(grid)), key=lambda i: (scores[i]["mse"], -grid[i]))
        lam = grid[best]
        W = torch.zeros(dx, dy, dtype=F64, device=X.device)
        W[keep] = (Vh.T * (s / (s * s + lam))) @ UtY
        self.W_, self.mu_x_, self.mu_y_, self.keep_ = W, mu_x, mu_y, keep
        self.lambda_ = float(lam)
        self.score_kind_ = "val" if use_val else "loo"
        self.scores_ = [{"lambda": d["lam"], "r2": d["r2"], "mse": d["mse"]} for d in scores]
        self.fitted_ = True
        return self

    def transform(self, X) -> torch.Tensor:
        X64 = self._check_in(X)
        W = self.W_.to(X64.device)
        return _out((X64 - self.mu_x_.to(X64.device)) @ W + self.mu_y_.to(X64.device), X)
