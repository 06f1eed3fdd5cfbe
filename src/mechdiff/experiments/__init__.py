"""The stages of a study (see :mod:`mechdiff.experiments.stage`). The built-in stages (``rq1``,
``maps``, ``mapped-patch``, ``steer``, ``heads``) are the modules listed in
:mod:`mechdiff.experiments.registry`, registered when this package is imported."""
from mechdiff.experiments.stage import (STAGES, Stage, Study, get_stage, open_study, register, run_stage, study_order,
                                        unregister)
from mechdiff.experiments.registry import STAGE_MODULES  # noqa: E402  (registers the built-in stages)
from mechdiff.experiments.results import load_result, save_result

__all__ = ["STAGES", "STAGE_MODULES", "Stage", "Study", "get_stage", "open_study", "register", "unregister",
           "run_stage", "study_order", "load_result", "save_result"]
