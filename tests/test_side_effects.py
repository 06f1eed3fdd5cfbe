"""Side-effect machinery: the prompt-pass patch really reaches generation, and MC scoring is exact."""
from __future__ import annotations

import pytest
import torch

from mechdiff.analyses.behaviour import generate_ids
from mechdiff.data.prompts import encode, pad_id_of
from mechdiff.analyses.behaviour.mc import mc_prompt, mc_scores
from mechdiff.analyses.behaviour.side_effects import _first_pass
from mechdiff.models.tiny import tiny_model
from mechdiff.sites.capture import capture
from mechdiff.sites.hooks import intervene, replace_at

PROMPTS = [{"id": "a", "text": "hello there"}, {"id": "b", "text": "what is kumis?"}]


def _gen(model, tok, batch, edit=None):
    with intervene(model, edit or {}):
        return generate_ids(model, batch.input_ids, batch.attention_mask, 6, pad_id_of(tok))


def test_prompt_pass_patch_changes_generation_and_clean_value_does_not():
    model, tok = tiny_model("llama", seed=1)
    batch = encode(tok, PROMPTS)
    T = batch.input_ids.shape[1]
    clean = _gen(model, tok, batch)
    h = capture(model, tok, PROMPTS, ["resid_post.1"])["resid_post.1"]
    same = _gen(model, tok, batch, {"resid_post.1": _first_pass(replace_at(h, batch.decision), T)})
    big = _gen(model, tok, batch, {"resid_post.1": _first_pass(replace_at(h * 0 + 50.0, batch.decision), T)})
    assert torch.equal(clean, same)
    assert not torch.equal(clean, big)


def test_mc_scores_known_answer():
    model, tok = tiny_model("llama")
    items = [{"id": "q", "question": "2+2?", "choices": ["3", "4", "5"], "answer": 1}]
    ids = [tok.encode(c, add_special_tokens=False)[0] for c in "ABC"]
    logits = torch.full((1, len(tok)), -10.0)
    logits[0, ids] = torch.tensor([0.0, 2.0, 1.0])
    lp = logits.log_softmax(-1)[0, ids]
    out = mc_scores(logits, items, tok)
    assert out["accuracy"] == 1.0
    assert abs(out["dlogp_correct"] - float(lp[1] - (lp[0] + lp[2]) / 2)) < 1e-6
    assert "B) 4" in mc_prompt(items[0])["text"]


@pytest.mark.real
def test_mc_side_effect_of_a_write_back_is_exactly_zero(smollm2_loaded):
    """The clean side of an MC side effect is the engine's in-pass reference, so writing back the clean
    value gives a delta of exactly 0 also when the engine computes the patched rows (detect_noops=False:
    the suffix pass, whose logits differ from the full clean forward in the last bits on real weights),
    while a real patch does change the readout."""
    from mechdiff.analyses.behaviour.side_effects import mc_effects
    from mechdiff.data.datasets import load_prompt_set
    from mechdiff.patching import Patch, PatchEngine

    model, tok = smollm2_loaded.model, smollm2_loaded.tokenizer
    items = load_prompt_set("mc")[:4]
    site = "resid_post.20"
    h = PatchEngine(model, encode(tok, [mc_prompt(it) for it in items]), measure="last",
                    record_sites=[site]).clean_states([site])[site]
    allowed = torch.arange(0, len(tok), 2)                       # a masked readout too
    for detect in (True, False):
        rows = mc_effects(model, tok, items, [(site, h), Patch(site, h, alpha=0.5, centre=h.float() * 0),
                                              Patch(site, h * 3.0)], allowed, detect_noops=detect)
        for m in ("masked", "unmasked"):
            assert rows[0][f"d_mc_dlogp_{m}"] == 0.0 and rows[0][f"d_mc_acc_pp_{m}"] == 0.0, (detect, m)
            assert rows[0][f"mc_dlogp_clean_{m}"] == rows[0][f"mc_dlogp_patched_{m}"], (detect, m)
            assert rows[1][f"d_mc_dlogp_{m}"] != 0.0 and rows[2][f"d_mc_dlogp_{m}"] != 0.0, (detect, m)


def test_refusal_rates_follow_batch_size_with_the_same_texts(monkeypatch):
    """Issue 21 item 4: --batch-size reaches the side-effect generations (RQ2): prompts run in passes
    of batch_size rows, padded once, so every prompt's generated text (clean and patched) is the same
    as in one pass of all prompts."""
    import mechdiff.analyses.behaviour.side_effects as se
    from mechdiff.analyses.behaviour.side_effects import refusal_rates
    model, tok = tiny_model("llama", seed=1)
    prompts = PROMPTS + [{"id": "c", "text": "a longer prompt about the steppe"}, {"id": "d", "text": "hi"},
                         {"id": "e", "text": "tell me about dombra music"}]
    h = capture(model, tok, prompts, ["resid_post.1"])["resid_post.1"]
    patches = [("resid_post.1", h * 0 + 50.0), ("resid_post.1", h)]
    seen, rows_per_pass = [], []
    monkeypatch.setattr(se, "is_refusal", lambda t: seen.append(t) or len(t) % 2 == 0)
    real = se.generate_ids
    monkeypatch.setattr(se, "generate_ids", lambda m, ids, *a: rows_per_pass.append(ids.shape[0]) or real(m, ids, *a))
    runs = {}
    for bs in (None, 2):
        seen.clear(), rows_per_pass.clear()
        runs[bs] = refusal_rates(model, tok, prompts, patches, None, max_new_tokens=5, batch_size=bs), list(seen)
        assert max(rows_per_pass) == (bs or len(prompts))
    assert runs[None] == runs[2]
    texts = runs[None][1]
    n = len(prompts)     # clean (unmasked, masked), then per patch (unmasked, masked): the big patch
    assert texts[2 * n:3 * n] != texts[:n] and texts[4 * n:5 * n] == texts[:n]   # changes the texts, h does not


def test_mc_effects_follow_batch_size(monkeypatch):
    """Issue 21 item 4: --batch-size reaches the MC side effects (RQ2): the items run through one
    engine per chunk of batch_size; a source taken on the same chunks (clean_run) is the clean state
    bit for bit, so writing it back is an MC side effect of exactly 0 at any batch size, and a real
    patch reads the same as in one chunk of all items."""
    from mechdiff.analyses.behaviour import side_effects as se
    from mechdiff.models.load import LoadedModel
    from mechdiff.pairs.spec import ModelSpec
    from mechdiff.patching import Patch, clean_run
    model, tok = tiny_model("llama", seed=1)
    side = LoadedModel(model=model, tokenizer=tok, spec=ModelSpec(kind="local", path="/tiny"), info={})
    items = [{"id": f"q{i}", "question": q, "choices": ["1", "2", "3"], "answer": i % 3}
             for i, q in enumerate(["one?", "two or more?", "three?", "four, a longer one?", "five?"])]
    sizes, real = [], se.PatchEngine
    monkeypatch.setattr(se, "PatchEngine", lambda m, batch, **kw: sizes.append(batch.input_ids.shape[0]) or
                        real(m, batch, **kw))
    rows = {}
    for bs in (None, 2):
        sizes.clear()
        h = clean_run(side, [mc_prompt(it) for it in items], ["resid_post.1"], batch_size=bs or len(items),
                      measure="last")[1]["resid_post.1"]
        rows[bs] = se.mc_effects(model, tok, items, [("resid_post.1", h), Patch("resid_post.1", h * 3.0)], None,
                                 batch_size=bs, detect_noops=False)
        assert sizes == ([len(items)] if bs is None else [2, 2, 1])
        assert rows[bs][0]["d_mc_dlogp_unmasked"] == 0.0 and rows[bs][0]["d_mc_acc_pp_unmasked"] == 0.0
        assert rows[bs][1]["d_mc_dlogp_unmasked"] != 0.0
    for k, v in rows[None][1].items():
        assert rows[2][1][k] == pytest.approx(v, abs=1e-5), k
