"""data.prompts and data.positions: known answers on the tiny byte-level ChatML tokenizer."""
from __future__ import annotations


import pytest
import torch
from tokenizers import processors

from mechdiff.data.positions import content_mask, k_positions, last_content
from mechdiff.data.prompts import (Batch, batches, encode, format_prompt, load_jsonl, normalise_text,
                                   split)
from mechdiff.errors import DataError
from mechdiff.models.tiny import CHATML, SPECIALS, tiny_tokenizer

PROMPTS = [
    {"id": "a", "text": "What is the capital of France?"},
    {"id": "b", "text": "assistant"},                       # also appears in the template tail
    {"id": "c", "text": "Hi"},
    {"id": "d", "text": "Ends with a newline\n"},
    {"id": "e", "text": "Ünïcödé — 日本語"},
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _special_ids(tok):
    return set(tok.convert_tokens_to_ids(SPECIALS))


# ---- load_jsonl --------------------------------------------------------------------------------

def test_load_jsonl_reads_and_keeps_extra_fields(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"id": 1, "text": "one", "lang": "en"}\n\n'
                 '{"id": "x", "messages": [{"role": "system", "content": "s"}, '
                 '{"role": "user", "content": "two"}], "category": "c"}\n')
    out = load_jsonl(p)
    assert [o["id"] for o in out] == ["1", "x"]
    assert out[0]["lang"] == "en" and out[1]["category"] == "c"
    assert out[1]["text"] == "two"  # defaults to the last user message


@pytest.mark.parametrize("bad, what", [
    ('{"id": "b", "text": "ok"', "line 2"),            # truncated JSON
    ('{"text": "no id"}', "line 2"),
    ('{"id": "b"}', "line 2"),                         # no text
    ('["not", "an", "object"]', "line 2"),
    ('{"id": "a", "text": "dup"}', "duplicate id"),
])
def test_load_jsonl_errors_name_the_line(tmp_path, bad, what):
    p = tmp_path / "p.jsonl"
    p.write_text('{"id": "a", "text": "fine"}\n' + bad + "\n")
    with pytest.raises(DataError) as e:
        load_jsonl(p)
    assert what in str(e.value).replace(f"{p}:", "line ")


# ---- format_prompt / encode --------------------------------------------------------------------

def test_format_prompt_span_is_the_content(tok):
    for p in PROMPTS:
        text, (s, e) = format_prompt(tok, p)
        assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")
        assert text[s:e] == p["text"]
    text, span = format_prompt(tok, PROMPTS[0], chat=False)
    assert text == PROMPTS[0]["text"] and span == (0, len(text))


def test_format_prompt_system_and_repeated_content(tok):
    p = {"id": "s", "text": "same words"}
    text, (s, e) = format_prompt(tok, p, system="same words")
    assert text.count("same words") == 2
    assert text[s:e] == "same words" and s > text.index("user")  # the user's, not the system's


def test_decision_is_last_content_token(tok):
    b = encode(tok, PROMPTS)
    specials = _special_ids(tok)
    T = b.input_ids.shape[1]
    for i, p in enumerate(PROMPTS):
        d = int(b.decision[i])
        assert b.attention_mask[i, d] == 1
        assert int(b.input_ids[i, d]) not in specials
        # The content tokens decode to exactly the content; the decision is the last of them.
        cm = b.content[i]
        assert tok.decode(b.input_ids[i][cm]) == p["text"]
        assert d == int(cm.nonzero().max())
        # Everything after the decision is template tail: <|im_end|>\n<|im_start|>assistant\n
        assert tok.decode(b.input_ids[i, d + 1:]) == "<|im_end|>\n<|im_start|>assistant\n"
        assert tok.decode(b.input_ids[i, :d + 1]).endswith(p["text"])
        n = int(b.attention_mask[i].sum())
        assert (b.attention_mask[i, :T - n] == 0).all()  # left padding
        assert torch.equal(b.position_ids[i, T - n:], torch.arange(n))
        assert (b.position_ids[i, :T - n] == 0).all()
    assert b.ids == [p["id"] for p in PROMPTS]
    assert torch.equal(last_content(b), b.decision)


def test_decision_raw_text_is_last_real_token(tok):
    b = encode(tok, PROMPTS, chat=False)
    assert (b.decision == b.input_ids.shape[1] - 1).all()
    for i, p in enumerate(PROMPTS):
        assert tok.decode(b.input_ids[i][b.attention_mask[i].bool()]) == p["text"]


def test_multi_turn_messages_use_last_user_message(tok):
    p = {"id": "m", "messages": [{"role": "user", "content": "first question"},
                                 {"role": "assistant", "content": "an answer"},
                                 {"role": "user", "content": "second"}]}
    b = encode(tok, [p])
    assert tok.decode(b.input_ids[0][b.content[0]]) == "second"
    assert "first question" in b.texts[0]


def _bos_tokenizer(with_template_bos: bool):
    t = tiny_tokenizer()
    bos = t.convert_tokens_to_ids("<bos>")
    t.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", bos)])
    if with_template_bos:
        t.chat_template = "{{ bos_token }}" + CHATML
    return t, bos


def test_no_double_bos(tok):
    t, bos = _bos_tokenizer(with_template_bos=True)
    assert t("x")["input_ids"][0] == bos  # this tokenizer adds BOS by itself
    b = encode(t, PROMPTS[:2])
    for i in range(2):
        real = b.input_ids[i][b.attention_mask[i].bool()]
        assert int(real[0]) == bos and int((real == bos).sum()) == 1
        assert int(b.input_ids[i, b.decision[i]]) != bos
    # Raw text: the tokenizer's own BOS is added once and is not content.
    b = encode(t, PROMPTS[:2], chat=False)
    for i in range(2):
        real = b.input_ids[i][b.attention_mask[i].bool()]
        assert int(real[0]) == bos and int((real == bos).sum()) == 1
        assert not b.content[i][b.input_ids[i] == bos].any()
        assert tok.decode(b.input_ids[i][b.content[i]]) == PROMPTS[i]["text"]


def test_max_length_raises(tok):
    with pytest.raises(DataError, match="max_length"):
        encode(tok, PROMPTS, max_length=10)


def test_strings_and_empty(tok):
    b = encode(tok, ["abc", "de"])
    assert b.ids == ["0", "1"]
    with pytest.raises(DataError):
        encode(tok, [])


# ---- split / batches ---------------------------------------------------------------------------

def _many(n):
    return [{"id": f"p{i}", "text": f"prompt number {i}"} for i in range(n)]


def test_split_deterministic_disjoint():
    ps = _many(50) + [{"id": "dup1", "text": "PROMPT   number 3"},   # same normalised text as p3
                      {"id": "dup2", "text": "Prompt number 7 "}]
    tr, va = split(ps, 30, 15, seed=1)
    tr2, va2 = split(list(reversed(ps)), 30, 15, seed=1)
    assert len(tr) == 30 and len(va) == 15
    assert {p["id"] for p in tr} & {p["id"] for p in va} == set()
    norm = lambda xs: {normalise_text(p["text"]) for p in xs}
    assert norm(tr) & norm(va) == set()
    assert len(norm(tr)) == 30 and len(norm(va)) == 15
    assert [normalise_text(p["text"]) for p in tr] == [normalise_text(p["text"]) for p in tr2]
    assert [p["id"] for p in tr] == [p["id"] for p in split(ps, 30, 15, seed=1)[0]]
    assert [p["id"] for p in tr] != [p["id"] for p in split(ps, 30, 15, seed=2)[0]]
    tr3, va3 = split(ps, 30, None, seed=1)
    assert len(va3) == 20


def test_split_errors():
    with pytest.raises(DataError, match="not enough"):
        split(_many(10), 8, 5, seed=0)
    with pytest.raises(DataError, match="duplicate"):
        split(_many(5) + [{"id": "p0", "text": "other"}], 2, 2, seed=0)


def test_batches():
    assert [len(b) for b in batches(list(range(10)), 4)] == [4, 4, 2]
    with pytest.raises(DataError):
        list(batches([1], 0))


# ---- positions ---------------------------------------------------------------------------------

def test_k_positions_eligible_sorted_deterministic(tok):
    b = encode(tok, PROMPTS)
    specials = _special_ids(tok)
    m = 2
    idx, valid = k_positions(b, 4, exclude_last=m, seed=3)
    assert idx.shape == valid.shape == (len(PROMPTS), 4)
    cm = content_mask(b)
    for i in range(len(PROMPTS)):
        content_pos = cm[i].nonzero().flatten()
        eligible = set(content_pos[:len(content_pos) - m].tolist())
        got = idx[i][valid[i]].tolist()
        assert got == sorted(got) and len(set(got)) == len(got)
        assert set(got) <= eligible
        assert len(got) == min(4, len(eligible))
        assert (idx[i][~valid[i]] == -1).all()
        assert all(b.attention_mask[i, j] == 1 and int(b.input_ids[i, j]) not in specials for j in got)
    # "Hi" has 2 content tokens, both excluded: no valid slot.
    assert not valid[2].any()
    idx2, valid2 = k_positions(b, 4, exclude_last=m, seed=3)
    assert torch.equal(idx, idx2) and torch.equal(valid, valid2)
    idx3, _ = k_positions(b, 4, exclude_last=m, seed=4)
    assert not torch.equal(idx, idx3)


def test_k_positions_do_not_depend_on_batching(tok):
    full = encode(tok, PROMPTS)
    idx, valid = k_positions(full, 3, exclude_last=1, seed=0)
    real = torch.where(valid, full.position_ids.gather(1, idx.clamp_min(0)), -1)
    for i, p in enumerate(PROMPTS):
        one = encode(tok, [p])
        j, v = k_positions(one, 3, exclude_last=1, seed=0)
        assert torch.equal(torch.where(v, one.position_ids.gather(1, j.clamp_min(0)), -1)[0], real[i])


def test_k_positions_k_larger_than_T(tok):
    b = encode(tok, ["ab"], chat=False)
    idx, valid = k_positions(b, 5)
    assert idx.tolist() == [[0, 1, -1, -1, -1]] and valid.tolist() == [[True, True] + [False] * 3]


def test_content_mask_fallback_without_content():
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    b = Batch(ids, mask, (mask.cumsum(-1) - 1).clamp_min(0) * mask, torch.tensor([3, 4]))
    assert content_mask(b).tolist() == [[False, False, True, True, False], [True] * 5]


def test_chat_message_list_is_a_prompt(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    b = encode(tok, [msgs, "Hi"])
    ref = encode(tok, [{"id": "0", "text": "Hi", "messages": msgs}, "Hi"])
    assert torch.equal(b.input_ids, ref.input_ids) and b.ids == ["0", "1"]
    assert "Be brief." in b.texts[0] and b.texts[0] != b.texts[1]
    assert b.input_ids[0, b.decision[0]] == b.input_ids[1, b.decision[1]]   # last token of "Hi" in both
    with pytest.raises(DataError, match="no user message"):
        encode(tok, [[{"role": "system", "content": "s"}]])
