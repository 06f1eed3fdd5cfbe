"""The built-in stages: one explicit list of stage modules, registered in this order.

Each module lists its stages in ``STAGES`` (a :class:`~mechdiff.experiments.stage.Stage` each);
study order is derived from their ``requires`` (:func:`~mechdiff.experiments.stage.study_order`:
topological, ties in this order). A new built-in stage is one module added here; a stage from
elsewhere (a plugin, a test) calls :func:`~mechdiff.experiments.stage.register` itself.
"""
from __future__ import annotations

from mechdiff.experiments import heads, maps, response, rq1, steer, tokens
from mechdiff.experiments.stage import STAGES, register

STAGE_MODULES = (rq1, maps, steer, heads, tokens, response)


def register_builtin() -> None:
    """Register every stage of :data:`STAGE_MODULES` (once; idempotent)."""
    for module in STAGE_MODULES:
        for stage in module.STAGES:
            if STAGES.get(stage.name) is not stage:
                register(stage)


register_builtin()
