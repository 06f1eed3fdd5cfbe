"""Linear CKA (package; see estimators.py until the split)."""

from mechdiff.analyses.cka.estimators import *  # noqa: F403
from mechdiff.analyses.cka.estimators import __all__ as __all__
from mechdiff.analyses.cka.estimators import _center64 as _center64
from mechdiff.analyses.cka.estimators import _delete_unit_hsic as _delete_unit_hsic
from mechdiff.analyses.cka.estimators import _hsic_u_gram as _hsic_u_gram
from mechdiff.analyses.cka.estimators import _zero_diag as _zero_diag
