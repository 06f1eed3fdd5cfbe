"""The README's "What bad input looks like" table, kept true: each row marked *this table* runs
against the real CLI (exit code, the message on stderr, no traceback, no run directory); every other
row names an existing test that covers it (those need models). Plus the two rows this file covers:
Ctrl-C and over-long prompts."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mechdiff.cli import app
from mechdiff.errors import DataError

ROOT = Path(__file__).resolve().parent.parent
STAGE_COMMANDS = {"rq1", "maps", "mapped-patch", "steer", "heads", "run"}
FILES = {   # the files the table's inputs name (described in the README paragraph above the table)
    "bad.toml": "base = \n",
    "unknown-key.toml": 'base = "smollm2-135m"\ntuned = "smollm2-135m"\nbsae = 1\n',
    "no-tuned.toml": 'base = "smollm2-135m"\n',
    "policy.toml": 'base = "smollm2-135m"\ntuned = "smollm2-135m"\ntokenizer_policy = "loose"\n',
    "trc.toml": 'base = "smollm2-135m"\ntuned = "smollm2-135m"\ntrust_remote_code = "yes"\n',
    "bad.gguf": "GGUFgarbage\n",
    "badjson.jsonl": '{"id": "a", "text": "x"}\n{not json\n',
    "notext.jsonl": '{"id": "a"}\n',
    "empty.jsonl": "",
    "dup.jsonl": '{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n',
    "badcfg.toml": "[rq1]\nn_promts = 8\n",
    "afile": "a plain file\n",
    "steer0.toml": "[steer]\nks = [0]\n",
    "heads0.toml": "[heads]\nn_prompts = 0\n",
    "ksstr.toml": '[steer]\nks = "1,x"\n',
    "badstage.toml": "[nostage]\nx = 1\n",
    "r1/manifest.json": "{}\n",
    "r2/manifest.json": "{}\n",
    "listrun/manifest.json": "[]\n",
}
BYTES = {"latin1.jsonl": '{"id": "a", "text": "caf\u00e9"}\n'.encode("latin-1")}


def table_rows() -> list[dict]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## What bad input looks like", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| ") or line.startswith("| input") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        assert len(cells) == 4, line
        inp, seen, code, by = cells
        ticks = lambda c: re.findall(r"`([^`]+)`", c)  # noqa: E731
        rows.append({"line": line, "input": inp, "command": next(iter(ticks(inp)), None),
                     "message": next(iter(ticks(seen)), None), "exit": None if code == "-" else int(code),
                     "by": by if by == "this table" else next(iter(ticks(by)), by)})
    return rows


ROWS = table_rows()
CLI_ROWS = [r for r in ROWS if r["by"] == "this table"]


def test_the_table_covers_the_bad_inputs_and_names_real_tests():
    assert len(ROWS) >= 40 and len(CLI_ROWS) >= 35
    for r in ROWS:
        assert r["message"] or r["by"] != "this table", r["line"]
        if r["by"] != "this table":
            path, _, name = r["by"].partition("::")
            assert (ROOT / path).is_file(), r["line"]
            assert re.search(rf"^def {re.escape(name)}\(", (ROOT / path).read_text(encoding="utf-8"), re.M), r["line"]


@pytest.mark.parametrize("row", CLI_ROWS, ids=[r["command"] for r in CLI_ROWS])
def test_bad_input_row(row, tmp_path, monkeypatch):
    import torch
    if "--device cuda" in row["command"] and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    for name, content in FILES.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(content, encoding="utf-8")
    for name, content in BYTES.items():
        (tmp_path / name).write_bytes(content)
    (tmp_path / "emptydir").mkdir()
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    monkeypatch.chdir(tmp_path)
    args = shlex.split(row["command"])
    assert args[0] == "mechdiff", row["line"]
    args = args[1:]
    out = tmp_path / "run"
    if args[0] in STAGE_COMMANDS and "--out" not in args:
        args += ["--out", str(out)]
    res = CliRunner().invoke(app, args, env={"COLUMNS": "400", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    err = " ".join(res.stderr.split())
    assert res.exit_code == row["exit"], (row["line"], res.output)
    assert row["message"] in err, (row["line"], res.output)          # on stderr, as written in the README
    assert "error:" in err and "error:" not in res.stdout
    assert "Traceback" not in res.output
    assert not out.exists(), row["line"]                             # nothing written, the --out stays free
    after = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert after == before, (row["line"], set(after) ^ set(before))  # nothing created or removed anywhere


def test_sigint_says_how_to_resume(monkeypatch, tmp_path):
    """Ctrl-C in a stage command or `mechdiff run`: one line saying how to resume, exit 130."""
    import mechdiff.experiments.stage as stage
    import mechdiff.experiments.study as study

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(stage, "run_stage", interrupted)
    monkeypatch.setattr(study, "run_study", interrupted)
    for args in (["rq1", "--pair", "planted-cultural"], ["run", "--pair", "planted-cultural"]):
        res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "run")])
        assert res.exit_code == 130, res.output
        assert "interrupted; rerun the same command to resume" in res.stderr and "Traceback" not in res.output


def test_too_long_prompts_are_named_before_any_forward_pass(monkeypatch):
    from mechdiff.experiments.stage import Study
    from mechdiff.models.load import LoadedModel
    from mechdiff.models.tiny import tiny_model
    from mechdiff.pairs import ModelSpec, load_pair

    model, tok = tiny_model("llama")
    lm = LoadedModel(model=model, tokenizer=tok, spec=ModelSpec(kind="local", path="/tiny"), info={})
    study = Study(pair=load_pair("smollm2-self"), base=lm, tuned=lm, run=None)
    limit = model.config.max_position_embeddings
    study.__dict__["target_prompts"] = [{"id": "short", "text": "hello there"},
                                        {"id": "huge", "text": "hello there " * limit}]
    monkeypatch.setattr(model, "forward", lambda *a, **k: pytest.fail("a forward pass ran"))
    with pytest.raises(DataError, match=rf"1 prompt\(s\) are longer than the models' context of {limit} tokens"
                                        r".*huge \(\d+ tokens\); shorten or remove them"):
        study.fair_prompts(1.0)


@pytest.mark.parametrize("error", ["cuda", "cpu"])
def test_out_of_memory_says_what_to_do(monkeypatch, tmp_path, error):
    """An allocation failure mid-run (CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError):
    one line naming --batch-size and resume, exit 2, no traceback; other RuntimeErrors still raise."""
    import torch

    import mechdiff.experiments.stage as stage
    exc = (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB") if error == "cuda" else
           RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"))

    def oom(*a, **k):
        raise exc
    monkeypatch.setattr(stage, "run_stage", oom)
    res = CliRunner().invoke(app, ["rq1", "--pair", "planted-cultural", "--out", str(tmp_path / "run")])
    assert res.exit_code == 2, res.output
    assert "out of memory" in res.stderr and "--batch-size" in res.stderr and "Traceback" not in res.output

    def other(*a, **k):
        raise RuntimeError("shape mismatch")
    monkeypatch.setattr(stage, "run_stage", other)
    res = CliRunner().invoke(app, ["rq1", "--pair", "planted-cultural", "--out", str(tmp_path / "run")])
    assert isinstance(res.exception, RuntimeError) and "shape mismatch" in str(res.exception)
