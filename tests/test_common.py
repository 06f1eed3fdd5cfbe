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


def test_default_batch_size_from_free_memory():
    """Known answer: a quarter of the free memory over one prompt's bytes, clamped to [8, 256];
    32 on CPU; an explicit --batch-size wins."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mechdiff.batching import bytes_per_prompt, default_batch_size
    from mechdiff.experiments.stage import resolve_batch_size
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100)
    m = LlamaForCausalLM(cfg)
    need = bytes_per_prompt(m, 10)
    # float32: 10 tokens x (6*64 + 3*128) x 4 + 3 layers x 10 x 2 x (2 heads x 16) x 4 + 3 x 100 x 4
    assert need == 10 * 768 * 4 + 3 * 10 * 64 * 4 + 1200
    assert default_batch_size([m], 10, free_bytes=40 * need) == 10
    assert default_batch_size([m], 10, free_bytes=need) == 8
    assert default_batch_size([m], 10, free_bytes=10 ** 6 * need) == 256
    assert default_batch_size([m], 10) == 32                       # CPU
    assert resolve_batch_size(5, [], []) == 5
