"""The ``tokens`` stage end to end on tiny offline pairs (two random 4-layer Llamas that share a
tokenizer): the stored format (load_texts), a model against itself giving exactly zero, the
summaries, figure and report section."""
from __future__ import annotations

import json
import math


from mechdiff.experiments import run_stage
from mechdiff.texts.result import SCHEMA, load_texts

SMALL = dict(n_prompts=3, max_new_tokens=4, n_neutral=2, top_n=5, curve_len=8)


def _prompts(tmp_path, n):
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps({"id": f"p{i}", "text": f"tell me <b>{i}</b> things about topic {i % 2}",
                                       "category": "c", "lang": "en", "topic": f"t{i % 2}"})
                           for i in range(n)), encoding="utf-8")
    return f


def test_tokens_stage_on_a_tiny_pair(tmp_path, tiny_pair):
    pair = str(tiny_pair(tmp_path, "tiny", 1, _prompts(tmp_path, 4)))
    run = run_stage("tokens", pair, out=tmp_path / "run", device="cpu", batch_size=4, **SMALL)
    meta = json.loads((run.path / "tokens.json").read_text())
    assert meta["schema"] == SCHEMA
    texts = load_texts(run.path)
    assert len(texts) == 3 * 2 + 2
    for t in texts:
        s = t.summary
        assert s.unit == "token" and len(t.rows) == s.n_rows > 0
        assert all(r.text == s.text[r.start:r.end] for r in t.rows)
        if s.responder:
            resp = [r for r in t.rows if r.start >= s.response_start]
            assert resp and math.isfinite(s.mean_kl_bt) and s.mean_kl_bt > 0      # different random models
            assert all(math.isfinite(r.kl_bt_full) for r in t.rows)                # one tokenizer: unmasked KL too
    h = meta["headline"]
    assert h["kl_bt_base_response"] > 0 and h["kl_bt_base_response_se"] is not None
    assert set(meta["curve"]) == {"base", "tuned"} and meta["curve"]["base"]["pos"][0] == 0
    assert len(meta["tables"]["top_tokens"]) == 5
    assert (run.path / "figures" / "tokens_curve.png").is_file()
    from mechdiff.report import write_report
    html = write_report(run.path)[0].read_text(encoding="utf-8")
    assert "Most divergent texts, token by token" in html and "Figure E" in html
    assert "Per token, KL(base ‖ tuned) over the shared vocabulary is" in html          # the summary sentence
    from mechdiff.experiments.results import load_result
    from mechdiff.experiments.tokens import TokensResult
    res = load_result(run, TokensResult)
    assert res.n_texts == 8 and res.kl_bt_tuned_response == h["kl_bt_tuned_response"]
    assert "<b>" not in html and ">&lt;</span>" in html               # prompt text escaped, token by token
    assert 'style="background: rgba(220,40,40,' in html
    # the response readout of layer patching and the activation-difference lens ran (one tokenizer, one shape)
    rp = json.loads((run.path / "response_patch.json").read_text())
    assert {r["direction"] for r in rp["table"]} == {"base->tuned", "tuned->base"} and rp["table"][0]["gap"] > 0
    lens = json.loads((run.path / "diff_lens.json").read_text())
    assert len(lens["table"]) == 4 and lens["handles"]


def test_compare_puts_the_curves_side_by_side(tmp_path, tiny_pair):
    from mechdiff.compare import compare_runs
    runs = []
    for name, seed in (("a", 1), ("b", 2)):
        pair = str(tiny_pair(tmp_path, name, seed, _prompts(tmp_path, 3)))
        runs.append(run_stage("tokens", pair, out=tmp_path / f"run_{name}", device="cpu", batch_size=4,
                              **{**SMALL, "n_prompts": 2, "n_neutral": 0}).path)
    out = compare_runs(runs, out=tmp_path / "cmp")
    assert (out / "figures" / "compare_e.png").is_file()


def test_tokens_stage_model_against_itself_is_zero(tmp_path, tiny_pair):
    pair = str(tiny_pair(tmp_path, "self", 0, _prompts(tmp_path, 3)))     # tuned = base (same seed)
    run = run_stage("tokens", pair, out=tmp_path / "run", device="cpu", batch_size=4, **SMALL)
    texts = load_texts(run.path)
    for t in texts:
        for r in t.rows:
            assert r.kl_bt == 0.0 and r.kl_tb == 0.0 and r.kl_bt_full == 0.0
            assert r.logp_base == r.logp_tuned and r.rank_in_base == r.rank_in_tuned
    rp = json.loads((run.path / "response_patch.json").read_text())
    assert all(r["patch_kl"] == 0.0 and r["gap"] == 0.0 and r["share_closed"] is None for r in rp["table"])
    assert json.loads((run.path / "diff_lens.json").read_text())["handles"] == []
    # resumable: a rerun recomputes nothing
    from mechdiff.artifacts import RunDir
    steps = RunDir(run.path).steps()
    assert {"tokens.responses", "tokens.divergence"} <= set(steps)
    before = (run.path / "tokens" / "per_token.safetensors").stat().st_mtime_ns
    run_stage("tokens", pair, out=tmp_path / "run", device="cpu", batch_size=4, **SMALL)
    assert (run.path / "tokens" / "per_token.safetensors").stat().st_mtime_ns == before
