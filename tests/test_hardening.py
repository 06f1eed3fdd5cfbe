"""Issue 22 (hardening round 2), end to end: cached results keyed on the models' content, no
directory removed that the command did not create, pair names kept inside the sweep directory."""
from __future__ import annotations

import json

import pytest

RQ1_SMALL = dict(behaviour=False, n_perm=2, layers=[1, 2], device="cpu", batch_size=4, n_prompts=6)


def _prompts(root, n: int = 9):
    f = root / "prompts.jsonl"
    f.write_text("\n".join(json.dumps({"id": f"q{i}", "text": "word " * (1 + i % 4) + f"item {i}",
                                        "topic": f"t{i % 3}"}) for i in range(n)), encoding="utf-8")
    return f


def _results(run) -> tuple:
    return run.read_json("cka.json"), run.read_json("patch.json")


def test_weights_replaced_in_place_are_recomputed_like_a_fresh_run(tmp_path, tiny_pair, monkeypatch):
    """Item 1: replacing the tuned model's weights in its directory and rerunning into the same
    --out recomputes every step (equal to a fresh run), where the steps used to be skipped."""
    from mechdiff.experiments.stage import run_stage
    from mechdiff.models.tiny import tiny_model
    monkeypatch.setenv("MECHDIFF_CACHE", str(tmp_path / "cache"))
    pair, out = str(tiny_pair(tmp_path, "tiny", 1, _prompts(tmp_path))), tmp_path / "run"
    before = _results(run_stage("rq1", pair, out=out, **RQ1_SMALL))
    m, _ = tiny_model("llama", seed=2, n_layers=4)
    m.save_pretrained(tmp_path / "tiny-tuned")                 # same path, same size, new weights
    after = _results(run_stage("rq1", pair, out=out, **RQ1_SMALL))
    fresh = _results(run_stage("rq1", pair, out=tmp_path / "fresh", **RQ1_SMALL))
    assert after != before and after == fresh


def test_an_adapter_edited_in_place_is_recomputed_like_a_fresh_run(tmp_path, monkeypatch):
    """Item 1 for a PEFT adapter: zeroing its B matrices in place makes the rerun recompute: the
    tuned model equals the base, so the patch KL is 0 as in a fresh run."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    from mechdiff.experiments.stage import run_stage
    from mechdiff.models.tiny import tiny_model
    monkeypatch.setenv("MECHDIFF_CACHE", str(tmp_path / "cache"))
    base, tok = tiny_model("llama", seed=0, n_layers=4)
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    torch.manual_seed(0)
    lora = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    f = tmp_path / "pair.toml"
    f.write_text(f'name = "lora"\nbase = "{tmp_path / "base"}"\ntuned = "{tmp_path / "base"}+{tmp_path / "lora"}"\n'
                 f'dtype = "float32"\n[datasets]\nset = "{_prompts(tmp_path)}"\n', encoding="utf-8")
    out = tmp_path / "run"
    before = _results(run_stage("rq1", str(f), out=out, **RQ1_SMALL))
    weights = tmp_path / "lora" / "adapter_model.safetensors"
    state = load_file(weights)
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in state.items()}, weights)
    after = _results(run_stage("rq1", str(f), out=out, **RQ1_SMALL))
    fresh = _results(run_stage("rq1", str(f), out=tmp_path / "fresh", **RQ1_SMALL))
    assert after != before and after == fresh
