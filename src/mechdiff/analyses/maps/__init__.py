"""Linear maps from base activations X [N, dx] to fine-tune activations Y [N, dy] (MATH.md "Maps").

Every estimator has the scikit-learn shape ``fit(X, Y, X_val=None, Y_val=None) -> self``,
``transform(X) -> Y_hat``, ``save(prefix)`` (``<prefix>.safetensors`` + ``<prefix>.json``) and is
reloaded with :func:`load_map`. Fitting runs in float64 on the input's device and only ever uses
training means/covariances; validation data are used for lambda selection (RidgeMap) and nothing else.
``transform`` returns the input's floating dtype.

Width support (dx != dy):
  IdentityMap            dx == dy only (SiteError otherwise)
  RidgeMap               any dx, dy
  ProcrustesMap          any: thin-SVD semi-orthogonal R [dx, dy] (rank < d, e.g. N < d: the
                         identity on the undetermined complement, see :func:`procrustes`;
                         ``n_underdetermined_`` counts those directions)
  PCAProcrustesMap       any: rotation between q-dim PCA spaces
  ScaledProcrustesMap    any (for dx < dy the coloured output has rank <= dx)
  LogitSubspaceMap       dx == dy == W_U.shape[1] only (both sides are projected with the tuned W_U)
"""

from __future__ import annotations

from mechdiff.analyses.maps.base import (F64 as F64, FORMAT_VERSION as FORMAT_VERSION, MAP_CLASSES,
                                         IdentityMap, _f64 as _f64, _Map as _Map, _out as _out,
                                         _pair as _pair, load_map)
from mechdiff.analyses.maps.logit import _INNER as _INNER
from mechdiff.analyses.maps.logit import LogitSubspaceMap
from mechdiff.analyses.maps.procrustes import (PCAProcrustesMap, ProcrustesMap,
                                               _procrustes_few_rows as _procrustes_few_rows,
                                               _svd as _svd, _top_right_singular as _top_right_singular,
                                               n_underdetermined, procrustes)
from mechdiff.analyses.maps.ridge import RidgeMap
from mechdiff.analyses.maps.whiten import ScaledProcrustesMap, Whitener, check_shrinkage, shrink_covariance

__all__ = [
    "IdentityMap", "RidgeMap", "ProcrustesMap", "PCAProcrustesMap", "ScaledProcrustesMap",
    "LogitSubspaceMap", "Whitener", "check_shrinkage", "shrink_covariance", "procrustes", "load_map",
    "MAP_CLASSES", "SOLVERS", "make_map", "n_underdetermined",
]

# The registry load_map reads (saved maps record their class name). It lives in base.py so that
# load_map and LogitSubspaceMap need no import of the map modules; it is filled here, once every
# map class exists.
MAP_CLASSES.update({c.__name__: c for c in (IdentityMap, RidgeMap, ProcrustesMap, PCAProcrustesMap,
                                            ScaledProcrustesMap, LogitSubspaceMap)})

# Solver names (the `--solvers` option) -> factory of a fresh, unfitted estimator. ``shrink`` is the
# whitening shrinkage (procrustes_scaled); ``W_U`` the tuned unembedding ``[V, d]`` (logit_subspace).
SOLVERS = {
    "ridge": lambda shrink, W_U: RidgeMap(select="val"),
    "procrustes": lambda shrink, W_U: ProcrustesMap(),
    "pca_procrustes": lambda shrink, W_U: PCAProcrustesMap(q=64),
    "procrustes_scaled": lambda shrink, W_U: ScaledProcrustesMap(shrink=shrink),
    "logit_subspace": lambda shrink, W_U: LogitSubspaceMap(W_U(), q=256),
}


def make_map(solver: str, shrink: float = 0.05, W_U=None) -> _Map:
    """A fresh, unfitted estimator for ``solver`` (a name in ``SOLVERS``). ``W_U``: a callable giving
    the tuned unembedding ``[V, d]``, called only by solvers that need it."""
    from mechdiff.errors import ConfigError
    if solver not in SOLVERS:
        raise ConfigError(f"unknown solver {solver!r}; choose from {', '.join(SOLVERS)}")
    return SOLVERS[solver](shrink, W_U)
