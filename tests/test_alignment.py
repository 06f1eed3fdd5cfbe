"""Aligning two tokenizations of one text by character offsets (mechdiff.texts.alignment).

Crafted tokenizations (pure Python, fast) for each case the module handles, then the real SmolLM2
and Gemma-3 tokenizers on a few texts."""
from __future__ import annotations

import pytest

from mechdiff.errors import DataError
from mechdiff.texts.alignment import Tokenization, align, align_regions, tokenize_text


def tk(text, pieces, special=()):
    """Tokenization of ``text`` from ``[(start, end)]`` (ids = positions; ``special``: indices)."""
    return Tokenization(text, list(range(len(pieces))), list(pieces), [i in special for i in range(len(pieces))])


def span_texts(al, text):
    return [text[s:e] for s, e in al.spans]


def test_identical_tokenizations_give_one_span_per_token():
    t = "Hello world"
    a = tk(t, [(0, 5), (5, 11)])
    al = align(a, tk(t, [(0, 5), (5, 11)]))
    assert al.spans == [(0, 5), (5, 11)] and al.a_tokens == [(0, 1), (1, 2)] == al.b_tokens
    assert al.coverage == 1.0


def test_shortest_shared_spans():
    t = "unbelievable"
    a = tk(t, [(0, 2), (2, 7), (7, 12)])        # un|belie|vable
    b = tk(t, [(0, 4), (4, 7), (7, 9), (9, 12)])  # unbe|lie|va|ble
    al = align(a, b)
    assert span_texts(al, t) == ["unbelie", "vable"]
    assert al.a_tokens == [(0, 2), (2, 3)] and al.b_tokens == [(0, 2), (2, 4)]


def test_bos_on_one_side_only_takes_no_part():
    t = "Hi there"
    a = tk(t, [(0, 0), (0, 2), (2, 8)], special={0})     # BOS (zero width, special)
    b = tk(t, [(0, 2), (2, 8)])
    al = align(a, b)
    assert span_texts(al, t) == ["Hi", " there"]
    assert al.a_tokens == [(1, 2), (2, 3)] and al.b_tokens == [(0, 1), (1, 2)]


def test_nonspecial_zero_width_token_joins_a_span():
    t = "ab"
    a = tk(t, [(0, 1), (1, 1), (1, 2)])
    al = align(a, tk(t, [(0, 1), (1, 2)]))
    assert al.coverage == 1.0 and sum(e - s for s, e in al.a_tokens) == 3   # every token in some span


def test_multibyte_character_split_over_byte_tokens():
    # "Қа": byte-level gives two tokens for "Қ" with the same offsets (0, 1), then "а"
    t = "Қа"
    a = tk(t, [(0, 1), (0, 1), (1, 2)])
    b = tk(t, [(0, 2)])
    al = align(a, b)
    assert span_texts(al, t) == ["Қа"] and al.a_tokens == [(0, 3)]
    # a token running into the next one's character: no boundary inside it
    t2 = " 日本"
    a2 = tk(t2, [(0, 2), (1, 2), (1, 2), (2, 3)])
    b2 = tk(t2, [(0, 1), (1, 2), (2, 3)])
    al2 = align(a2, b2)
    assert span_texts(al2, t2) == [" 日", "本"] and al2.b_tokens == [(0, 2), (2, 3)]


def test_space_left_out_of_offsets_still_aligns():
    t = "Hello world"
    a = tk(t, [(0, 5), (5, 11)])         # byte-level: " world" holds its space
    b = tk(t, [(0, 5), (6, 11)])         # SentencePiece: "▁world" offsets skip the space
    al = align(a, b)
    assert span_texts(al, t) == ["Hello", " world"] and al.coverage == 1.0


def from_pieces(pieces, special=()):
    """Tokenization whose tokens are ``pieces`` (the text is their concatenation)."""
    offs, pos = [], 0
    for p in pieces:
        offs.append((pos, pos + len(p)))
        pos += len(p)
    return tk("".join(pieces), offs, special)


def test_chat_templates_differ_align_only_the_shared_regions():
    a = from_pieces(["<s>", "user:", " ", "Hi", " there", "</s>", "assistant:", " ", "Fine", "."], special={0, 5})
    b = from_pieces(["<start>", "Hi", " the", "re", "<end>", "<model>", "Fi", "ne."], special={0, 4, 5})
    ta, tb = a.text, b.text
    ra = [(ta.index("Hi"), ta.index("Hi") + 8), (ta.index("Fine"), len(ta))]
    rb = [(tb.index("Hi"), tb.index("Hi") + 8), (tb.index("Fine"), len(tb))]
    al = align_regions(a, b, ra, rb)
    assert span_texts(al, ta) == ["Hi", " there", "Fine."]
    assert al.a_tokens == [(3, 4), (4, 5), (8, 10)] and al.b_tokens == [(1, 2), (2, 4), (6, 8)]
    assert al.coverage == 1.0


def test_token_straddling_a_region_edge_is_left_out():
    ta = "user:Hi there"
    a = tk(ta, [(0, 4), (4, 7), (7, 13)])      # ":Hi" straddles the content start
    tb = "Hi there"
    b = tk(tb, [(0, 2), (2, 8)])
    al = align(a, b, (5, 13), (0, 8))
    assert span_texts(al, ta) == [" there"] and al.coverage == pytest.approx(6 / 8)


def test_regions_with_different_text_raise():
    with pytest.raises(DataError, match="different text"):
        align(tk("ab", [(0, 2)]), tk("ac", [(0, 2)]))


def test_offsets_that_do_not_cover_the_text_raise():
    t = "café"
    a = tk(t, [(0, 3)])                      # a normaliser dropped the accented character
    with pytest.raises(DataError, match="uncovered"):
        align(a, tk(t, [(0, 4)]))


def test_slow_tokenizer_raises():
    class Slow:
        is_fast = False
    with pytest.raises(DataError, match="fast tokenizer"):
        tokenize_text(Slow(), "hi")


# ---------------------------------------------------------------- real tokenizers
TEXTS = ["The quick brown fox jumps over the lazy dog.",
         "Наурыз мейрамы туралы қысқаша айтып беріңізші.",
         "Hello  wörld — Қазақстан 日本 ok\n\n1234 + 5678 = ?"]


@pytest.fixture(scope="module")
def real_tokenizers():
    from mechdiff.models.load import _prepare_tokenizer
    from mechdiff.models.testbed import ensure_testbed
    from transformers import AutoTokenizer
    return [_prepare_tokenizer(AutoTokenizer.from_pretrained(str(ensure_testbed(n))))
            for n in ("smollm2-135m", "gemma3-270m")]


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_vs_gemma3_tokenizers(real_tokenizers, text):
    ta, tb = (tokenize_text(t, text) for t in real_tokenizers)
    assert tb.special[0] and not any(ta.special)            # Gemma adds a BOS, SmolLM2 does not
    al = align(ta, tb)
    assert al.coverage == 1.0                                # the whole text sits in spans
    # spans tile the text, in order, each with at least one token per side
    assert al.spans[0][0] == 0 and al.spans[-1][1] == len(text)
    assert all(x[1] == y[0] for x, y in zip(al.spans, al.spans[1:]))
    for (a0, a1), (b0, b1) in zip(al.a_tokens, al.b_tokens):
        assert a1 > a0 and b1 > b0
    # every non-special token of each side falls in exactly one span
    for tok, groups in ((ta, al.a_tokens), (tb, al.b_tokens)):
        members = [i for g in groups for i in range(*g)]
        assert sorted(members) == [i for i, s in enumerate(tok.special) if not s]
    # the span text is what the tokens decode to (up to the space SentencePiece leaves out)
    for (s, e), (b0, b1) in zip(al.spans, al.b_tokens):
        assert real_tokenizers[1].decode(tb.ids[b0:b1]).strip() == text[s:e].strip()
