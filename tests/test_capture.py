"""sites.capture: batched capture equals one-by-one unpadded forwards, on every tiny family."""
from __future__ import annotations

import importlib

import pytest
import torch

from mechdiff.data.positions import k_positions
from mechdiff.data.prompts import encode, format_prompt
from mechdiff.errors import NumericsError, SiteError
from mechdiff.models.tiny import FAMILIES, tiny_model
from mechdiff.sites import Captured, capture, capture_logits, resolve, validated

capture_mod = importlib.import_module("mechdiff.sites.capture")  # the module, not the function

PROMPTS = [
    {"id": "a", "text": "What is the capital of France?"},
    {"id": "b", "text": "Hi"},
    {"id": "c", "text": "A much longer prompt, with several clauses, commas and words in it."},
    {"id": "d", "text": "assistant"},
    {"id": "e", "text": "Short one"},
]
SITES = ["resid_pre.0", "resid_post.1", "attn_out.2", "mlp_out.2", "head_out.1", "resid_post.3"]


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request):
    model, tok = tiny_model(request.param)
    return request.param, model, tok


@torch.no_grad()
def _reference(model, tok, prompt, sites, positions):
    """One prompt, no padding, full forward with plain hooks: the values at `positions` (real idx)."""
    b = encode(tok, [prompt])
    from mechdiff.sites import record
    with record(model, sites) as rec:
        model(input_ids=b.input_ids)
    return {s: rec[s][0, positions] for s in sites}


def test_capture_last_equals_unpadded_one_by_one(fam):
    _, model, tok = fam
    cap = capture(model, tok, PROMPTS, SITES, batch_size=3)
    assert isinstance(cap, Captured) and list(cap) == SITES
    assert cap.ids == [p["id"] for p in PROMPTS]
    sm = resolve(model)
    assert cap["resid_post.1"].shape == (len(PROMPTS), sm.d_model)
    assert cap[("head_out", 1)].shape == (len(PROMPTS), sm.n_heads, sm.d_model)
    assert cap["resid_post.1"].dtype == torch.float32 and cap.valid is None
    for i, p in enumerate(PROMPTS):
        b = encode(tok, [p])
        assert int(cap.positions[i]) == int(b.decision[0])  # unpadded index
        ref = _reference(model, tok, p, SITES, int(b.decision[0]))
        for s in SITES:
            torch.testing.assert_close(cap[s][i], ref[s], atol=1e-5, rtol=1e-5)


def test_capture_k_positions_equal_unpadded(fam):
    _, model, tok = fam
    cap = capture(model, tok, PROMPTS, ["resid_post.2", "head_out.0"], positions=("k", 3, 1),
                  batch_size=2, seed=7)
    assert cap["resid_post.2"].shape[:2] == (len(PROMPTS), 3) and cap.valid.shape == (len(PROMPTS), 3)
    for i, p in enumerate(PROMPTS):
        b = encode(tok, [p])
        idx, valid = k_positions(b, 3, exclude_last=1, seed=7)
        assert torch.equal(cap.valid[i], valid[0])
        assert torch.equal(cap.positions[i], torch.where(valid[0], idx[0], -1))
        v = valid[0]
        if v.any():
            ref = _reference(model, tok, p, ["resid_post.2", "head_out.0"], idx[0][v])
            torch.testing.assert_close(cap["resid_post.2"][i][v], ref["resid_post.2"], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(cap["head_out.0"][i][v], ref["head_out.0"], atol=1e-5, rtol=1e-5)
        assert (cap["resid_post.2"][i][~v] == 0).all()
    x, pi = cap.flat("resid_post.2")
    assert x.shape[0] == pi.shape[0] == int(cap.valid.sum())
    assert torch.equal(x, cap["resid_post.2"][cap.valid])


def test_capture_inputs_batch_and_batches_agree(fam):
    _, model, tok = fam
    a = capture(model, tok, PROMPTS, ["resid_post.1"], batch_size=2)
    b = encode(tok, PROMPTS)
    via_batch = capture(model, None, b, ["resid_post.1"], batch_size=2)
    via_list = capture(model, None, [encode(tok, PROMPTS[:2]), encode(tok, PROMPTS[2:])], ["resid_post.1"])
    for other in (via_batch, via_list):
        assert other.ids == a.ids
        torch.testing.assert_close(other["resid_post.1"], a["resid_post.1"], atol=1e-5, rtol=1e-5)
        assert torch.equal(other.positions, a.positions)


def test_capture_stops_after_deepest_site(fam):
    _, model, tok = fam
    sm = resolve(model)
    calls = []
    hs = [sm.blocks[l].register_forward_hook(lambda *a, l=l: calls.append(l)) for l in range(sm.n_layers)]
    head = model.get_output_embeddings().register_forward_hook(lambda *a: calls.append("head"))
    try:
        capture(model, tok, PROMPTS, ["resid_post.1", "resid_pre.0"], batch_size=5, validate=False)
        assert calls == [0, 1]
        calls.clear()
        capture(model, tok, PROMPTS, ["resid_post.1"], batch_size=5, stop_early=False, validate=False)
        assert calls == list(range(sm.n_layers))  # the body only: no LM head
    finally:
        for h in hs + [head]:
            h.remove()


def test_capture_logits_equal_plain_forward(fam):
    _, model, tok = fam
    b = encode(tok, PROMPTS)
    with torch.no_grad():
        ref = model(**b.model_inputs()).logits
    rows = torch.arange(len(b))
    got = capture_logits(model, b)
    assert got.shape == (len(b), ref.shape[-1]) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref[rows, b.decision], atol=1e-5, rtol=1e-5)
    idx, valid = k_positions(b, 2)
    got2 = capture_logits(model, b, idx.clamp_min(0))
    torch.testing.assert_close(got2, ref[rows[:, None], idx.clamp_min(0)], atol=1e-5, rtol=1e-5)
    # and equal to the unpadded single-prompt forward (padding-invariant)
    one = encode(tok, [PROMPTS[1]])
    with torch.no_grad():
        r1 = model(input_ids=one.input_ids).logits[0, one.decision[0]]
    torch.testing.assert_close(got[1], r1, atol=1e-5, rtol=1e-5)


def test_nan_raises_numerics_error():
    model, tok = tiny_model("llama", seed=1)
    with torch.no_grad():
        resolve(model).blocks[1].mlp.down_proj.weight.fill_(float("nan"))
    with pytest.raises(NumericsError, match=r"resid_post\.2.*'a'"):
        capture(model, tok, PROMPTS, ["resid_post.0", "resid_post.2"], validate=False)
    cap = capture(model, tok, PROMPTS, ["resid_post.0"], validate=False)  # upstream of the NaN: fine
    assert torch.isfinite(cap["resid_post.0"]).all()


def test_capture_site_errors():
    model, tok = tiny_model("gpt2")
    with pytest.raises(SiteError, match=r"0\.\.3"):
        capture(model, tok, PROMPTS, ["resid_post.9"])
    with pytest.raises(SiteError, match="unknown site"):
        capture(model, tok, PROMPTS, ["resid_mid.1"])


def test_validated_runs_once(monkeypatch):
    model, tok = tiny_model("qwen2")
    n = []
    real = capture_mod.validate_sites
    monkeypatch.setattr(capture_mod, "validate_sites", lambda *a, **k: (n.append(1), real(*a, **k)))
    capture(model, tok, PROMPTS, ["resid_post.0"])
    capture(model, tok, PROMPTS, ["resid_post.1"])
    assert n == [1]
    assert validated(model, tok) is model and n == [1]


def test_dtype_out_and_bfloat16_model():
    model, tok = tiny_model("llama", dtype=torch.bfloat16)
    cap = capture(model, tok, PROMPTS, ["resid_post.1"], dtype_out=torch.float32, validate=False)
    assert cap["resid_post.1"].dtype == torch.float32
    cap16 = capture(model, tok, PROMPTS, ["resid_post.1"], dtype_out=torch.bfloat16, validate=False)
    assert cap16["resid_post.1"].dtype == torch.bfloat16


# ---- real weights --------------------------------------------------------------------------------

@pytest.mark.real
def test_smollm2_sites_and_decision(request):
    try:
        sm2 = request.getfixturevalue("smollm2")
    except pytest.FixtureLookupError:
        pytest.skip("the smollm2 fixture (tests/conftest.py) is not available")
    model, tok = (sm2.model, sm2.tokenizer) if hasattr(sm2, "model") else sm2
    model.__dict__.pop("_mechdiff_validated", None)
    validated(model, tok)  # validate_sites on a left-padded 2-prompt batch
    prompts = [{"id": "q", "text": "What is the capital of France?"},
               {"id": "r", "text": "Name three primary colours"}]
    b = encode(tok, prompts)
    assert "<|im_start|>" in b.texts[0]  # SmolLM2's own ChatML template was applied
    specials = set(tok.all_special_ids)
    for i, p in enumerate(prompts):
        d = int(b.decision[i])
        assert int(b.input_ids[i, d]) not in specials
        assert tok.decode(b.input_ids[i][b.content[i]]).strip() == p["text"]
        assert p["text"].endswith(tok.decode(b.input_ids[i, d]).strip())
        text, (_, end) = format_prompt(tok, p)
        assert tok.decode(b.input_ids[i, d + 1:]) == text[end:]  # only template tail after it
        assert text[end:].startswith("<|im_end|>") and "assistant" in text[end:]
    cap = capture(model, tok, prompts, ["resid_post.5", "resid_post.29"], batch_size=2)
    assert cap["resid_post.29"].shape == (2, 576)
    for i, p in enumerate(prompts):
        one = encode(tok, [p])
        with torch.no_grad():
            hs = model(input_ids=one.input_ids.to(model.device), output_hidden_states=True).hidden_states
        torch.testing.assert_close(cap["resid_post.5"][i], hs[6][0, one.decision[0]].float().cpu(),
                                   atol=1e-4, rtol=1e-4)
