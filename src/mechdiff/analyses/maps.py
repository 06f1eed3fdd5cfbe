"""Linear maps from base activations X [N, dx] to fine-tune activations Y [N, dy] (MATH.md "Maps").

Every estimator has the scikit-learn shape ``fit(X, Y, X_val=None, Y_val=None) -> self``,
``transform(X) -> Y_hat``, ``save(prefix)`` (``<prefix>.safetensors`` + ``<prefix>.json``) and is
reloaded with :func:`load_map`. Fitting runs in float64 on the input's device and only ever uses
training means/covariances; validation data are used for lambda selection (RidgeMap) and nothing else.
``transform`` returns the input's floating dtype.

Width support (dx != dy):
  IdentityMap            dx == dy only (SiteError otherwise)
  RidgeMap               any dx, dy
  ProcrustesMap          any: thin-SVD semi-orthogonal R [dx, dy] (N < d: explicit completion,
                         see :func:`procrustes`)
  PCAProcrustesMap       any: rotation between q-dim PCA spaces
  ScaledProcrustesMap    any (for dx < dy the coloured output has rank <= dx)
  LogitSubspaceMap       dx == dy == W_U.shape[1] only (both sides are projected with the tuned W_U)
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from mechdiff.errors import ConfigError, DataError, NumericsError, SiteError

__all__ = [
    "IdentityMap", "RidgeMap", "ProcrustesMap", "PCAProcrustesMap", "ScaledProcrustesMap",
    "LogitSubspaceMap", "Whitener", "check_shrinkage", "shrink_covariance", "procrustes", "load_map",
    "MAP_CLASSES",
]

F64 = torch.float64
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _f64(X, name: str) -> torch.Tensor:
    if not isinstance(X, torch.Tensor):
        X = torch.as_tensor(X)
    if X.ndim != 2:
        raise DataError(f"{name} must be [N, d], got shape {tuple(X.shape)}")
    if not bool(torch.isfinite(X).all()):
        raise NumericsError(f"{name} contains NaN/Inf; fix the activations before fitting a map")
    return X.to(F64)


def _pair(X, Y, min_rows: int = 2):
    X, Y = _f64(X, "X"), _f64(Y, "Y")
    if X.shape[0] != Y.shape[0]:
        raise DataError(f"X and Y need paired rows; got {X.shape[0]} and {Y.shape[0]}")
    if X.shape[0] < min_rows:
        raise DataError(f"need at least {min_rows} training rows, got {X.shape[0]}")
    return X, Y.to(X.device)


def _out(Yh: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return Yh.to(like.dtype) if like.is_floating_point() else Yh


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


def _svd(M: torch.Tensor, full_matrices: bool = False):
    """torch.linalg.svd; on CUDA with the QR-based ``gesvd`` driver (for a 4096^2 float64 matrix on an
    H200: 1.5 s against 7.3 s for the default and ``gesvdj``)."""
    if M.is_cuda:
        return torch.linalg.svd(M, full_matrices=full_matrices, driver="gesvd")
    return torch.linalg.svd(M, full_matrices=full_matrices)


def procrustes(A: torch.Tensor, B: torch.Tensor):
    """Orthogonal Procrustes for centred A [N, da], B [N, db]: R = U V^T from the thin SVD of A^T B.

    Returns (R [da, db] with R R^T = I (da <= db) or R^T R = I (da >= db), the nonzero-or-all singular
    values S of A^T B; callers use ``S.sum()``).

    Few rows (da == db = d, 2N <= d): A^T B has rank r <= N, so R is fixed by the data only on the
    r-dim subspace Sa = span(U_r) (to Sb = span(V_r)); the d x d SVD would fill the rest with
    whatever its solver returns. Here R is computed and completed explicitly, without a d x d SVD:
    with A^T = Qa Ra, B^T = Qb Rb (thin QR) and the SVD of the N x N core Ra Rb^T = Uc S Vc^T,
    U_r = Qa Uc_r, V_r = Qb Vc_r (the same U_r S V_r^T as the full SVD, so A R agrees with it), and

        R = U_r V_r^T + polar(P_a P_b),   P_a = I - U_r U_r^T, P_b = I - V_r V_r^T,

    where polar() is the orthogonal factor of P_a P_b as a map from Sa's complement to Sb's
    complement: of all isometries between the two complements, the one closest to the identity. In
    particular x R = x for every x orthogonal to both Sa and Sb (the shared complement), which suits
    a base and a fine-tune that share a basis. It is computed in span([U_r, V_r]) (<= 2r dims).
    R is exactly orthogonal. If a direction of one complement is orthogonal to the whole other
    complement (polar factor not unique) the full SVD is used instead."""
    N, da = A.shape
    db = B.shape[1]
    if da == db and 2 * N <= da:
        out = _procrustes_few_rows(A, B)
        if out is not None:
            return out
    U, S, Vh = _svd(A.T @ B, full_matrices=False)
    return U @ Vh, S


def _procrustes_few_rows(A: torch.Tensor, B: torch.Tensor):
    """The N < d path of :func:`procrustes` (see there); None when the completion is not unique."""
    N, d = A.shape
    eps = torch.finfo(A.dtype).eps
    Qa, Ra = torch.linalg.qr(A.T)                      # [d, N], [N, N]
    Qb, Rb = torch.linalg.qr(B.T)
    Uc, S, Vch = _svd(Ra @ Rb.T)                       # core, N x N
    I = torch.eye(d, dtype=A.dtype, device=A.device)
    if float(S[0]) <= 0:
        return I, S
    r = int((S > S[0] * max(N, d) * eps).sum())
    Ua, Vb = Qa @ Uc[:, :r], Qb @ Vch[:r].T            # [d, r] each, orthonormal columns
    # orthonormal basis Z of span([Ua, Vb]) from the 2r x 2r Gram (then re-orthonormalised)
    UV = torch.cat([Ua, Vb], 1)
    ev, W = torch.linalg.eigh(UV.T @ UV)
    keep = ev > ev.max() * 2 * r * eps * 10
    Z = torch.linalg.qr(UV @ (W[:, keep] / ev[keep].sqrt()))[0]   # [d, k]
    k = Z.shape[1]
    a, b = Z.T @ Ua, Z.T @ Vb                          # [k, r]
    Ik = torch.eye(k, dtype=A.dtype, device=A.device)
    M = (Ik - a @ a.T) @ (Ik - b @ b.T)
    Wm, sig, Ymh = _svd(M)
    m = k - r
    if m > 0 and float(sig[m - 1]) < 1e-6:
        return None
    P = Wm[:, :m] @ Ymh[:m]
    # Ua Vb^T + Z P Z^T + (I - Z Z^T), with Ua = Z a, Vb = Z b: one d x k x d product
    R = I + (Z @ (a @ b.T + P - Ik)) @ Z.T
    return R, S


def _top_right_singular(Xc: torch.Tensor, q: int) -> torch.Tensor:
    """Top-q right singular vectors [d, q] of Xc [N, d]."""
    N, d = Xc.shape
    if N >= d:
        evals, V = torch.linalg.eigh(Xc.T @ Xc)
        return V[:, torch.argsort(evals, descending=True)[:q]]
    _, _, Vh = torch.linalg.svd(Xc, full_matrices=False)
    return Vh[:q].T


# ----------------------------------------------------------------------------------------------
# base class + persistence
# ----------------------------------------------------------------------------------------------
class _Map:
    """Base class. Subclasses list tensor attributes in ``_tensors`` and JSON attributes in ``_fitted``."""

    _tensors: tuple = ()
    _fitted: tuple = ()

    def hparams(self) -> dict:
        return {}

    def _check_fitted(self):
        if not getattr(self, "fitted_", False):
            raise ConfigError(f"{type(self).__name__} is not fitted; call fit(X, Y) first")

    def _check_in(self, X) -> torch.Tensor:
        self._check_fitted()
        X64 = _f64(X, "X")
        if X64.shape[1] != self.dx_:
            raise SiteError(f"{type(self).__name__} was fitted on dx={self.dx_}, got X with {X64.shape[1]} columns")
        return X64

    def state(self) -> tuple[dict, dict]:
        """(JSON-able config, {name: tensor}) for saving."""
        tensors = {k: getattr(self, k) for k in self._tensors if getattr(self, k, None) is not None}
        fitted = {k: getattr(self, k) for k in self._fitted}
        cfg = dict(cls=type(self).__name__, format_version=FORMAT_VERSION, hparams=self.hparams(),
                   fitted=fitted, dx=self.dx_, dy=self.dy_,
                   shapes={k: list(v.shape) for k, v in tensors.items()})
        return cfg, tensors

    @classmethod
    def from_state(cls, cfg: dict, tensors: dict) -> "_Map":
        obj = cls(**cfg["hparams"])
        for k, v in cfg["fitted"].items():
            setattr(obj, k, v)
        for k in cls._tensors:
            setattr(obj, k, tensors.get(k))
        obj.dx_, obj.dy_ = cfg["dx"], cfg["dy"]
        obj.fitted_ = True
        return obj

    def save(self, path_prefix) -> tuple[str, str]:
        """Write ``<prefix>.safetensors`` and ``<prefix>.json`` (atomic renames). Returns both paths."""
        self._check_fitted()
        cfg, tensors = self.state()
        prefix = str(path_prefix)
        d = os.path.dirname(prefix)
        if d:
            os.makedirs(d, exist_ok=True)
        st, js = prefix + ".safetensors", prefix + ".json"
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, st + ".tmp")
        os.replace(st + ".tmp", st)
        with open(js + ".tmp", "w") as f:
            json.dump(cfg, f, indent=1)
        os.replace(js + ".tmp", js)
        return st, js

    def __repr__(self):
        hp = ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())
        return f"{type(self).__name__}({hp})"


def load_map(path_prefix, device=None) -> _Map:
    """Load a map written by ``save(path_prefix)``; tensors go to ``device`` (default CPU)."""
    prefix = str(path_prefix)
    try:
        with open(prefix + ".json") as f:
            cfg = json.load(f)
        tensors = load_file(prefix + ".safetensors", device=str(device) if device is not None else "cpu")
    except FileNotFoundError as e:
        raise ConfigError(f"no saved map at {prefix!r} (.json + .safetensors): {e}") from None
    name = cfg.get("cls")
    if name not in MAP_CLASSES:
        raise ConfigError(f"unknown map class {name!r} in {prefix}.json; known: {sorted(MAP_CLASSES)}")
    return MAP_CLASSES[name].from_state(cfg, tensors)


# ----------------------------------------------------------------------------------------------
# maps
# ----------------------------------------------------------------------------------------------
class IdentityMap(_Map):
    """Y_hat = X. Needs dx == dy (base and fine-tune share a basis)."""

    def fit(self, X, Y, X_val=None, Y_val=None) -> "IdentityMap":
        X, Y = _pair(X, Y, 1)
        if X.shape[1] != Y.shape[1]:
            raise SiteError(f"IdentityMap needs dx == dy, got {X.shape[1]} and {Y.shape[1]}; use "
                            "ProcrustesMap or RidgeMap for different widths")
        self.dx_ = self.dy_ = X.shape[1]
        self.fitted_ = True
        return self

    def transform(self, X) -> torch.Tensor:
        self._check_in(X)
        return X.clone()


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


class ProcrustesMap(_Map):
    """Orthogonal Procrustes: Y_hat = mu_y + c (x - mu_x) R.

    R = U V^T from the thin SVD of Xc^T Yc = U S V^T (semi-orthogonal [dx, dy] when widths differ);
    c = tr S / ||Xc||_F^2 if ``scale`` else 1. Fitted: R_, mu_x_, mu_y_, scale_."""

    _tensors = ("R_", "mu_x_", "mu_y_")
    _fitted = ("scale_",)

    def __init__(self, scale: bool = True):
        self.scale = bool(scale)

    def hparams(self):
        return dict(scale=self.scale)

    def fit(self, X, Y, X_val=None, Y_val=None) -> "ProcrustesMap":
        X, Y = _pair(X, Y, 2)
        self.dx_, self.dy_ = X.shape[1], Y.shape[1]
        self.mu_x_, self.mu_y_ = X.mean(0), Y.mean(0)
        Xc, Yc = X - self.mu_x_, Y - self.mu_y_
        self.R_, S = procrustes(Xc, Yc)
        nx = float((Xc * Xc).sum())
        if nx <= 0:
            raise NumericsError("X is constant on the training rows")
        self.scale_ = float(S.sum()) / nx if self.scale else 1.0
        self.fitted_ = True
        return self

    def transform(self, X) -> torch.Tensor:
        X64 = self._check_in(X)
        dev = X64.device
        return _out(self.scale_ * (X64 - self.mu_x_.to(dev)) @ self.R_.to(dev) + self.mu_y_.to(dev), X)


class PCAProcrustesMap(_Map):
    """PCA (train) to q components on each side, then scaled Procrustes between the q-dim scores.

    Y_hat = mu_y + ((x - mu_x) Px) c R Py^T with Px [dx, q], Py [dy, q], R [q, q]."""

    _tensors = ("Px_", "Py_", "R_", "mu_x_", "mu_y_")
    _fitted = ("scale_",)

    def __init__(self, q: int = 64, scale: bool = True):
        if int(q) < 1:
            raise ConfigError(f"q must be >= 1, got {q}")
        self.q = int(q)
        self.scale = bool(scale)

    def hparams(self):
        return dict(q=self.q, scale=self.scale)

    def fit(self, X, Y, X_val=None, Y_val=None) -> "PCAProcrustesMap":
        X, Y = _pair(X, Y, 2)
        N, dx = X.shape
        dy = Y.shape[1]
        if self.q > min(dx, dy, N - 1):
            raise ConfigError(f"q={self.q} exceeds min(dx, dy, N-1)={min(dx, dy, N - 1)}")
        self.dx_, self.dy_ = dx, dy
        self.mu_x_, self.mu_y_ = X.mean(0), Y.mean(0)
        Xc, Yc = X - self.mu_x_, Y - self.mu_y_
        self.Px_, self.Py_ = _top_right_singular(Xc, self.q), _top_right_singular(Yc, self.q)
        Zx, Zy = Xc @ self.Px_, Yc @ self.Py_
        self.R_, S = procrustes(Zx, Zy)
        self.scale_ = float(S.sum()) / float((Zx * Zx).sum()) if self.scale else 1.0
        self.fitted_ = True
        return self

    def transform(self, X) -> torch.Tensor:
        X64 = self._check_in(X)
        dev = X64.device
        Z = (X64 - self.mu_x_.to(dev)) @ self.Px_.to(dev)
        return _out(self.scale_ * (Z @ self.R_.to(dev)) @ self.Py_.to(dev).T + self.mu_y_.to(dev), X)


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
    least-squares map: report it beside ridge."""

    _tensors = ("R_",)
    _fitted = ("scale_",)

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


_INNER = {"ridge": lambda kw: RidgeMap(**kw), "procrustes": lambda kw: ProcrustesMap(**kw),
          "scaled_procrustes": lambda kw: ScaledProcrustesMap(**kw), "identity": lambda kw: IdentityMap()}


class LogitSubspaceMap(_Map):
    """Fit a map only inside the tuned model's logit-relevant subspace.

    P [d, q] = top-q right singular vectors of W_U [V, d_tuned] (the tuned unembedding). Both sides
    are projected, Zx = X P, Zy = Y P, the ``inner`` map ("ridge", "procrustes", "scaled_procrustes",
    "identity") is fitted on (Zx, Zy) and mapped back with P^T. The orthogonal complement is handled
    by ``complement``: "identity" (default; x's own complement, base and tuned share a basis),
    "mean" (the train mean of Y's complement) or "zero". Needs dx == dy == d_tuned."""

    _tensors = ("P_", "mu_perp_")

    def __init__(self, W_U=None, q: int = 256, inner: str = "ridge", complement: str = "identity",
                 inner_kwargs: Optional[dict] = None):
        if inner not in _INNER:
            raise ConfigError(f"inner must be one of {sorted(_INNER)}, got {inner!r}")
        if complement not in ("identity", "mean", "zero"):
            raise ConfigError(f"complement must be 'identity', 'mean' or 'zero', got {complement!r}")
        self.q, self.inner, self.complement = int(q), inner, complement
        self.inner_kwargs = dict(inner_kwargs or {})
        self.P_ = None
        if W_U is not None:
            W = _f64(W_U, "W_U")
            if self.q < 1 or self.q > min(W.shape):
                raise ConfigError(f"q={self.q} must be in [1, min(W_U.shape)={min(W.shape)}]")
            evals, V = torch.linalg.eigh(W.T @ W)
            self.P_ = V[:, torch.argsort(evals, descending=True)[:self.q]].contiguous()

    def hparams(self):
        return dict(q=self.q, inner=self.inner, complement=self.complement, inner_kwargs=self.inner_kwargs)

    def fit(self, X, Y, X_val=None, Y_val=None) -> "LogitSubspaceMap":
        if self.P_ is None:
            raise ConfigError("LogitSubspaceMap needs W_U (the tuned unembedding [V, d]) at construction")
        X, Y = _pair(X, Y, 2)
        d = self.P_.shape[0]
        if X.shape[1] != d or Y.shape[1] != d:
            raise SiteError(f"LogitSubspaceMap needs dx == dy == W_U.shape[1] = {d}; got {X.shape[1]}, "
                            f"{Y.shape[1]}. Use RidgeMap/ProcrustesMap for different widths.")
        self.dx_ = self.dy_ = d
        P = self.P_ = self.P_.to(X.device)
        self.inner_map_ = _INNER[self.inner](self.inner_kwargs)
        Zv = None if X_val is None else (_f64(X_val, "X_val").to(X.device) @ P,
                                          _f64(Y_val, "Y_val").to(X.device) @ P)
        self.inner_map_.fit(X @ P, Y @ P, *(Zv or (None, None)))
        mu_y = Y.mean(0)
        self.mu_perp_ = mu_y - (mu_y @ P) @ P.T
        self.fitted_ = True
        return self

    def transform(self, X) -> torch.Tensor:
        X64 = self._check_in(X)
        P = self.P_.to(X64.device)
        Zx = X64 @ P
        out = self.inner_map_.transform(Zx).to(F64) @ P.T
        if self.complement == "identity":
            out = out + X64 - Zx @ P.T
        elif self.complement == "mean":
            out = out + self.mu_perp_.to(X64.device)
        return _out(out, X)

    def state(self):
        cfg, t = super().state()
        icfg, it = self.inner_map_.state()
        cfg["inner_cfg"] = icfg
        t.update({"inner." + k: v for k, v in it.items()})
        cfg["shapes"] = {k: list(v.shape) for k, v in t.items()}
        return cfg, t

    @classmethod
    def from_state(cls, cfg, tensors):
        obj = cls(**cfg["hparams"])
        obj.P_, obj.mu_perp_ = tensors["P_"], tensors["mu_perp_"]
        obj.dx_, obj.dy_ = cfg["dx"], cfg["dy"]
        icfg = cfg["inner_cfg"]
        inner_t = {k[len("inner."):]: v for k, v in tensors.items() if k.startswith("inner.")}
        obj.inner_map_ = MAP_CLASSES[icfg["cls"]].from_state(icfg, inner_t)
        obj.fitted_ = True
        return obj


MAP_CLASSES = {c.__name__: c for c in (IdentityMap, RidgeMap, ProcrustesMap, PCAProcrustesMap,
                                        ScaledProcrustesMap, LogitSubspaceMap)}
