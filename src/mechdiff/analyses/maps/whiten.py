"""Covariance handling: Ledoit-Wolf-style shrinkage (``check_shrinkage``, ``shrink_covariance``), the
train-only shrinkage :class:`Whitener` (applied through eigenvectors, no d x d matrix when N < d)
and :class:`ScaledProcrustesMap` (whiten, rotate, scale, colour with the target's covariance)."""

from __future__ import annotations

import math

import torch

from mechdiff.analyses.maps.base import F64, _f64, _Map, _out, _pair
from mechdiff.analyses.maps.procrustes import n_underdetermined, procrustes
from mechdiff.errors import ConfigError, DataError, NumericsError


def check_shrinkage(a) -> float:
    """Validate a Ledoit-Wolf-style shrinkage weight a in [0, 1]."""
    try:
        a = float(a)
    except (TypeError, ValueError):
        raise ConfigError(f"shrinkage must be a number in [0, 1], got {a!r}") from None
    if not (0.0 <= a <= 1.0) or math.isnan(a):
        raise ConfigError(f"shrinkage must be in [0, 1], got {a}")
    return a


def shrink_covariance(S: torch.Tensor, a: float) -> torch.Tensor:
    """S_hat = (1 - a) S + a (tr S / d) I for a [d, d] covariance."""
    a = check_shrinkage(a)
    d = S.shape[0]
    return (1 - a) * S + a * (torch.trace(S) / d) * torch.eye(d, dtype=S.dtype, device=S.device)


class Whitener:
    """Shrinkage whitening with train-only mean and covariance.

    S = Xc^T Xc / (N - 1); S_hat = (1 - a) S + a (tr S / d) I; eigenvalues floored at
    ``eig_floor`` * largest. Stored as eigenvectors V [d, r] with eigenvalues lam [r] plus one
    eigenvalue c0 for the orthogonal complement (r = N - 1 or fewer when N <= d), so S_hat^(+-1/2) is
    applied without forming d x d when N < d. ``transform`` whitens, ``inverse_transform`` colours."""

    def __init__(self, shrink: float = 0.05, eig_floor: float = 1e-6):
        self.shrink = check_shrinkage(shrink)
        self.eig_floor = float(eig_floor)

    def fit(self, X) -> "Whitener":
        X = _f64(X, "X")
        N, d = X.shape
        if N < 2:
            raise DataError("whitening needs at least 2 rows")
        self.d = d
        self.mu = X.mean(0)
        Xc = X - self.mu
        if N - 1 >= d:
            ev, V = torch.linalg.eigh(Xc.T @ Xc / (N - 1))
        else:
            _, s, Vh = torch.linalg.svd(Xc, full_matrices=False)
            r = int((s > s[0] * max(N, d) * torch.finfo(F64).eps).sum())  # centred rank <= N - 1
            ev, V = s[:r] ** 2 / (N - 1), Vh[:r].T
        ev = ev.clamp_min(0)
        if ev.numel() == 0 or float(ev.max()) <= 0:
            raise NumericsError("X is constant on the training rows; cannot whiten")
        a = self.shrink
        m = float(ev.sum()) / d
        lam = (1 - a) * ev + a * m
        c0 = a * m
        floor = self.eig_floor * max(float(lam.max()), c0)
        if floor <= 0:
            raise NumericsError("X is constant on the training rows; cannot whiten")
        self.lam = lam.clamp_min(floor)
        self.c0 = max(c0, floor) if V.shape[1] < d else 0.0
        self.V = V
        return self

    def _power(self, Z: torch.Tensor, p: float) -> torch.Tensor:
        C = Z @ self.V
        out = (C * self.lam ** p) @ self.V.T
        if self.V.shape[1] < self.d:
            out = out + self.c0 ** p * (Z - C @ self.V.T)
        return out

    def transform(self, X) -> torch.Tensor:
        """(X - mu) S_hat^(-1/2), float64 [N, d]."""
        return self._power(_f64(X, "X") - self.mu, -0.5)

    def inverse_transform(self, Z) -> torch.Tensor:
        """Z S_hat^(1/2) + mu (colouring), float64 [N, d]."""
        return self._power(_f64(Z, "Z"), 0.5) + self.mu

    def covariance(self) -> torch.Tensor:
        """S_hat as a [d, d] matrix (for tests and small d only)."""
        return self._power(torch.eye(self.d, dtype=F64, device=self.V.device), 1.0)

    def state(self, prefix: str) -> dict:
        return {prefix + "V": self.V, prefix + "lam": self.lam, prefix + "mu": self.mu,
                prefix + "c0": torch.tensor([self.c0], dtype=F64)}

    @classmethod
    def from_state(cls, tensors: dict, prefix: str, shrink: float, eig_floor: float) -> "Whitener":
        w = cls(shrink, eig_floor)
        w.V, w.lam, w.mu = tensors[prefix + "V"], tensors[prefix + "lam"], tensors[prefix + "mu"]
        w.c0 = float(tensors[prefix + "c0"][0])
        w.d = w.V.shape[0]
        return w


class ScaledProcrustesMap(_Map):
    """Covariance matching: whiten X -> Procrustes rotate -> scale -> colour with Y's covariance.

    Y_hat = colour_y(c * whiten_x(x) R). ``scale``: "norm" (default) c = ||Zy||_F / ||Zx||_F, which
    keeps the output covariance equal to the target's (in 1-D with correlation rho this gives
    R^2 = 2 rho - 1, MATH.md); "lstsq" c = tr S / ||Zx||^2 (the least-squares Procrustes scale, which
    shrinks by the correlation and no longer matches covariances); "none" c = 1. This is not the
    least-squares map: report it beside ridge. ``n_underdetermined_``: directions of R the training
    rows leave open (completed with the identity, :func:`~mechdiff.analyses.maps.procrustes.procrustes`)."""

    _tensors = ("R_",)
    _fitted = ("scale_", "n_underdetermined_")

    def __init__(self, shrink: float = 0.05, eig_floor: float = 1e-6, scale: str = "norm"):
        self.shrink = check_shrinkage(shrink)
        self.eig_floor = float(eig_floor)
        if scale not in ("norm", "lstsq", "none"):
            raise ConfigError(f"scale must be 'norm', 'lstsq' or 'none', got {scale!r}")
        self.scale = scale

    def hparams(self):
        return dict(shrink=self.shrink, eig_floor=self.eig_floor, scale=self.scale)

    def fit(self, X, Y, X_val=None, Y_val=None) -> "ScaledProcrustesMap":
        X, Y = _pair(X, Y, 2)
        self.dx_, self.dy_ = X.shape[1], Y.shape[1]
        self.wx_ = Whitener(self.shrink, self.eig_floor).fit(X)
        self.wy_ = Whitener(self.shrink, self.eig_floor).fit(Y)
        Zx, Zy = self.wx_.transform(X), self.wy_.transform(Y)
        self.R_, S = procrustes(Zx, Zy)
        self.n_underdetermined_ = n_underdetermined(S, X.shape[0], self.dx_, self.dy_)
        nx, ny = float((Zx * Zx).sum()), float((Zy * Zy).sum())
        self.scale_ = {"norm": math.sqrt(ny / nx), "lstsq": float(S.sum()) / nx, "none": 1.0}[self.scale]
        self.fitted_ = True
        return self

    def transform(self, X) -> torch.Tensor:
        X64 = self._check_in(X)
        Z = self.scale_ * self.wx_.transform(X64) @ self.R_.to(X64.device)
        return _out(self.wy_.inverse_transform(Z), X)

    def state(self):
        cfg, t = super().state()
        t.update(self.wx_.state("wx."))
        t.update(self.wy_.state("wy."))
        cfg["shapes"] = {k: list(v.shape) for k, v in t.items()}
        return cfg, t

    @classmethod
    def from_state(cls, cfg, tensors):
        obj = super().from_state(cfg, tensors)
        obj.wx_ = Whitener.from_state(tensors, "wx.", obj.shrink, obj.eig_floor)
        obj.wy_ = Whitener.from_state(tensors, "wy.", obj.shrink, obj.eig_floor)
        return obj
