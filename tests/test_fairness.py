"""Fairness: token normalisation, shared vocabulary, prompt filter, logit masks (known answers)."""

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mechdiff.errors import DataError
from mechdiff.fairness import (
    bytes_to_unicode,
    detect_scheme,
    filter_prompts,
    mask_logits,
    normalise_token,
    shared_logits,
    shared_ratio,
    shared_vocab,
)

SPECIALS = {"<unk>": 0, "<pad>": 1, "<s>": 2}


def bl(s: str) -> str:
    """Byte-level (GPT-2) spelling of a string."""
    t = bytes_to_unicode()
    return "".join(t[b] for b in s.encode("utf-8"))


def _wrap(vocab, pre, dec):
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre
    t.decoder = dec
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", pad_token="<pad>", bos_token="<s>")


def byte_tok(words):
    vocab = dict(SPECIALS)
    for w in words:
        vocab[bl(w)] = len(vocab)
    return _wrap(vocab, pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel())


def sp_tok(pieces):
    vocab = dict(SPECIALS)
    for p in pieces:
        vocab[p] = len(vocab)
    return _wrap(
        vocab,
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never"),
        decoders.Metaspace(replacement="\u2581", prepend_scheme="never"),
    )


# A: byte-level, 12 entries. B: SentencePiece style, 14 entries ("A" twice: "A" id 10, "<0x41>" id 11).
A_WORDS = ["hello", " world", " the", "cat", " cat", "\n", " sat", " сәлем", "A"]
B_PIECES = ["hello", "▁world", "▁the", "cat", "▁dog", "<0x0A>", "▁сәлем", "A", "<0x41>", "▁мен", "▁ауыл"]


@pytest.fixture(scope="module")
def toks():
    return byte_tok(A_WORDS), sp_tok(B_PIECES)


def test_normalise_token():
    assert normalise_token("Ġthe") == " the"
    assert normalise_token("Ċ") == "\n"
    assert normalise_token("▁the") == " the"
    assert normalise_token("<0x0A>") == "\n"
    assert normalise_token("<0x41>") == "A"
    assert normalise_token(bl(" сәлем")) == " сәлем"
    assert normalise_token(bl(" сәлем"), scheme="byte_level") == " сәлем"
    assert normalise_token("<|eot_id|>", special=True) == "<|eot_id|>"
    # every single byte round-trips, and matches the byte-fallback spelling
    for b, ch in bytes_to_unicode().items():
        assert normalise_token(ch, scheme="byte_level") == normalise_token(f"<0x{b:02X}>", scheme="sentencepiece")
    # half of a 2-byte character is a distinct, stable string
    half = normalise_token(bl("ә")[0], scheme="byte_level")
    assert len(half) == 1 and half == normalise_token("<0xD3>")


def test_shared_vocab_known_answer(toks):
    a, b = toks
    assert detect_scheme(a) == "byte_level" and detect_scheme(b) == "sentencepiece"
    sv = shared_vocab(a, b)
    assert sv.strings == ["<pad>", "<s>", "hello", " world", " the", "cat", "\n", " сәлем", "A"]
    assert sv.a_ids.tolist() == [1, 2, 3, 4, 5, 6, 8, 10, 11]
    assert sv.b_ids.tolist() == [1, 2, 3, 4, 5, 6, 8, 9, 10]  # "A" -> lowest id 10, not <0x41>=11
    assert sv.a_to_b[11] == 10 and sv.b_to_a[9] == 10
    assert sv.allowed_a == {1, 2, 3, 4, 5, 6, 8, 10, 11}
    assert 0 not in sv.allowed_a and 0 not in sv.allowed_b  # <unk> never shared
    rep = sv.report()
    assert rep["vocab_a"] == 12 and rep["vocab_b"] == 14
    assert rep["pct_increase"] == pytest.approx(100 * 2 / 12)
    assert rep["shared"] == 9
    assert rep["shared_pct_of_a"] == pytest.approx(75.0)
    assert rep["shared_pct_of_b"] == pytest.approx(100 * 9 / 14)
    assert rep["duplicates_b"] == 1 and rep["duplicates_a"] == 0


def test_shared_ratio(toks):
    a, b = toks
    sv = shared_vocab(a, b)
    assert shared_ratio("hello world", a, sv.allowed_a) == 1.0
    assert shared_ratio("hello cat", a, sv.allowed_a) == 0.5  # " cat" only in A
    assert shared_ratio("hello cat", b, sv.allowed_b) == 0.5  # " cat" is <unk> in B
    assert shared_ratio("cat sat world", b, sv.allowed_b) == pytest.approx(2 / 3)
    assert shared_ratio([3, 4, 0, 0], a, sv.a_ids) == 0.5
    assert shared_ratio("", a, sv.allowed_a) == 0.0


PROMPTS = [
    {"text": "hello world", "category": "x"},
    {"text": "hello world the", "category": "x"},
    {"text": "hello cat", "category": "x"},
    {"text": "cat сәлем", "category": "y"},
    {"text": "hello мен", "category": "y"},
    {"text": "cat sat world", "category": "y"},
]


def test_filter_prompts_known_survivors(toks):
    a, b = toks
    sv = shared_vocab(a, b)
    kept, rep = filter_prompts(PROMPTS, a, b, sv)
    assert [p["text"] for p in kept] == ["hello world", "hello world the", "cat сәлем"]
    assert rep["kept"] == 3 and rep["total"] == 6
    assert rep["by_category"] == {"x": {"kept": 2, "total": 3}, "y": {"kept": 1, "total": 3}}
    kept65, rep65 = filter_prompts(PROMPTS, a, b, sv, min_shared_ratio=0.65)
    assert [p["text"] for p in kept65] == ["hello world", "hello world the", "cat сәлем", "cat sat world"]
    assert rep65["by_category"]["y"] == {"kept": 2, "total": 3}
    kept_s, _ = filter_prompts(["hello world", "hello cat"], a, b, sv)
    assert kept_s == ["hello world"]


def test_filter_zero_survivors_names_ratio(toks):
    a, b = toks
    sv = shared_vocab(a, b)
    with pytest.raises(DataError) as ei:
        filter_prompts(["hello cat", "cat sat world"], a, b, sv, min_shared_ratio=1.0)
    msg = str(ei.value)
    assert "0.667" in msg and "--min_shared_ratio 0.66" in msg


def test_mask_logits_argmax_in_allowed(toks):
    a, b = toks
    sv = shared_vocab(a, b)
    torch.manual_seed(0)
    logits = torch.randn(4, 7, 12) * 5
    logits[..., 0] = 100.0  # the unmasked winner is outside the shared set
    masked = mask_logits(logits, sv.allowed_a)
    assert set(masked.argmax(-1).flatten().tolist()) <= sv.allowed_a
    assert torch.isneginf(masked[..., [0, 7, 9]]).all()
    assert torch.equal(masked[..., sv.a_ids], logits[..., sv.a_ids])
    # tensor ids and bool masks work as well
    assert torch.equal(mask_logits(logits, sv.a_ids), masked)


def test_shared_logits_common_order(toks):
    a, b = toks
    sv = shared_vocab(a, b)
    la = torch.arange(12.0)[None]
    lb = torch.arange(14.0)[None] + 100
    ga, gb = shared_logits(la, sv.a_ids), shared_logits(lb, sv.b_ids)
    assert ga.shape == gb.shape == (1, 9)
    assert ga[0, -1].item() == 11.0 and gb[0, -1].item() == 110.0  # both "A"
