"""Maps restricted to the tuned model's logit-relevant subspace: :class:`LogitSubspaceMap` projects
both sides onto the top right singular vectors of the tuned unembedding, fits an inner map there
(``_INNER``: ridge, procrustes, scaled_procrustes, identity) and handles the complement separately."""

from __future__ import annotations

from typing import Optional

import torch

from mechdiff.analyses.maps.base import F64, MAP_CLASSES, IdentityMap, _f64, _Map, _out, _pair
from mechdiff.analyses.maps.procrustes import ProcrustesMap
from mechdiff.analyses.maps.ridge import RidgeMap
from mechdiff.analyses.maps.whiten import ScaledProcrustesMap
from mechdiff.errors import ConfigError, SiteError


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
