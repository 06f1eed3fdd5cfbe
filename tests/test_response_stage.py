"""The response readout for any patch (patching/response.py: ``response_readout``) and the ``response``
stage (RQ2's mapped patch and RQ3's handles read over the response), known answers on tiny pairs:

- the loop: a hand-built raw replace equals RQ1's ``response_patch`` bit for bit; a mapped patch
  through the identity map equals the raw patch; every handle mode at alpha 0 gives exactly 0; a
  full-rank ablation towards the source (which writes the source's state) is exactly 0 below a planted
  layer and positive at and after it; a model against itself has exactly 0 gap and 0 patch KL;
- the stage: inside ``run_study`` after tokens, mapped-patch and steer on a planted tiny pair (layer
  2's MLP changed), its rows, intervals, typed result, report sentence and table; ``readout =
  "response"`` feeds compare's drop row and the verdict's handle rows; on a model against itself
  without mapped-patch / steer the gap is exactly 0 and both parts say why they were skipped; without
  the tokens stage's responses it stops with a message naming the command.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

from mechdiff.errors import ConfigError, DataError
from mechdiff.patching import Patch
from mechdiff.data.prompts import Encoded, collate, pad_id_of
from mechdiff.patching.response import raw_patch, response_patch, response_readout, response_rows
from mechdiff.sites.hooks import hooked, replace_at
from mechdiff.texts.divergence import final_hidden, head_logits


def _planted(n_layers: int = 4):
    """A tiny Llama and a copy whose layer-2 MLP is changed (the planted layer)."""
    from mechdiff.models.tiny import tiny_model
    m, tok = tiny_model("llama", seed=0, n_layers=n_layers)
    t = copy.deepcopy(m)
    with torch.no_grad():
        w = t.model.layers[2].mlp.down_proj.weight
        w.add_(0.2 * torch.randn(w.shape, generator=torch.Generator().manual_seed(1)))
    return m.eval(), t.eval(), tok


@pytest.fixture(scope="module")
def planted():
    return _planted()


def _texts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 250, (n,), generator=g).tolist() for n in (12, 9, 15, 10)], [6, 4, 9, 5]


class _Identity:
    def transform(self, X):
        return X.clone()


def test_the_general_loop_known_answers(planted):
    base, tuned, tok = planted
    ids, rs = _texts()
    v = torch.arange(base.config.vocab_size)
    d = base.config.hidden_size
    eye, zeros = torch.eye(d), torch.zeros(d)
    ident = _Identity()
    variants = {
        "raw": raw_patch("resid_post.2"),
        "by_hand": lambda s: Patch("resid_post.2", s("resid_post.2"), mode="replace", alpha=1.0),
        "identity_map": lambda s: Patch("resid_post.2", ident.transform(s("resid_post.2")), alpha=1.0,
                                        centre=s("resid_post.2").mean((0, 1))),
        **{f"ablate_full.{l}": (lambda s, l=l: Patch(f"resid_post.{l}", s(f"resid_post.{l}"), mode="ablate",
                                                     basis=eye, alpha=1.0)) for l in range(4)},
        "steer0": lambda s: Patch("resid_post.2", mode="steer", basis=eye[:, :3], alpha=0.0),
        "add0": lambda s: Patch("resid_post.2", torch.ones(d), mode="add", alpha=0.0),
        "ablate0": lambda s: Patch("resid_post.2", s("resid_post.2"), mode="ablate", basis=eye[:, :3], alpha=0.0),
        "affine0": lambda s: Patch("resid_post.2", zeros + 1, mode="affine", basis=eye[:, :2], matrix=torch.eye(2),
                                   alpha=0.0),
        "mapped0": lambda s: Patch("resid_post.2", s("resid_post.2"), alpha=0.0),   # no centre: c = h
    }
    out = response_readout(tuned, base, tok, ids, rs, 3, variants, v, v, batch_size=3)
    rq1 = response_patch(base, tuned, tok, ids, rs, [2], 3, v, v, batch_size=3)
    assert (out["gap"] > 0).all() and torch.equal(out["gap"], rq1["gap"])
    for name in ("raw", "by_hand", "identity_map", "ablate_full.2"):          # all write the source's states
        assert torch.equal(out["patch_kl"][name], rq1["patch_kl"][2]), name
        assert torch.equal(out["to_ref"][name], rq1["to_src"][2]), name
        assert out["share_closed"][name] == rq1["share_closed"][2]
    assert (out["patch_kl"]["raw"] > 0).all()
    # an independent reference: the source's states written by replace_at, KL in float64 over the vocabulary
    with hooked(base, edit={"resid_post.2": lambda t: (kept.append(t.detach()), None)[1]}):
        b = collate([Encoded(str(j), "", x, [True] * len(x)) for j, x in enumerate(ids[:3])], pad_id_of(tok))
        kept: list = []
        final_hidden(base, b)
    idx, valid = response_rows(b, rs[:3], [len(x) for x in ids[:3]], 3)

    def rows(model, edit=None):
        with hooked(model, edit=edit or {}):
            h = final_hidden(model, b)
        return torch.log_softmax(head_logits(model, h[torch.arange(3)[:, None], idx]).double(), -1)
    clean, patched = rows(tuned), rows(tuned, {"resid_post.2": replace_at(kept[0])})
    kl = ((clean.exp() * (clean - patched)).sum(-1) * valid).sum(-1) / valid.sum(-1)
    assert torch.allclose(kl, out["patch_kl"]["raw"][:3], rtol=1e-4, atol=1e-9)
    for l in (0, 1):                                       # below the planted layer: the tuned model's own states
        assert torch.equal(out["patch_kl"][f"ablate_full.{l}"], torch.zeros(4, dtype=torch.float64)), l
        assert out["share_closed"][f"ablate_full.{l}"] == pytest.approx(0.0, abs=1e-12)
    assert (out["patch_kl"]["ablate_full.3"] > 0).all()
    assert torch.equal(out["to_ref"]["ablate_full.3"], torch.zeros(4, dtype=torch.float64))   # the whole gap
    for name in ("steer0", "add0", "ablate0", "affine0", "mapped0"):   # strength 0: the clean run exactly
        assert torch.equal(out["patch_kl"][name], torch.zeros(4, dtype=torch.float64)), name
        assert torch.equal(out["to_ref"][name], out["gap"]) and out["share_closed"][name] == 0.0, name
    # a model against itself: no gap, and the raw patch is its own state (exactly 0 everywhere)
    self_ = response_readout(base, base, tok, ids, rs, 3, {l: raw_patch(f"resid_post.{l}") for l in range(4)}, v, v)
    assert torch.equal(self_["gap"], torch.zeros(4, dtype=torch.float64))
    for l in range(4):
        assert torch.equal(self_["patch_kl"][l], torch.zeros(4, dtype=torch.float64))
        assert self_["share_closed"][l] is None
    with pytest.raises(DataError, match="k must be"):
        response_readout(tuned, base, tok, ids, rs, 0, variants, v, v)


# ------------------------------------------------------------------------------ the stage in a study
CONFIG = {
    "mapped-patch": {"layers": [2], "control_layer": 1, "sites": ["resid_post"], "solvers": ["procrustes"],
                     "n_train": 14, "n_val": 10, "side_effects": False, "mapped_alpha": ["1.0"]},
    "steer": {"layers": [2], "control_layer": 1, "k": [1], "bases": ["diff"], "modes": ["steer", "ablate"],
              "n_fit": 10, "n_dev": 5, "n_test": 5, "n_neutral": 0, "n_mc": 0, "transfer_lang": "",
              "steer_alpha": [1.0]},
    "tokens": {"n_prompts": 8, "max_new_tokens": 4, "n_neutral": 0, "lens_tokens": 0, "response_k": 0},
    "response": {"response_k": 3, "readout": "response"},
}


def _save_pair(root, name, base, tuned, tok, n_prompts=40):
    prompts = root / f"{name}.jsonl"
    prompts.write_text("\n".join(json.dumps({"id": f"q{i}", "text": "word " * (1 + i % 4) + f"item {i}",
                                             "topic": f"t{i % 8}"}) for i in range(n_prompts)), encoding="utf-8")
    for side, m in (("base", base), ("tuned", tuned)):
        m.save_pretrained(root / f"{name}-{side}")
        tok.save_pretrained(root / f"{name}-{side}")
    f = root / f"{name}.toml"
    f.write_text(f'name = "{name}"\nbase = "{root / (name + "-base")}"\ntuned = "{root / (name + "-tuned")}"\n'
                 f'dtype = "float32"\n[datasets]\nset = "{prompts}"\n', encoding="utf-8")
    return str(f)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from mechdiff.experiments.study import run_study
    root = tmp_path_factory.mktemp("response_study")
    base, tuned, tok = _planted()
    pair = _save_pair(root, "planted-tiny", base, tuned, tok)
    run = run_study(pair, CONFIG, "response,tokens,steer,mapped-patch", root / "run", device="cpu", batch_size=8)
    return run.path


def _json(path, name):
    return json.loads((path / name).read_text(encoding="utf-8"))


def test_the_stage_runs_after_its_required_stages_and_reads_rq2_and_rq3_over_the_response(study):
    from mechdiff.artifacts import RunDir
    from mechdiff.experiments.response import ResponseResult
    from mechdiff.experiments.results import MappedPatchResult, SteerResult, load_result
    from mechdiff.experiments.study import study_stages
    assert study_stages("response,tokens,steer,mapped-patch") == ["mapped-patch", "steer", "tokens", "response"]
    run = RunDir(study, create=False)
    res, rq2, rq3 = load_result(run, ResponseResult), load_result(run, MappedPatchResult), load_result(run, SteerResult)
    out = _json(study, "response.json")
    assert res.k == 3 and res.readout == "response" and set(res.gap) == {"tuned", "base"}
    assert all(g > 0 for g in res.gap.values())                        # the planted change shows in the reply
    # RQ2: the winner (planted layer 2) read for each responder, raw beside mapped, drop with its interval
    assert rq2.winner is not None and rq2.winner.layer == 2, rq2
    assert [r.responder for r in res.rq2] == ["tuned", "base"]
    for r in res.rq2:
        assert (r.solver, r.layer, r.site) == (rq2.winner.solver, 2, "resid_post")
        assert r.kl_raw > 0 and r.kl_mapped is not None and r.decision_drop_pct == rq2.winner.drop_pct
        assert r.drop_pct["estimate"] == pytest.approx(100 * (1 - r.kl_mapped / r.kl_raw))
        assert r.drop_pct["ci_low"] <= r.drop_pct["estimate"] <= r.drop_pct["ci_high"]
        assert r.drop_pct["method"].startswith(("cluster bootstrap", "bootstrap over prompts"))
        assert r.share_raw["estimate"] is not None and r.share_mapped["estimate"] is not None
        assert not r.in_sample and r.n_texts >= 2
    # per text: nothing after the planted layer 2 differs, so the raw patch there gives the base's output exactly
    t = run.read_tensors("tensors/response_readout.safetensors")
    assert float(t["tuned/tuned/gap"].mean()) == pytest.approx(res.gap["tuned"]) and (t["tuned/tuned/gap"] > 0).all()
    for who in ("tuned", "base"):
        raw = t[f"{who}/tuned/rq2.raw/to_ref"]
        assert torch.equal(raw, torch.zeros_like(raw)), who
    assert all(r.share_raw["estimate"] == 1.0 for r in res.rq2)
    # RQ3: one row per saved handle and responder, on the side RQ3 defines, with the alpha RQ3 chose
    assert rq3.handles and len(res.rq3) == 2 * len(rq3.handles)
    sides = {r.mode: r.side for r in res.rq3}
    assert sides.get("steer", "base") == "base" and sides.get("ablate", "tuned") == "tuned"
    for r in res.rq3:
        assert r.share["estimate"] == pytest.approx(1 - r.kl / r.gap) and r.gap > 0
        assert "ci_low" in r.share or "no interval" in r.share["note"]
    assert out["table"] and {row["readout"] for row in out["table"]} == {
        "response, first 3 tokens (tuned model's responses)", "response, first 3 tokens (base model's responses)"}
    html = (study / "report.html").read_text(encoding="utf-8")
    assert "RQ2 read over the response (response, first 3 tokens (tuned model&#x27;s responses)" in html
    assert "Response readout (RQ2, RQ3)" in html and "decision token" in html
    md = (study / "report.md").read_text(encoding="utf-8")
    assert "RQ3&#x27;s handles" not in md and "RQ3's handles read over the response" in md


def test_readout_response_makes_the_headlines_come_from_the_response_stage(study):
    from mechdiff.compare import intervals
    from mechdiff.report.render import load
    from mechdiff.report.summary import numbers
    from mechdiff.verdict import run_estimates
    out = _json(study, "response.json")
    n = numbers(study)
    tuned_row = next(r for r in out["rq2"] if r["responder"] == "tuned")
    decision_drop = _json(study, "alpha_sweep.json")["winner"]["drop_pct"]
    assert n["mapped drop %"] == tuned_row["drop_pct"]["estimate"] != decision_drop
    assert n["drop readout"] == "response, first 3 tokens (tuned model's responses)"
    est = run_estimates(intervals(study), load(study / "rq3.json"), n, response=out)
    decision = run_estimates(intervals(study), load(study / "rq3.json"), n)
    for key, mode in (("handle_steer", "steer"), ("handle_ablate", "ablate")):
        row = next(r for r in out["rq3"] if r["responder"] == "tuned" and r["mode"] == mode)
        assert est[key].value == row["share"]["estimate"] and "response, first 3 tokens" in est[key].note
        assert decision[key].value != est[key].value and "response" not in decision[key].note
    # the verdict table names the readout of a row read over the response
    from mechdiff.compare import _verdict_section
    from mechdiff.report.render import Section
    from mechdiff.verdict import verdict_for
    v = verdict_for([{"domain": "cultural", "label": "a", "estimates": est},
                     {"domain": "cognitive", "label": "b", "estimates": decision}])
    sec = Section()
    _verdict_section(sec, v)
    cells = {r["key"]: r for r in v["rows"]}
    assert cells["handle_steer"]["cultural"]["note"].startswith("response, first 3 tokens")
    assert "(response, first 3 tokens (tuned model&#x27;s responses), steer k=" in "".join(sec.html)


def test_model_against_itself_and_missing_stages(tmp_path):
    from mechdiff.experiments import run_stage
    from mechdiff.models.tiny import tiny_model
    base, tok = tiny_model("llama", seed=0, n_layers=4)
    pair = _save_pair(tmp_path, "self", base, base, tok, n_prompts=6)
    with pytest.raises(DataError, match="mechdiff tokens"):
        run_stage("response", pair, out=tmp_path / "none", device="cpu", batch_size=8)
    run_stage("tokens", pair, out=tmp_path / "run", device="cpu", batch_size=8, n_prompts=4, max_new_tokens=4,
              n_neutral=0, lens_tokens=0, response_k=0)
    run = run_stage("response", pair, out=tmp_path / "run", device="cpu", batch_size=8, response_k=3)
    out = _json(run.path, "response.json")
    assert out["gap"] == {"tuned": 0.0, "base": 0.0} and out["rq2"] == [] and out["rq3"] == []
    assert out["skipped"]["rq2"].startswith("mapped-patch has not run") and "steer has not run" in out["skipped"]["rq3"]
    html = (run.path / "report.html").read_text(encoding="utf-8")
    assert "RQ2 over the response: not measured: mapped-patch has not run" in html


@pytest.mark.parametrize("table, match", [({"readout": "first"}, "--readout must be one of"),
                                          ({"response_k": 0}, "--response-k must be >= 1"),
                                          ({"responders": ["tuned", "tuned"]}, "--responders")])
def test_bad_options_fail_before_any_model_work(tmp_path, table, match):
    from mechdiff.experiments.study import run_study
    with pytest.raises(ConfigError, match=match):
        run_study("planted-cultural", {"response": table}, "response", out=tmp_path / "r", models=("not", "loaded"))


def test_one_id_space_one_tokenizer_or_an_extension_of_the_base():
    from mechdiff.texts.divergence import id_space
    from mechdiff.models.tiny import tiny_tokenizer
    base = tiny_tokenizer()
    ext = copy.deepcopy(base)
    ext.add_tokens(["qazaqsha", "kumys"])
    n = len(base)
    assert id_space(base, copy.deepcopy(base)) == "one tokenizer"
    assert id_space(base, ext, tuned_rows=n + 2) == "base ids"          # the tuned model reads the base's ids
    assert id_space(base, ext, tuned_rows=n - 1) is None                 # a base id without an embedding row
    assert id_space(ext, base) is None                                    # the base's new tokens: not in the tuned
    other = copy.deepcopy(ext)
    other.chat_template = "{{ messages }}"
    assert id_space(base, other) is None                                  # another chat template
