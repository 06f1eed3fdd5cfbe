"""The stages of a study (see :mod:`mechdiff.experiments.stage`). Importing the package registers
the built-in stages: ``rq1``, ``maps``, ``mapped-patch``, and RQ3/RQ4 where present."""
from mechdiff.experiments.stage import STAGES, Stage, Study, get_stage, open_study, register, run_stage

from mechdiff.experiments import rq1 as rq1  # noqa: E402  (registers "rq1")
from mechdiff.experiments import rq2 as rq2  # noqa: E402  (registers "maps", "mapped-patch")
from mechdiff.experiments import rq4 as rq4  # noqa: E402  (registers "heads")
from mechdiff.experiments import rq3 as rq3  # noqa: E402  (registers "steer")
from mechdiff.experiments import tokens as tokens  # noqa: E402  (registers "tokens")

__all__ = ["STAGES", "Stage", "Study", "get_stage", "open_study", "register", "run_stage"]
