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


def test_default_max_rows_from_free_memory():
    """Known answer: the patch engine's rows per pass are a quarter of the free memory over one pass
    row's bytes, clamped to [256, 16384]; 2048 on CPU; an explicit max_rows wins."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mechdiff.batching import bytes_per_pass_row, default_max_rows
    from mechdiff.patching import PatchEngine
    from test_patching import make_batch
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100)
    m = LlamaForCausalLM(cfg)
    need = bytes_per_pass_row(m, 6, 40)
    # float32: 6 suffix tokens x (6*64 + 3*128) x 4 + (40 + 6) x 2 x (2 heads x 16) x 4 + 100 x 4 + 3 x 100 x 4
    assert need == 6 * 768 * 4 + 46 * 64 * 4 + 400 + 1200
    assert default_max_rows(m, 6, 40, free_bytes=4000 * need) == 1000
    assert default_max_rows(m, 6, 40, free_bytes=need) == 256
    assert default_max_rows(m, 6, 40, free_bytes=10 ** 6 * need) == 16384
    assert default_max_rows(m, 6, 40) == 2048                      # CPU
    from mechdiff.models.tiny import tiny_model
    model, tok = tiny_model("llama", n_layers=2)
    batch = make_batch(tok)
    assert PatchEngine(model, batch).max_rows == 2048
    assert PatchEngine(model, batch, max_rows=7).max_rows == 7


def _prompts(root, n_prompts: int):
    """A prompt file of ``n_prompts`` prompts in 3 topics."""
    import json
    f = root / "prompts.jsonl"
    f.write_text("\n".join(json.dumps({"id": f"q{i}", "text": "word " * (1 + i % 4) + f"item {i}",
                                        "topic": f"t{i % 3}"}) for i in range(n_prompts)), encoding="utf-8")
    return f


RQ1_SMALL = dict(behaviour=False, n_perm=2, layers=[1, 2], device="cpu", batch_size=4)


def test_fewer_prompts_than_asked_is_a_printed_warning_and_a_field(tmp_path, capsys, tiny_pair):
    """Issue 10, item 5: asking for 12 prompts of a 7-prompt set runs on 7, says so on stderr, and
    fairness.json records both numbers."""
    from mechdiff.experiments.stage import run_stage
    run = run_stage("rq1", str(tiny_pair(tmp_path, "tiny", 1, _prompts(tmp_path, 7))), out=tmp_path / "run", n_prompts=12, **RQ1_SMALL)
    fair = run.read_json("fairness.json")
    assert (fair["n_asked"], fair["n_used"]) == (12, 7)
    err = capsys.readouterr().err
    assert "warning:" in err and "12" in err and "7" in err


def test_a_failed_stage_does_not_block_its_corrected_rerun(tmp_path, monkeypatch, tiny_pair):
    """Issue 10, item 2: a stage that fails after its run directory is opened leaves no recorded
    options behind, so the corrected rerun (other options, same --out) runs instead of being refused
    for the failed attempt's options; a finished stage still refuses other options."""
    import dataclasses

    from mechdiff.errors import DataError
    from mechdiff.experiments import stage as st
    pair, out = str(tiny_pair(tmp_path, "tiny", 1, _prompts(tmp_path, 9))), tmp_path / "run"
    real = st.get_stage("rq1")

    def fail(study, opts):
        raise DataError("failed half-way")
    monkeypatch.setitem(st.STAGES, "rq1", dataclasses.replace(real, run=fail))
    with pytest.raises(DataError, match="half-way"):
        st.run_stage("rq1", pair, out=out, n_prompts=6, **RQ1_SMALL)
    assert (out / "manifest.json").is_file()
    monkeypatch.setitem(st.STAGES, "rq1", real)
    run = st.run_stage("rq1", pair, out=out, n_prompts=8, **RQ1_SMALL)
    assert run.read_json("fairness.json")["n_used"] == 8
    with pytest.raises(ConfigError, match="n_prompts"):
        st.run_stage("rq1", pair, out=out, n_prompts=5, **RQ1_SMALL)


def test_editing_the_prompt_file_in_place_recomputes_what_reads_it(tmp_path, tiny_pair):
    """Issue 10, item 1, end to end: the same command and --out after the prompt texts changed (same
    ids, same path) recomputes capture, CKA and patching on the new texts instead of reusing the old
    states; an unchanged rerun reuses them."""
    import json
    from pathlib import Path

    from mechdiff.experiments.stage import run_stage
    pair, out = str(tiny_pair(tmp_path, "tiny", 1, _prompts(tmp_path, 9))), tmp_path / "run"
    first = run_stage("rq1", pair, out=out, n_prompts=6, **RQ1_SMALL)
    cka1 = first.read_json("cka.json")
    again = run_stage("rq1", pair, out=out, n_prompts=6, **RQ1_SMALL)
    assert again.read_json("cka.json") == cka1                       # unchanged input: same numbers
    f = Path(tmp_path / "prompts.jsonl")
    rows = [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines()]
    f.write_text("\n".join(json.dumps({**r, "text": r["text"] + " and more words here"}) for r in rows),
                 encoding="utf-8")
    edited = run_stage("rq1", pair, out=out, n_prompts=6, **RQ1_SMALL)
    assert edited.read_json("cka.json") != cka1                      # new texts: recomputed
    fresh = run_stage("rq1", pair, out=tmp_path / "fresh", n_prompts=6, **RQ1_SMALL)
    assert edited.read_json("cka.json") == fresh.read_json("cka.json")   # = a run from scratch on them


def test_rq2_raw_patch_at_a_shared_layer_is_exactly_zero_in_bf16(tmp_path):
    """The mapped-patch sweep takes its sources along the destination's engine path: on a bf16 pair
    whose blocks 0-1 are shared bit for bit, the raw patch at the shared control layer is a detected
    no-op (KL exactly 0, both readouts), while the raw patch at a changed block is not."""
    import json

    import torch

    from mechdiff.experiments.stage import run_stage
    from mechdiff.models.tiny import tiny_model
    base, tok = tiny_model("llama", seed=0, n_layers=4)
    g = torch.Generator().manual_seed(3)
    tuned, _ = tiny_model("llama", seed=0, n_layers=4)
    with torch.no_grad():
        for block in tuned.model.layers[2:]:
            for p in block.parameters():
                p.add_(0.2 * p.std() * torch.randn(p.shape, generator=g))
    for side, m in (("base", base), ("tuned", tuned)):
        m.save_pretrained(tmp_path / side)
        tok.save_pretrained(tmp_path / side)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"id": f"q{i}", "text": "word " * (2 + i % 5) + f"item {i}",
                                             "topic": f"t{i % 10}"}) for i in range(40)), encoding="utf-8")
    pair = tmp_path / "pair.toml"
    pair.write_text(f'name = "tiny-bf16"\nbase = "{tmp_path / "base"}"\ntuned = "{tmp_path / "tuned"}"\n'
                    f'dtype = "bfloat16"\n[datasets]\nset = "{prompts}"\n', encoding="utf-8")
    for measure in ("decision", "last"):
        run = run_stage("mapped-patch", str(pair), out=tmp_path / f"run-{measure}", layers=[2], control_layer=1,
                        sites=["resid_post"], solvers=["procrustes"], mapped_alpha=["1.0"], n_train=12, n_val=8,
                        side_effects=False, measure=measure, device="cpu", batch_size=3)
        raw = {v["layer"]: v for v in run.read_json("variants.json")["variants"] if v["kind"] == "raw"}
        assert raw[1]["kl_mean"] == 0.0 and raw[1]["kl_unmasked_mean"] == 0.0, raw[1]
        assert raw[2]["kl_mean"] > 0, raw[2]


def test_max_rows_is_a_common_option_that_reaches_every_patch_engine(tmp_path, tiny_pair, monkeypatch):
    """Issue 21 item 4: --max-rows (rows per PatchEngine pass) is checked before the models load,
    reaches every engine of the stage, and is resume-safe like --batch-size (the values it gives
    are the ones of the default pass size, up to float rounding)."""
    import torch

    import mechdiff.patching.engine as E
    from mechdiff.experiments.stage import run_stage
    pair = str(tiny_pair(tmp_path, "tiny", 1, _prompts(tmp_path, 6)))
    opts = dict(behaviour=False, n_perm=2, layers=[1, 2], readouts=["decision"], device="cpu", batch_size=6,
                n_prompts=6)
    with pytest.raises(ConfigError, match="--max-rows must be >= 1, got 0"):
        run_stage("rq1", pair, out=tmp_path / "bad", max_rows=0, **opts)
    assert not (tmp_path / "bad").exists()
    seen, init = [], E.PatchEngine.__init__

    def spy(self, *a, **k):
        init(self, *a, **k)
        seen.append(self.max_rows)
    monkeypatch.setattr(E.PatchEngine, "__init__", spy)
    small = run_stage("rq1", pair, out=tmp_path / "small", max_rows=3, **opts)
    assert seen and set(seen) == {3}
    seen.clear()
    default = run_stage("rq1", pair, out=tmp_path / "default", **opts)
    assert seen and 3 not in seen
    a, b = small.read_json("patch.json")["directions"], default.read_json("patch.json")["directions"]
    for d in a:
        assert torch.allclose(torch.tensor([r["mean"] for r in a[d]["masked"]]),
                              torch.tensor([r["mean"] for r in b[d]["masked"]]), rtol=1e-4, atol=1e-6)
    assert small.read_manifest()["options"]["rq1"]["max_rows"] == 3
    run_stage("rq1", pair, out=tmp_path / "small", max_rows=5, **opts)       # resume-safe: not refused
