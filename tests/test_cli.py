"""The `mechdiff` command line (typer app) through typer.testing.CliRunner: listing, argument and
offline errors (exit code 2 with a one-line message, no run artifacts), report rewriting, the demo."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from mechdiff.cli import app

BUILTIN_PAIRS = ("cognitive", "cultural", "planted-cognitive", "planted-cultural", "smollm2-self",
                 "smollm2-vs-gemma3", "smollm2-math-lora", "smollm2-culture-lora",
                 *(f"smollm2-culture-l20-r{r}" for r in (1, 2, 4, 8)), "smollm2-math-attn-4")


def invoke(*args: str):
    """Run the CLI; returns (result, output with whitespace collapsed: rich wraps long lines)."""
    res = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "400", "HF_HUB_OFFLINE": "1",
                                                                "TRANSFORMERS_OFFLINE": "1"})
    return res, " ".join(res.output.split())


def test_pairs_lists_the_builtins():
    from mechdiff.pairs import list_pairs

    res, out = invoke("pairs")
    assert res.exit_code == 0, res.output
    assert sorted(list_pairs()) == sorted(BUILTIN_PAIRS)
    for name in BUILTIN_PAIRS:
        assert name in out, name
    # one row per pair (plain lines in a pipe): each pair's base spec is shown
    assert "meta-llama/Llama-3.1-8B-Instruct" in out and "gemma3-270m" in out
    lines = [l for l in res.output.splitlines() if l.strip()]
    assert len(lines) == len(BUILTIN_PAIRS) and all(l.split("\t")[0] in BUILTIN_PAIRS for l in lines)
    res, _ = invoke("pairs", "--json")
    assert sorted(r["name"] for r in json.loads(res.output)) == sorted(BUILTIN_PAIRS)


def test_uncached_hub_models_offline_exit_2_without_artifacts(tmp_path):
    out_dir = tmp_path / "run"
    res, out = invoke("rq1", "--base", "meta-llama/Llama-3.1-8B-Instruct", "--tuned", "some/other-model",
                      "--out", out_dir)
    assert res.exit_code == 2, res.output
    assert "error:" in out and "not in the local cache" in out
    assert "local copy" in out and "--base" in out  # says how to point at one
    assert "Traceback" not in res.output
    assert not out_dir.exists() or not any(out_dir.iterdir())
    assert not (out_dir / "rq1.json").exists()


def test_pair_and_base_together_is_an_error(tmp_path):
    res, out = invoke("rq1", "--pair", "x", "--base", "y", "--out", tmp_path / "run")
    assert res.exit_code == 2, res.output
    assert "either --pair or --base/--tuned, not both" in out
    assert not (tmp_path / "run").exists()


def test_no_pair_at_all_is_an_error():
    res, out = invoke("rq1")
    assert res.exit_code == 2 and "--pair" in out and "--base" in out


def test_report_on_a_missing_dir_is_an_error(tmp_path):
    res, out = invoke("report", tmp_path / "nope")
    assert res.exit_code == 2 and "not a run directory" in out


# ---------------------------------------------------------------- real weights
@pytest.fixture(scope="module")
def bad_layers(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_bad_layers")
    prompts = d / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "text": t}) + "\n" for i, t in enumerate(
        ["Tell me about the Kazakh steppe.", "What is kumis?", "Describe a yurt.", "Who was Abai?",
         "What is Nauryz?", "Name a Kazakh dish."])), encoding="utf-8")
    out = d / "run"
    res, text = invoke("rq1", "--pair", "planted-cultural", "--layers", "99", "--n-prompts", "6",
                       "--no-behaviour", "--prompts", prompts, "--out", out, "--device", "cpu")
    return res, text, out


@pytest.mark.real
def test_out_of_range_layer_exits_2_naming_the_valid_range(bad_layers):
    res, text, out = bad_layers
    assert res.exit_code == 2, res.output
    assert "99" in text and "0..29" in text
    assert "Traceback" not in res.output
    assert not (out / "rq1.json").exists() and not (out / "patch.json").exists()


@pytest.mark.real
def test_out_of_range_layer_fails_before_any_capture(bad_layers):
    _, _, out = bad_layers
    assert not (out / "tensors" / "rq1_states.safetensors").exists()
    assert not (out / "cka.json").exists()


@pytest.mark.real
def test_report_rewrites_the_report(planted_rq1):
    path = planted_rq1[0]
    for f in ("report.html", "report.md"):
        (path / f).unlink()
    res, out = invoke("report", path)
    assert res.exit_code == 0, res.output
    html = (path / "report.html").read_text(encoding="utf-8")
    md = (path / "report.md").read_text(encoding="utf-8")
    assert "RQ1" in html and "RQ1" in md
    assert "cka_curve" in html or "data:image/png;base64" in html  # figures embedded
    assert "report.html" in out


def test_run_with_a_bad_config_exits_2_before_model_work(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[rq1]\nn_promts = 8\n", encoding="utf-8")
    res, out = invoke("run", "--pair", "planted-cultural", "--config", cfg, "--out", tmp_path / "run")
    assert res.exit_code == 2 and "unknown option 'n_promts'" in out and "Traceback" not in res.output
    assert not (tmp_path / "run").exists()
    res, out = invoke("run", "--pair", "planted-cultural", "--stages", "rq1,nope", "--out", tmp_path / "run")
    assert res.exit_code == 2 and "unknown stage(s) 'nope'" in out


def test_compare_needs_run_directories(tmp_path):
    res, out = invoke("compare", tmp_path, tmp_path / "other")
    assert res.exit_code == 2 and "not a run directory" in out


@pytest.fixture(scope="module")
def demo_quick(tmp_path_factory):
    """`mechdiff demo --quick`: the whole study (run_study) on both planted pairs and the comparison; the
    suite's one run of the full pipeline (test_study.py checks the study without models)."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    res, text = invoke("demo", "--quick", "--out", out, "--device", "cpu")
    assert res.exit_code == 0, res.output
    return out, text


@pytest.mark.real
def test_demo_quick_runs_the_study_on_both_pairs_and_compares(demo_quick):
    out, text = demo_quick
    assert "demo done" in text
    for pair in ("planted-cultural", "planted-cognitive"):
        run = out / pair
        for f in ("report.html", "report.md", "RUN.md", "run_config.toml", "rq1.json", "alpha_sweep.json",
                  "rq3.json", "rq4.json", "tokens.json", "response.json", "manifest.json"):
            assert (run / f).is_file(), (pair, f)
        assert str((run / "report.html").resolve()) in text      # absolute report paths printed
        rq1 = json.loads((run / "rq1.json").read_text(encoding="utf-8"))
        chosen = rq1["layers"]["chosen"]
        assert json.loads((run / "rq2_prompts.json").read_text(encoding="utf-8"))["layers"] == chosen  # RQ1's layers
        assert json.loads((run / "rq3_prompts.json").read_text(encoding="utf-8"))["layers"] == chosen
        assert json.loads((run / "rq4.json").read_text(encoding="utf-8"))["layers"] == chosen
        html = (run / "report.html").read_text(encoding="utf-8")
        assert html.count("data:image/png;base64,") >= 8 and "Executive summary" in html
        assert "<script" not in html
    cult = json.loads((out / "planted-cultural" / "rq1.json").read_text(encoding="utf-8"))
    assert cult["layers"]["entry"] == 20                         # the first planted layer is found
    assert "Divergence enters at layer 20: patch KL" in text      # the one-screen summary
    assert str((out / "compare" / "compare.html").resolve()) in text
    table = {r["quantity"]: r for r in json.loads((out / "compare" / "compare.json").read_text())["table"]}
    assert table["divergence enters at layer"]["planted-cultural"] == 20
    heads = table["changed heads (share)"]
    assert heads["planted-cognitive"] > heads["planted-cultural"]      # the seeds' churn contrast


@pytest.mark.real
def test_study_records_its_config_and_the_commands_to_reproduce(demo_quick):
    from mechdiff.demo import demo_config
    run = (demo_quick[0] / "planted-cultural").resolve()
    m = json.loads((run / "manifest.json").read_text())
    assert m["study"]["stages"] == ["rq1", "mapped-patch", "steer", "heads", "tokens", "response"]
    assert set(m["options"]) == set(m["study"]["config"]) == {"rq1", "mapped-patch", "steer", "heads", "tokens", "response"}
    for stage, opts in demo_config("planted-cultural", quick=True).items():
        for k, v in opts.items():
            assert m["study"]["config"][stage][k] == v, (stage, k)
    run_md = (run / "RUN.md").read_text()
    assert (f"mechdiff run --pair planted-cultural --config {run / 'run_config.toml'} "
            f"--stages rq1,mapped-patch,steer,heads,tokens,response --out {run} --seed 0 --batch-size 32 --device cpu") in run_md
    assert f"mechdiff rq1 --pair planted-cultural --out {run}" in run_md and "--n-prompts 16" in run_md
    assert f"mechdiff report {run}" in run_md and "n_prompts = 16" in run_md      # the effective config inline
    assert "| heads |" in run_md                                                   # stage times


@pytest.mark.real
def test_the_recorded_command_resumes_without_recomputing(demo_quick):
    import shlex
    run = (demo_quick[0] / "planted-cultural").resolve()
    steps = json.loads((run / "steps.json").read_text())
    line = next(l for l in (run / "RUN.md").read_text().splitlines() if l.startswith("mechdiff run "))
    res, text = invoke(*shlex.split(line)[1:])
    assert res.exit_code == 0, res.output
    assert json.loads((run / "steps.json").read_text()) == steps                  # every step was skipped
    assert "Divergence enters at layer 20" in text and f"report: {run}/report.html" in text
    assert len(json.loads((run / "manifest.json").read_text())["study"]["history"]) == 2


def test_stage_commands_parse_list_options_from_their_defaults_and_flags():
    """Every list option of every stage command turns its CLI text into the field's list (defaults too)."""
    import dataclasses

    import mechdiff.cli as cli
    from mechdiff.experiments.stage import STAGES
    for stage in STAGES.values():
        for f, hint in cli._fields(stage.options):
            param, conv = cli._cli_param(f, hint)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if isinstance(default, list):
                assert conv(param.default.default) == [type(default[0])(x) for x in default] if default else True, \
                    (stage.name, f.name)
    _, conv = cli._cli_param(next(f for f, _ in cli._fields(STAGES["mapped-patch"].options) if f.name == "solvers"),
                             list[str])
    assert conv("ridge,procrustes") == ["ridge", "procrustes"]


@pytest.mark.parametrize("args, message", [
    (["rq1", "--layers", "abc"], "--layers: expected a comma list of integers"),
    (["rq1", "--layers", "1.5"], "--layers: expected a comma list of integers"),
    (["rq1", "--stride", "0"], "--stride must be >= 1"),
    (["rq1", "--n-prompts", "2"], "--n-prompts must be >= 4"),
    (["rq1", "--device", "cuda"], "no CUDA GPU is visible"),
    (["rq1", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["mapped-patch", "--mapped-alpha", "nan"], "--mapped-alpha: expected a comma list of finite numbers > 0"),
    (["mapped-patch", "--mapped-alpha=-1"], "finite numbers > 0 and/or 'auto' (e.g. 0.5,1.0,auto; in TOML [0.5, 1.0, \"auto\"]), got -1"),
    (["mapped-patch", "--alpha", "0.5"], "--alpha was renamed: use --mapped-alpha"),
    (["steer", "--alpha", "0.5"], "--alpha was renamed: use --steer-alpha"),
    (["mapped-patch", "--solvers", "magic"], "unknown solver"),
    (["maps", "--sites", "resid_middle"], "unknown site"),
])
def test_bad_options_fail_before_any_model_work_with_exit_2(tmp_path, args, message):
    """Each bad option is refused with one line on stderr, exit 2, before models load or files are written."""
    import torch
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out = tmp_path / "run"
    res, text = invoke(*args, "--pair", "planted-cultural", "--out", out)
    assert res.exit_code == 2, res.output
    assert message in text and "Traceback" not in res.output
    assert not out.exists()
