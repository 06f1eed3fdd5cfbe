"""`run_study` / `mechdiff run`: stage order, the TOML run config (defaults overridden, unknown stages,
keys and wrong types refused before any model work), the effective config in the manifest, RUN.md
and run_config.toml, resume; one small real study on planted-cultural (RQ1 -> RQ2 -> RQ3 -> RQ4)."""
from __future__ import annotations

import dataclasses
import json

import pytest

from mechdiff.errors import ConfigError
from mechdiff.experiments.study import (config_toml, read_config, run_study, stage_command, stage_options,
                                        study_stages)


def test_stages_run_in_study_order_and_unknown_ones_are_refused():
    assert study_stages() == ["rq1", "mapped-patch", "steer", "heads"]
    assert study_stages("heads,rq1") == ["rq1", "heads"]
    assert study_stages(["steer", "maps", "rq1", "maps"]) == ["rq1", "maps", "steer"]
    with pytest.raises(ConfigError, match="unknown stage.*'rq9'.*registered stages: rq1, maps"):
        study_stages("rq1,rq9")
    with pytest.raises(ConfigError, match="empty"):
        study_stages(" , ")


def test_config_overrides_defaults_and_round_trips_through_toml(tmp_path):
    cfg = {"rq1": {"n_prompts": 64, "behaviour": False, "layers": [20, 22]},
           "mapped_patch": {"alpha": [0.5, "auto"], "sites": "resid_post,mlp_out"},
           "steer": {"k": [1, 2], "alphas": [1, 2.5], "transfer_lang": ""},
           "heads": {"min-shared-ratio": 1}}
    opts = stage_options(cfg, study_stages())
    assert opts["rq1"].n_prompts == 64 and opts["rq1"].behaviour is False and opts["rq1"].stride == 2
    mp = opts["mapped-patch"]
    assert mp.alphas == ["0.5", "auto"] and mp.sites == ["resid_post", "mlp_out"] and mp.n_train == 450
    assert opts["steer"].ks == [1, 2] and opts["steer"].alphas == [1.0, 2.5] and opts["steer"].transfer_lang is None
    assert opts["heads"].min_shared_ratio == 1.0 and isinstance(opts["heads"].min_shared_ratio, float)
    path = tmp_path / "c.toml"
    path.write_text(config_toml(opts, "a header"), encoding="utf-8")
    again = stage_options(read_config(path), study_stages())
    for name in opts:
        assert dataclasses.asdict(again[name]) == dataclasses.asdict(opts[name]), name
    argv = stage_command("rq1", opts["rq1"], ["--pair", "p"])
    assert argv == ["mechdiff", "rq1", "--pair", "p", "--n-prompts", "64", "--layers", "20,22", "--no-behaviour"]
    assert stage_command("steer", opts["steer"], [])[-4:] == ["--alpha", "1.0,2.5", "--transfer-lang", ""]


@pytest.mark.parametrize("text, match", [
    ("[rq9]\nx = 1\n", r"unknown stage \[rq9\]"),
    ("[rq1]\nnprompts = 3\n", "unknown option 'nprompts'.*n_prompts"),
    ("[rq1]\nn_prompts = '3'\n", r"\[rq1\] n_prompts: expected an integer"),
    ("[steer]\nk = [1, 'two']\n", r"k\[1\]: expected an integer"),
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
    (out / "manifest.json").write_text(json.dumps({"pair": {"name": "planted-cultural"}, "seeds": {"seed": 0},
                                                   "options": {"rq1": {**dataclasses.asdict(opts), "batch_size": 4}}}))
    with pytest.raises(ConfigError, match="n_prompts: 8 then, 9 now"):
        run_study("planted-cultural", {"rq1": {"n_prompts": 9}}, "rq1", out=out, models=("not", "loaded"))
    with pytest.raises(ConfigError, match="--seed 0, not 1"):
        run_study("planted-cultural", {"rq1": {"n_prompts": 8}}, "rq1", out=out, seed=1, models=("not", "loaded"))
    with pytest.raises(ConfigError, match="holds pair 'planted-cultural'"):
        run_study("planted-cognitive", None, "rq1", out=out, models=("not", "loaded"))


# ---------------------------------------------------------------- real weights
TINY = {"rq1": dict(n_prompts=8, layers=[1, 18, 20, 22, 24], behaviour=False, n_perm=4),
        "mapped-patch": dict(sites=["resid_post"], n_train=16, n_val=4, alphas=["1.0", "auto"], side_effects=False),
        "steer": dict(ks=[1, 2], alphas=[1.0], bases=["diff"], modes=["ablate"], n_fit=8, n_dev=2, n_test=4,
                      n_neutral=2, n_mc=0, transfer_lang=None),
        "heads": dict(n_prompts=4, ablations=["zero"], swaps=["own"], attribution="none", importance="zero", top_k=2,
                      layers=[22])}


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """`mechdiff run` on planted-cultural with a tiny TOML config (the CLI loads the models itself)."""
    from typer.testing import CliRunner

    from mechdiff.cli import app
    out = tmp_path_factory.mktemp("study") / "run"
    cfg = out.parent / "study.toml"
    cfg.write_text(config_toml(stage_options(TINY, study_stages())), encoding="utf-8")
    res = CliRunner().invoke(app, ["run", "--pair", "planted-cultural", "--config", str(cfg), "--out", str(out),
                                   "--batch-size", "8", "--device", "cpu"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    return out, cfg, " ".join(res.output.split())


@pytest.mark.real
def test_study_runs_every_stage_in_one_directory_on_rq1s_layers(tiny_study):
    path, _, printed = tiny_study
    assert "[RQ1] Divergence enters at layer 20" in printed and f"report: {path.resolve()}/report.html" in printed
    for f in ("rq1.json", "alpha_sweep.json", "rq3.json", "rq4.json", "report.html", "report.md", "RUN.md",
              "run_config.toml"):
        assert (path / f).is_file(), f
    rq1 = json.loads((path / "rq1.json").read_text())
    chosen = rq1["layers"]["chosen"]
    assert rq1["layers"]["entry"] == 20 and 20 in chosen
    assert json.loads((path / "rq2_prompts.json").read_text())["layers"] == chosen      # RQ2 on RQ1's layers
    assert json.loads((path / "rq3_prompts.json").read_text())["layers"] == chosen      # RQ3 too
    m = json.loads((path / "manifest.json").read_text())
    assert m["study"]["stages"] == ["rq1", "mapped-patch", "steer", "heads"]
    assert m["study"]["config"]["rq1"]["n_prompts"] == 8 and m["study"]["config"]["steer"]["ks"] == [1, 2]
    assert set(m["options"]) == {"rq1", "mapped-patch", "steer", "heads"}
    run_md = (path / "RUN.md").read_text()
    assert f"mechdiff run --pair planted-cultural --config {path.resolve() / 'run_config.toml'}" in run_md
    assert "--batch-size 8 --device cpu" in run_md and "n_prompts = 8" in run_md
    assert "--stages rq1,mapped-patch,steer,heads" in run_md and "mechdiff rq1 --pair planted-cultural" in run_md
    assert f"mechdiff report {path.resolve()}" in run_md
    html = (path / "report.html").read_text()
    assert "Divergence enters at layer 20" in html and "How to reproduce" in html and "run_config.toml" in html


@pytest.mark.real
def test_study_resumes_without_recomputing(tiny_study, planted_cultural, capsys):
    path, cfg, _ = tiny_study
    steps = json.loads((path / "steps.json").read_text())
    base, tuned, _ = planted_cultural
    run_study("planted-cultural", cfg, out=path, models=(base, tuned), batch_size=16)   # batch size is resume-safe
    assert json.loads((path / "steps.json").read_text()) == steps                       # no step ran again
    m = json.loads((path / "manifest.json").read_text())
    assert len(m["study"]["history"]) == 2
    assert "[4/4] heads done" in capsys.readouterr().err
    run_study("planted-cultural", cfg, "heads", out=path, models=(base, tuned))             # a subset
    assert json.loads((path / "steps.json").read_text()) == steps
    assert "--stages rq1,mapped-patch,steer,heads" in (path / "RUN.md").read_text()   # still the whole directory
    assert "[1/1] heads done" in capsys.readouterr().err
