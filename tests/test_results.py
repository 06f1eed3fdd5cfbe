"""Typed stage results (experiments/results.py) and the study order derived from ``requires``."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from mechdiff.artifacts import RunDir
from mechdiff.errors import ConfigError, DataError
from mechdiff.experiments import STAGES, Stage, register, study_order, unregister
from mechdiff.experiments.results import (ChosenLayer, MappedPatchResult, Rq1Result, SweepControl, SweepWinner,
                                          load_result, save_result)
from mechdiff.experiments.stage import opt


def test_a_result_round_trips_through_its_versioned_file(tmp_path):
    run = RunDir(tmp_path)
    assert load_result(run, Rq1Result) is None                      # RQ1 has not run here
    r = Rq1Result(entry=20, chosen=[ChosenLayer(20, "entry"), ChosenLayer(24, "steepest rise + peak")], control=5,
                  control_rule="lowest patch KL in the first half", basis="patch KL: ...",
                  readouts=["decision", "last"], measure="decision", floor=0.0, planted=[20, 22, 24])
    assert save_result(run, r) == "results/rq1.json"
    back = load_result(run, Rq1Result)
    assert back == r and isinstance(back.chosen[1], ChosenLayer) and back.chosen_layers == [20, 24]
    m = MappedPatchResult(winner=SweepWinner("ridge", 20, "resid_post", "auto", 0.5, 0.2, 60.0, 55.0),
                          controls=[SweepControl("bogus", 20, 20, "resid_post", 0.49, 2.0)],
                          stop_conditions_met=False, measure="decision")
    save_result(run, m)
    assert load_result(run, MappedPatchResult) == m


def test_another_version_or_type_is_refused_with_what_to_do(tmp_path):
    run = RunDir(tmp_path)
    save_result(run, Rq1Result(None, [], None, "", "", [], None))
    env = json.loads(run.file("results/rq1.json").read_text())
    run.write_json("results/rq1.json", {**env, "version": 0})
    with pytest.raises(DataError, match="version 0.*rerun stage 'rq1'"):
        load_result(run, Rq1Result)
    run.write_json("results/rq1.json", {**env, "type": "Other"})
    with pytest.raises(DataError, match="holds a Other, not a Rq1Result"):
        load_result(run, Rq1Result)


@dataclass
class _O:
    x: int = opt(0, "x")


def _stage(name, requires=()):
    return Stage(name=name, help="", options=_O, run=lambda s, o: None, summarise=lambda s, o: None,
                 requires=requires)


def test_study_order_is_topological_and_stable():
    assert study_order(["heads", "steer", "mapped-patch", "maps", "rq1"]) == ["rq1", "maps", "mapped-patch", "steer",
                                                                           "heads"]
    a, b = _stage("t-a", ("t-b",)), _stage("t-b", ("rq1",))
    for st in (a, b):
        register(st)
    try:
        assert study_order(["t-a", "heads", "t-b", "rq1"]) == ["rq1", "heads", "t-b", "t-a"]
        STAGES["t-b"] = _stage("t-b", ("t-a",))                       # a circle
        with pytest.raises(ConfigError, match="require each other in a circle"):
            study_order(["t-a", "t-b"])
    finally:
        unregister("t-a")
        unregister("t-b")
