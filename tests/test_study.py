"""`run_study` / `mechdiff run` without models: stage order, the TOML run config (defaults overridden,
unknown stages, keys and wrong types refused before any model work), the TOML and command-line forms of
the effective config, a changed config refused on resume before the models load."""
from __future__ import annotations

import dataclasses
import json

import pytest

from mechdiff.errors import ConfigError
from mechdiff.pairs import load_pair
from mechdiff.experiments.study import (config_toml, read_config, run_study, stage_command, stage_options,
                                        study_stages)


def test_stages_run_in_study_order_and_unknown_ones_are_refused():
    assert study_stages() == ["rq1", "mapped-patch", "steer", "heads", "tokens", "response"]
    assert study_stages("heads,rq1") == ["rq1", "heads"]
    assert study_stages(["steer", "maps", "rq1", "maps"]) == ["rq1", "maps", "steer"]
    with pytest.raises(ConfigError, match="unknown stage.*'rq9'.*registered stages: rq1, maps"):
        study_stages("rq1,rq9")
    with pytest.raises(ConfigError, match="empty"):
        study_stages(" , ")


def test_config_overrides_defaults_and_round_trips_through_toml(tmp_path):
    cfg = {"rq1": {"n_prompts": 64, "behaviour": False, "layers": [20, 22]},
           "mapped_patch": {"mapped-alpha": [0.5, "auto"], "sites": "resid_post,mlp_out"},
           "steer": {"k": [1, 2], "steer_alpha": [1, 2.5], "transfer_lang": ""},
           "heads": {"min-shared-ratio": 1}}
    opts = stage_options(cfg, study_stages())
    assert opts["rq1"].n_prompts == 64 and opts["rq1"].behaviour is False and opts["rq1"].stride == 2
    mp = opts["mapped-patch"]
    assert mp.mapped_alpha == ["0.5", "auto"] and mp.sites == ["resid_post", "mlp_out"] and mp.n_train == 450
    assert opts["steer"].ks == [1, 2] and opts["steer"].steer_alpha == [1.0, 2.5] and opts["steer"].transfer_lang is None
    assert opts["heads"].min_shared_ratio == 1.0 and isinstance(opts["heads"].min_shared_ratio, float)
    path = tmp_path / "c.toml"
    path.write_text(config_toml(opts, "a header"), encoding="utf-8")
    again = stage_options(read_config(path), study_stages())
    for name in opts:
        assert dataclasses.asdict(again[name]) == dataclasses.asdict(opts[name]), name
    argv = stage_command("rq1", opts["rq1"], ["--pair", "p"])
    assert argv == ["mechdiff", "rq1", "--pair", "p", "--n-prompts", "64", "--layers", "20,22", "--no-behaviour"]
    assert stage_command("steer", opts["steer"], [])[-4:] == ["--steer-alpha", "1.0,2.5", "--transfer-lang", ""]


@pytest.mark.parametrize("text, match", [
    ("[rq9]\nx = 1\n", r"unknown stage \[rq9\]"),
    ("[rq1]\nnprompts = 3\n", "unknown option 'nprompts'.*n_prompts"),
    ("[rq1]\nn_prompts = 'x'\n", r"\[rq1\] n_prompts: expected an integer"),
    ("[steer]\nk = [1, 'two']\n", r"\[steer\] k: expected a comma list of integers .*got 'two'"),
    ("n_prompts = 3\n", "must sit under a stage table"),
    ("[rq1\n", "invalid TOML"),
    ("[steer]\nmodes = ['fly']\n", "--modes"),                       # the stage's own check
])
def test_bad_configs_fail_before_any_model_work(tmp_path, text, match):
    cfg = tmp_path / "c.toml"
    cfg.write_text(text, encoding="utf-8")
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=match):
        run_study("planted-cultural", cfg, out=out, models=("not", "loaded"))
    assert not out.exists()


def test_a_changed_config_is_refused_before_models_load(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    opts = stage_options({"rq1": {"n_prompts": 8}}, ["rq1"])["rq1"]
    pair = load_pair("planted-cultural").to_dict()
    (out / "manifest.json").write_text(json.dumps({"pair": pair, "seeds": {"seed": 0},
                                                   "options": {"rq1": {**dataclasses.asdict(opts), "batch_size": 4}}}))
    with pytest.raises(ConfigError, match="options.rq1.n_prompts: 8 then, 9 now"):
        run_study("planted-cultural", {"rq1": {"n_prompts": 9}}, "rq1", out=out, models=("not", "loaded"))
    with pytest.raises(ConfigError, match="seeds.seed: 0 then, 1 now"):
        run_study("planted-cultural", {"rq1": {"n_prompts": 8}}, "rq1", out=out, seed=1, models=("not", "loaded"))
    with pytest.raises(ConfigError, match='pair.name: "planted-cultural" then, "planted-cognitive" now'):
        run_study("planted-cognitive", None, "rq1", out=out, models=("not", "loaded"))

# The real-weights study (every stage in one directory, RUN.md, manifest, resume through the RUN.md
# command) is checked on the demo's run in tests/test_cli.py, so the suite runs the pipeline once.
