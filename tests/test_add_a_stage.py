"""A new analysis is one module and one test (docs/ADD_A_STAGE.md): a toy stage defined and registered
here alone (no file outside tests/ knows it) needs ``rq1``, reads RQ1's typed result, reports the
number of chosen layers with a sentence and a figure, and runs inside a study after rq1; its sentence
and its figure are in report.html."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mechdiff.artifacts import RunDir
from mechdiff.experiments import Stage, load_result, register, unregister
from mechdiff.experiments.results import Rq1Result
from mechdiff.experiments.stage import opt
from mechdiff.experiments.study import run_study, study_stages
from mechdiff.report.hooks import Figure, ReportHooks

NAME = "chosen-count"


# ------------------------------------------------------------------ the whole toy stage
@dataclass
class ChosenCountOptions:
    label: str = opt("layers", "what the figure's bar is called")


@dataclass
class ChosenCount:
    """The toy stage's typed result."""

    n_chosen: int
    layers: list[int] = field(default_factory=list)


def _run(study, opts: ChosenCountOptions) -> None:
    rq1 = load_result(study.run, Rq1Result)          # typed, never rq1.json's keys
    study.run.write_json("chosen_count.json", {"title": "Chosen-layer count",
                                               "headline": {"chosen layers": len(rq1.chosen_layers)}})


def _summarise(study, opts: ChosenCountOptions) -> ChosenCount:
    rq1 = load_result(study.run, Rq1Result)
    return ChosenCount(n_chosen=len(rq1.chosen_layers), layers=rq1.chosen_layers)


def _result(run_dir: Path) -> ChosenCount | None:
    return load_result(RunDir(run_dir, create=False), ChosenCount, NAME)


def _sentences(run_dir: Path) -> list[str]:
    r = _result(run_dir)
    return [] if r is None else [f"TOY-SENTENCE: RQ1 chose {r.n_chosen} layer(s) {r.layers}."]


def _data(run_dir: Path) -> dict | None:
    r = _result(run_dir)
    return None if r is None else {"n": r.n_chosen}


def _draw(runs: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.bar([r["label"] for r in runs], [r["n"] for r in runs])
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


TOY = Stage(name=NAME, help="toy: how many layers RQ1 chose", options=ChosenCountOptions, run=_run,
            summarise=_summarise, requires=("rq1",), result=ChosenCount,
            report=ReportHooks(topic="TOY", sentences=_sentences,
                               figures=(Figure("Toy", "TOY-CAPTION: layers RQ1 chose", _data, _draw),)))


@pytest.fixture
def toy_stage():
    register(TOY)
    yield TOY
    unregister(NAME)


# ------------------------------------------------------------------ the test
def test_a_stage_registered_here_runs_after_rq1_and_reaches_the_report(tmp_path, tiny_pair, toy_stage):
    assert study_stages(f"{NAME},rq1") == ["rq1", NAME]          # order from requires=
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"id": f"q{i}", "text": "word " * (1 + i % 4) + f"item {i}",
                                             "topic": f"t{i % 3}"}) for i in range(9)), encoding="utf-8")
    pair = tiny_pair(tmp_path, "tiny", 1, prompts)
    cfg = {"rq1": {"n_prompts": 9, "behaviour": False, "n_perm": 2, "layers": [0, 1, 2], "readouts": ["decision"],
                   "stride": 2}}
    run = run_study(str(pair), cfg, f"{NAME},rq1", tmp_path / "run", device="cpu", batch_size=4)

    chosen = json.loads((run.path / "rq1.json").read_text(encoding="utf-8"))["layers"]["chosen"]
    result = load_result(run, ChosenCount, NAME)
    assert result == ChosenCount(len(chosen), chosen)            # the typed hand-over, saved and read back
    env = json.loads((run.path / "results" / f"{NAME}.json").read_text(encoding="utf-8"))
    assert env["version"] == 1 and env["type"] == "ChosenCount"
    html = (run.path / "report.html").read_text(encoding="utf-8")
    assert f"TOY: TOY-SENTENCE: RQ1 chose {len(chosen)} layer(s) {chosen}." in html
    fig = html.index("Figure Toy")
    block = html[fig:html.index("</figure>", fig)]                 # the figure embedded, with its caption
    assert "TOY-CAPTION" in block and 'src="data:image/png;base64,' in block
    assert (run.path / "figures" / "report" / "fig_toy.png").is_file()


def test_unregistered_the_toy_stage_is_gone(toy_stage):
    unregister(NAME)
    from mechdiff.errors import ConfigError
    with pytest.raises(ConfigError, match="unknown stage"):
        study_stages(NAME)
    register(TOY)                                          # the fixture removes it again
