"""One meaning per option: the command line and the TOML run config read a value through one parser
(the same bad value gets the same message), each strength has its own name and reaches the patching
engine as typed, and resuming a run directory follows one rule (mechdiff.manifest)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from mechdiff.errors import ConfigError
from test_cli import invoke


@pytest.mark.parametrize("stage, flag, key, text, value", [
    ("steer", "--steer-alpha", "steer_alpha", "1,x", [1, "x"]),
    ("steer", "--steer-alpha", "steer_alpha", "0.5,-2", [0.5, -2]),
    ("mapped-patch", "--mapped-alpha", "mapped_alpha", "0.5,nan,auto", [0.5, "nan", "auto"]),
    ("mapped-patch", "--mapped-alpha", "mapped_alpha", "0", 0),
    ("rq1", "--layers", "layers", "3,abc", [3, "abc"]),
    ("rq1", "--n-prompts", "n_prompts", "1.5", 1.5),
    ("heads", "--n-prompts", "n_prompts", "many", "many"),
])
def test_the_same_bad_value_gets_the_same_message_from_the_command_line_and_a_run_config(
        tmp_path, stage, flag, key, text, value):
    from mechdiff.experiments.study import run_study
    res, out = invoke(stage, flag, text, "--pair", "planted-cultural", "--out", tmp_path / "cli")
    assert res.exit_code == 2 and f"error: {flag}: expected " in out, out
    cli = out.split(f"error: {flag}: ", 1)[1]
    with pytest.raises(ConfigError) as e:
        run_study("planted-cultural", {stage: {key: value}}, stage, tmp_path / "toml", models=("not", "loaded"))
    where = f"run config [{stage}] {key}: "
    assert str(e.value).startswith(where), str(e.value)
    assert " ".join(str(e.value)[len(where):].split()) == cli
    assert not (tmp_path / "cli").exists() and not (tmp_path / "toml").exists()


@pytest.mark.parametrize("stage, old, new", [("steer", "alpha", "steer_alpha"), ("steer", "alphas", "steer_alpha"),
                                             ("mapped-patch", "alpha", "mapped_alpha"),
                                             ("mapped-patch", "alphas", "mapped_alpha")])
def test_former_strength_spellings_name_the_new_option(tmp_path, stage, old, new):
    from mechdiff.experiments.study import stage_options
    res, out = invoke(stage, f"--{old}", "1.0", "--pair", "planted-cultural", "--out", tmp_path / "run")
    assert res.exit_code == 2 and f"--{old} was renamed: use --{new.replace('_', '-')}" in out, out
    with pytest.raises(ConfigError, match=f"run config \\[{stage}\\] {old} was renamed: use {new} "):
        stage_options({stage: {old: [1.0]}}, [stage])


def test_one_declaration_reads_every_option_alike():
    """Every option of every stage: its default, written as command-line text and as a TOML value,
    reads back to the default through the one parser."""
    import dataclasses
    import typing

    from mechdiff.experiments.stage import STAGES, Common
    from mechdiff.experiments.study_config import _toml_value, _value_text
    from mechdiff.options import parse_value
    try:
        import tomllib
    except ImportError:                                # pragma: no cover (python < 3.11)
        import tomli as tomllib
    for cls in [Common] + [s.options for s in STAGES.values()]:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if default is None or isinstance(default, bool):
                continue
            text = _value_text(default)
            toml = tomllib.loads(f"x = {_toml_value(default)}")["x"]
            assert parse_value(f, hints[f.name], text) == default, (cls.__name__, f.name, text)
            assert parse_value(f, hints[f.name], toml) == default, (cls.__name__, f.name, toml)


# ---------------------------------------------------------------- the strengths reach the engine as typed
class _Stop(Exception):
    pass


@pytest.fixture
def engine_calls(monkeypatch):
    """Every ``PatchEngine.run`` of a stage: each variant's ``(mode, alpha)`` per patch. A stage that
    patches both models stops (``_Stop``) once both have run variants (the steer sweep)."""
    from mechdiff.patching import PatchEngine
    calls, original = SimpleNamespace(runs=[], models=set()), PatchEngine.run

    def run(self, variants, *a, **k):
        calls.runs.append([tuple((p.mode, round(float(p.alpha), 12)) for p in ([v] if hasattr(v, "mode") else v))
                           for v in variants])
        calls.models.add(id(self.model))
        if len(calls.models) == 2:
            raise _Stop
        return original(self, variants, *a, **k)
    monkeypatch.setattr(PatchEngine, "run", run)
    return calls


@pytest.fixture
def tiny(tmp_path, tiny_pair):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"id": f"q{i}", "text": "word " * (1 + i % 4) + f"item {i}",
                                             "topic": f"t{i % 6}"}) for i in range(30)), encoding="utf-8")
    return tiny_pair(tmp_path, "tiny", 1, prompts)


STEER = {"layers": [2], "control_layer": 1, "k": [1], "bases": ["diff"], "modes": ["steer", "ablate"], "n_fit": 8,
         "n_dev": 4, "n_test": 4, "n_neutral": 0, "n_mc": 0, "transfer_lang": ""}
MAPPED = {"layers": [2], "control_layer": 1, "sites": ["resid_post"], "solvers": ["procrustes"], "n_train": 12,
          "n_val": 8, "side_effects": False}


def _argv(table: dict) -> list[str]:
    out = []
    for k, v in table.items():
        flag = "--" + k.replace("_", "-")
        out += [flag if v else "--no-" + flag[2:]] if isinstance(v, bool) else \
            [flag, ",".join(map(str, v)) if isinstance(v, list) else str(v)]
    return out


@pytest.mark.parametrize("stage, table, text, value", [
    ("steer", STEER, "0.5,2", [0.5, 2]),
    ("mapped-patch", MAPPED, "0.5,auto", [0.5, "auto"]),
])
def test_the_command_line_and_toml_spellings_of_each_strength_make_the_same_engine_call(
        tmp_path, tiny, engine_calls, stage, table, text, value):
    from mechdiff.experiments.study import run_study
    key = "steer_alpha" if stage == "steer" else "mapped_alpha"
    res, out = invoke(stage, "--pair", tiny, "--out", tmp_path / "cli", "--device", "cpu", "--batch-size", "4",
                      *_argv(table), "--" + key.replace("_", "-"), text)
    assert res.exception is None or isinstance(res.exception, _Stop), out
    engine_calls.models.clear()
    try:
        run_study(str(tiny), {stage: {**table, key: value}}, stage, tmp_path / "toml", device="cpu", batch_size=4)
    except _Stop:
        pass
    half = len(engine_calls.runs) // 2
    assert half >= 1 and engine_calls.runs[:half] == engine_calls.runs[half:]
    patches = {p for call in engine_calls.runs[:half] for var in call for p in var}
    if stage == "steer":        # the strength as typed, its sign included: steer h + alpha (h U) U^T
        assert {("steer", 0.5), ("steer", 2.0)} <= patches and ("ablate", 0.5) in patches
        assert not any(m == "steer" and a < 0 for m, a in patches)
    else:                       # mu + alpha (M(x) - mu): 0.5 as typed, "auto" as the norm-matching value
        assert ("replace", 0.5) in patches and len({a for m, a in patches if m == "replace"}) >= 3


# ---------------------------------------------------------------- one resume rule
def test_resume_refusal_goes_through_the_one_rule(tmp_path):
    """manifest.manifest_differences is the rule: open_run (a stage), run_study (before the models load)
    and RunDir.check_manifest refuse the same differences with the same lines; a resume-safe option,
    another stage, or an option recorded on one side only never refuse."""
    import dataclasses

    from mechdiff.experiments.common import open_run
    from mechdiff.experiments.study import run_study
    from mechdiff.experiments.rq1 import RQ1Options
    from mechdiff.manifest import manifest_differences
    from mechdiff.pairs import load_pair

    old = {"pair": {"name": "a"}, "seeds": {"seed": 0},
           "options": {"rq1": {"n_prompts": 8, "batch_size": 4, "retired": 1}, "heads": {"k": 3}}}
    assert manifest_differences(old, {"pair": {"name": "a"}, "seeds": {"seed": 0},
                                      "options": {"rq1": {"n_prompts": 8, "batch_size": 64, "added": 2},
                                                  "steer": {"k": 1}}}) == []
    assert manifest_differences(old, {"pair": {"name": "b"}, "options": {"rq1": {"n_prompts": 9}}}) == [
        'pair.name: "a" then, "b" now', "options.rq1.n_prompts: 8 then, 9 now"]

    pair = load_pair("planted-cultural")
    info = {"spec": "smollm2-135m", "tokenizer_hash": "t1"}
    sides = {s: SimpleNamespace(info=dict(info)) for s in ("base", "tuned")}
    out = tmp_path / "run"
    opts = RQ1Options(n_prompts=8)
    recorded = {**dataclasses.asdict(opts), "batch_size": 4, "max_rows": None, "seed": 0, "prompts": None}
    open_run(out, "rq1", pair, sides, {"seed": 0}, recorded)
    open_run(out, "rq1", pair, sides, {"seed": 0}, {**recorded, "batch_size": 64})      # resume-safe
    line = "options.rq1.n_prompts: 8 then, 9 now"
    with pytest.raises(ConfigError, match=line) as by_stage:
        open_run(out, "rq1", pair, sides, {"seed": 0}, {**recorded, "n_prompts": 9})
    with pytest.raises(ConfigError, match=line) as by_study:
        run_study(pair, {"rq1": {"n_prompts": 9}}, "rq1", out=out, models=("not", "loaded"))
    assert str(by_stage.value) == str(by_study.value)
    with pytest.raises(ConfigError, match="seeds.seed: 0 then, 1 now"):
        run_study(pair, {"rq1": {"n_prompts": 8}}, "rq1", out=out, seed=1, models=("not", "loaded"))
    with pytest.raises(ConfigError, match="models.tuned.tokenizer_hash"):
        open_run(out, "rq1", pair, {**sides, "tuned": SimpleNamespace(info={**info, "tokenizer_hash": "t2"})},
                 {"seed": 0}, recorded)
