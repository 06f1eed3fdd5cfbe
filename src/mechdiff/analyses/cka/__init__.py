"""Linear CKA: debiased (unbiased HSIC, Song et al. 2012 eq. 5) as the primary number, biased beside it.

Conventions (MATH.md): X [N, dx], Y [N, dy] hold one row per position (prompt); dx may differ from dy.
Xc = X - column mean (computed in float64), rx = row squared norms of Xc.

    biased CKA   = ||Xc^T Yc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)
    n(n-3) HSIC_u = ||Xc^T Yc||^2 - n/(n-2) rx.ry + (sum rx)(sum ry)/((n-1)(n-2))     (feature form)
    debiased CKA = HSIC_u(X,Y) / sqrt(HSIC_u(X,X) HSIC_u(Y,Y));  HSIC_u(.,.) <= 0 on a self term -> NaN

Everything except :func:`cka_per_layer` computes in float64 on the input's device. HSIC_u needs
n > 3 (NumericsError otherwise); NaN/Inf inputs raise NumericsError.
"""

from mechdiff.analyses.cka.estimators import StreamingCKA, hsic_unbiased, linear_cka
from mechdiff.analyses.cka.estimators import _center64 as _center64
from mechdiff.analyses.cka.estimators import _hsic_u_gram as _hsic_u_gram
from mechdiff.analyses.cka.estimators import _zero_diag as _zero_diag
from mechdiff.analyses.cka.inference import cka_with_ci, has_duplicate_rows, shuffle_null
from mechdiff.analyses.cka.inference import _delete_unit_hsic as _delete_unit_hsic
from mechdiff.analyses.cka.layers import cka_matrix, cka_per_layer

__all__ = [
    "linear_cka", "hsic_unbiased", "StreamingCKA", "cka_matrix", "cka_per_layer", "shuffle_null",
    "has_duplicate_rows", "cka_with_ci",
]
