"""Run-directory resume rules shared by every stage (experiments.common.open_run)."""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from mechdiff.errors import ConfigError
from mechdiff.experiments.common import open_run
from mechdiff.pairs import load_pair


@dataclass
class Opts:
    n_prompts: int = 10
    batch_size: int = 8


def _sides(tok_hash="t1"):
    info = {"spec": "smollm2-135m", "tokenizer_hash": tok_hash, "load_seconds": 1.0, "device": "cpu"}
    return {"base": SimpleNamespace(info=dict(info)), "tuned": SimpleNamespace(info=dict(info))}


def test_resume_rules(tmp_path):
    pair = load_pair("smollm2-self")
    out = tmp_path / "run"
    open_run(out, "rq1", pair, _sides(), {"seed": 0}, Opts())
    # same options, other batch size / load time / device: resumes
    open_run(out, "rq1", pair, _sides(), {"seed": 0}, Opts(batch_size=64))
    # another stage joins the same directory with its own options
    run = open_run(out, "maps", pair, _sides(), {"seed": 0}, Opts(n_prompts=99))
    opts = run.read_manifest()["options"]
    assert opts["rq1"]["n_prompts"] == 10 and opts["maps"]["n_prompts"] == 99
    with pytest.raises(ConfigError, match="other options"):
        open_run(out, "rq1", pair, _sides(), {"seed": 0}, Opts(n_prompts=11))
    with pytest.raises(ConfigError, match="different configuration"):
        open_run(out, "rq1", pair, _sides(tok_hash="t2"), {"seed": 0}, Opts())
    with pytest.raises(ConfigError, match="different configuration"):
        open_run(out, "rq1", pair, _sides(), {"seed": 1}, Opts())
