"""Behavioural metrics (package; see generation.py until the split)."""

from mechdiff.analyses.behaviour.generation import *  # noqa: F403
from mechdiff.analyses.behaviour.generation import __all__ as __all__
from mechdiff.analyses.behaviour.generation import generate_ids as generate_ids
