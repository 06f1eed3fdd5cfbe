"""Per-token divergence over whole texts (mechdiff.texts.divergence): known answers on real models.

- a model against itself: every KL exactly 0, log-probs and ranks equal;
- smollm2-vs-gemma3: spans cover the text and the per-span log-likelihoods sum to each model's
  whole-text log-likelihood from a plain forward (float32 tolerance);
- a tokenizer and its extension (smollm2-culture-lora) on text without the new tokens: every span
  is one token on both sides and the span rows equal the per-token rows exactly.
"""
from __future__ import annotations

import math

import pytest
import torch

from mechdiff.fairness import shared_vocab
from mechdiff.texts.divergence import RowReducer, divergence_rows, pair_text, same_tokenizer

TEXTS = ["The quick brown fox jumps over the lazy dog.",
         "Наурыз мейрамы туралы қысқаша айтып беріңізші.",
         "Hello  wörld — Қазақстан 日本 ok\n\n1234 + 5678 = ?"]


def _rows(a, b, texts, unit, budget=1 << 30):
    sv = shared_vocab(a.tokenizer, b.tokenizer)
    red = RowReducer(a.model, b.model, sv.a_ids, sv.b_ids, full=same_tokenizer(a.tokenizer, b.tokenizer),
                     budget_bytes=budget)
    pts = [pair_text(a.tokenizer, b.tokenizer, t, unit=unit) for t in texts]
    return pts, divergence_rows(red, a.tokenizer, b.tokenizer, pts)


def test_model_against_itself_is_exactly_zero(smollm2_loaded):
    m = smollm2_loaded
    pts, rows = _rows(m, m, TEXTS[1:], "token")
    for p, r in zip(pts, rows):
        assert len(r["kl_bt"]) == len(p.a.ids) - 1
        for k in ("kl_bt", "kl_tb", "kl_bt_full", "kl_tb_full"):
            assert torch.equal(r[k], torch.zeros_like(r[k])), k
        assert torch.equal(r["logp_base"], r["logp_tuned"]) and torch.equal(r["rank_in_base"], r["rank_in_tuned"])
        assert torch.equal(r["dropped_base"], r["dropped_tuned"])
        # the chunked output layer gives the plain forward's log-probs
        lp = torch.log_softmax(m.model(torch.tensor([p.a.ids])).logits[0].float(), -1)
        want = lp[torch.arange(len(p.a.ids) - 1), torch.tensor(p.a.ids[1:])]
        assert torch.allclose(r["logp_base"], want, atol=1e-4)


def test_chunking_does_not_change_the_rows(smollm2_loaded):
    m = smollm2_loaded
    _, big = _rows(m, m, TEXTS[:1], "token")
    _, small = _rows(m, m, TEXTS[:1], "token", budget=49152 * 4 * 8 * 3)    # 3 rows per chunk
    for k in ("logp_base", "dropped_base"):
        assert torch.allclose(big[0][k], small[0][k], atol=1e-5)
    assert torch.equal(big[0]["rank_in_base"], small[0]["rank_in_base"])


@pytest.fixture(scope="module")
def gemma3():
    from mechdiff.models.load import load_model
    return load_model("gemma3-270m", dtype="float32", device="cpu")


def test_smollm2_vs_gemma3_span_loglik_sums_to_the_whole_text(smollm2_loaded, gemma3):
    pts, rows = _rows(smollm2_loaded, gemma3, TEXTS[2:], "span")     # mixed scripts, split characters
    for p, r in zip(pts, rows):
        assert p.alignment.coverage == 1.0
        assert not torch.isnan(r["logp_base"]).any() and not torch.isnan(r["logp_tuned"]).any()
        assert torch.isnan(r["kl_bt_full"]).all()                   # vocabularies differ
        assert (r["kl_bt"] >= 0).all() and (r["dropped_tuned"] > 0).any()
        for m, tk, key in ((smollm2_loaded, p.a, "logp_base"), (gemma3, p.b, "logp_tuned")):
            # the whole text's log-likelihood from one plain (unpadded, unchunked) forward; the rows
            # come from a left-padded batch, so the two agree to float32 rounding of ~20 layers
            lp = torch.log_softmax(m.model(torch.tensor([tk.ids])).logits[0].double(), -1)
            whole = sum(float(lp[i - 1, tk.ids[i]]) for i in range(1, len(tk.ids)) if not tk.special[i])
            assert math.isclose(float(r[key].double().sum()), whole, rel_tol=1e-5, abs_tol=1e-3), (key, p.a.text)


def test_extension_tokenizer_spans_are_tokens_and_equal_the_token_rows(smollm2_loaded):
    from mechdiff.models.load import load_model
    from mechdiff.pairs import load_pair
    tuned = load_model(load_pair("smollm2-culture-lora").tuned, dtype="float32", device="cpu")
    assert not same_tokenizer(smollm2_loaded.tokenizer, tuned.tokenizer)
    texts = TEXTS[:1] + ["Water boils at one hundred degrees Celsius at sea level."]
    _, tok_rows = _rows(smollm2_loaded, tuned, texts, "token")
    pts, span_rows = _rows(smollm2_loaded, tuned, texts, "span")
    for p, t, s in zip(pts, tok_rows, span_rows):
        assert all(a1 - a0 == 1 for a0, a1 in p.alignment.a_tokens)
        assert all(b1 - b0 == 1 for b0, b1 in p.alignment.b_tokens)
        assert set(t) == set(s)
        for k in t:
            assert torch.equal(t[k], s[k]) or (torch.isnan(t[k]).all() and torch.isnan(s[k]).all()), k
        assert (t["kl_bt"] > 0).any()                               # the fine-tune is no no-op


def test_final_hidden_in_row_slices_equals_one_forward(smollm2_loaded):
    """A batch larger than ``max_tokens`` runs in row slices (bounded forward memory): same states."""
    from mechdiff.data.prompts import Encoded, collate
    from mechdiff.texts.divergence import final_hidden
    m = smollm2_loaded
    enc = [Encoded(str(i), t, m.tokenizer(t)["input_ids"], [True] * len(m.tokenizer(t)["input_ids"]))
           for i, t in enumerate(TEXTS)]
    b = collate(enc, m.tokenizer.pad_token_id)
    whole = final_hidden(m.model, b, max_tokens=1 << 20)
    sliced = final_hidden(m.model, b, max_tokens=b.input_ids.shape[1])       # one text per forward
    assert sliced.shape == whole.shape
    mask = b.attention_mask.bool()
    torch.testing.assert_close(sliced[mask], whole[mask], atol=1e-4, rtol=1e-4)
