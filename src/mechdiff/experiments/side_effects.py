"""Moved to :mod:`mechdiff.analyses.behaviour.side_effects` (a shared readout); kept for old imports."""
from mechdiff.analyses.behaviour.mc import LETTERS, mc_prompt, mc_scores  # noqa: F401
from mechdiff.analyses.behaviour.side_effects import _first_pass, mc_effects, refusal_rates  # noqa: F401
