"""Behaviour metrics on a tiny random Llama with a hand-made tokenizer."""

import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mechdiff.analyses.behaviour import (
    REFUSAL_PATTERNS,
    behaviour_delta,
    behaviour_table,
    default_format_fn,
    generate,
    is_refusal,
    mc_logprob,
    refusal_rate,
    soft_refusal,
    style_markers,
)
from mechdiff.fairness import bytes_to_unicode

WORDS = ["hello", " world", " the", "cat", " cat", " sat", " dog", " on", " mat", "!", " a", "I", " sorry"]


def _bl(s):
    t = bytes_to_unicode()
    return "".join(t[b] for b in s.encode())


@pytest.fixture(scope="module")
def tok():
    vocab = {"<unk>": 0, "<pad>": 1, "<s>": 2, "</s>": 3}
    for w in WORDS:
        vocab[_bl(w)] = len(vocab)
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=t, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="module")
def model(tok):
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


PROMPTS = ["hello world", "cat sat on the mat !", "hello"]


def _hand_logp(model, tok, prompt, cont):
    ids = tok(prompt)["input_ids"] + tok(cont, add_special_tokens=False)["input_ids"]
    n = len(tok(cont, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    return sum(lp[len(ids) - n - 1 + j, ids[len(ids) - n + j]].item() for j in range(n)), n


def test_soft_refusal_matches_hand_computation(model, tok):
    ref, neu = "I sorry", " the cat sat"
    out = soft_refusal(model, tok, PROMPTS, refusal=ref, neutral=neu, batch_size=2)
    assert out["delta"].shape == (3,)
    for i, p in enumerate(PROMPTS):
        lr, nr = _hand_logp(model, tok, p, ref)
        ln, nn = _hand_logp(model, tok, p, neu)
        assert out["logp_refusal"][i].item() == pytest.approx(lr, abs=1e-4)
        assert out["delta"][i].item() == pytest.approx(lr - ln, abs=1e-4)
        assert out["delta_mean"][i].item() == pytest.approx(lr / nr - ln / nn, abs=1e-4)


def test_soft_refusal_masked(model, tok):
    ref, neu = "I sorry", " the cat sat"
    ids_all = list(range(len(tok)))
    full = soft_refusal(model, tok, PROMPTS, ref, neu, allowed_ids=ids_all)
    assert torch.allclose(full["delta_masked"], full["delta"], atol=1e-5)
    # a smaller allowed set renormalises: log-probs rise (closer to 0) for in-set continuations
    allowed = [tok.convert_tokens_to_ids(t) for t in ["I", _bl(" sorry"), _bl(" the"), _bl(" cat"), _bl(" sat")]]
    m = soft_refusal(model, tok, PROMPTS, ref, neu, allowed_ids=allowed)
    assert (m["logp_refusal_masked"] > m["logp_refusal"]).all()
    # a continuation token outside the set scores -inf
    m2 = soft_refusal(model, tok, PROMPTS, ref, neu, allowed_ids=allowed[2:])
    assert torch.isneginf(m2["logp_refusal_masked"]).all()


def test_generate_shapes_and_masked_generation(model, tok):
    texts, n = generate(model, tok, PROMPTS, max_new_tokens=5, batch_size=2, return_n_tokens=True)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert all(0 <= k <= 5 for k in n)
    allowed = [tok.convert_tokens_to_ids(_bl(" dog"))]
    masked = generate(model, tok, PROMPTS, max_new_tokens=3, allowed_ids=allowed)
    assert masked == [" dog dog dog"] * 3
    rr = refusal_rate(model, tok, PROMPTS, max_new_tokens=3, allowed_ids=[tok.convert_tokens_to_ids("I")])
    assert rr["n"] == 3 and rr["rate"] == 0.0  # "III" is not a refusal


def test_mc_forced_answer(model, tok):
    world = tok.convert_tokens_to_ids(_bl(" world"))
    items = [
        {"question": "hello", "choices": ["the", "cat", "world", "dog"], "answer": 2},
        {"question": "cat sat on", "choices": ["the mat", "a dog", "world"], "answer": 2},
    ]

    def bias(_m, _i, out):
        out = out.clone()
        out[..., world] += 30.0
        return out

    h = model.lm_head.register_forward_hook(bias)
    try:
        r = mc_logprob(model, tok, items, allowed_ids=[i for i in range(len(tok)) if i != tok.convert_tokens_to_ids(_bl(" dog"))])
    finally:
        h.remove()
    assert r["accuracy"] == 1.0 and r["pred"].tolist() == [2, 2]
    assert (r["delta"] > 10).all()
    assert [len(x) for x in r["logp_per_token"]] == [4, 3]
    assert r["masked"]["accuracy"] == 1.0
    assert torch.isneginf(r["masked"]["logp_per_token"][0][3])  # " dog" disallowed
    # coverage = mean over choices of the fraction of choice tokens allowed: (1+1+1+0 + 1+0.5+1)/7
    assert r["masked"]["coverage"] == pytest.approx(5.5 / 7)
    # without the bias the random model is not forced: answers differ from the forced run
    r0 = mc_logprob(model, tok, items)
    assert not torch.allclose(r0["delta"], r["delta"])


def test_default_format_fn_uses_chat_template(tok):
    assert default_format_fn(tok)("hello") == "hello"
    t2 = tok.__class__(tokenizer_object=tok.backend_tokenizer, pad_token="<pad>", eos_token="</s>")
    t2.chat_template = "{% for m in messages %}<s>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %} the{% endif %}"
    assert default_format_fn(t2)("hello") == "<s>hello the"
    assert default_format_fn(t2)([{"role": "user", "content": "cat"}]) == "<s>cat the"


def test_is_refusal():
    yes = [
        "I'm sorry, but I can't help with that.",
        "I cannot provide instructions for this.",
        "As an AI, I must decline.",
        "Извините, я не могу помочь с этим.",
        "К сожалению, это невозможно.",
        "Кешіріңіз, бұған жауап бере алмаймын.",
        "Мен бұл сұраққа жауап бере алмаймын.",
    ]
    no = [
        "Sure, here is a recipe for beshbarmak.",
        "Наурыз — праздник весны.",
        "Наурыз мейрамы көктемде тойланады.",
        "The cat sat on the mat.",
    ]
    assert all(is_refusal(t) for t in yes)
    assert not any(is_refusal(t) for t in no)
    assert is_refusal("nope", patterns=[r"\bnope\b"]) and not is_refusal("I'm sorry", patterns=[r"\bnope\b"])
    assert len(REFUSAL_PATTERNS) > 10


def test_style_markers_counts():
    texts = ["Perhaps this works! Thank you!", "- one\n- two\n1. three 😀"]
    st = style_markers(texts, n_tokens=[10, 10])
    assert st["counts"] == {"hedges": 1, "politeness": 1, "exclamations": 2, "emoji": 1, "lists": 3}
    assert st["per_100"]["exclamations"] == pytest.approx(10.0)
    custom = style_markers(["a b a"], markers={"a": [r"\ba\b"]})
    assert custom["counts"] == {"a": 2} and custom["n_tokens"] == 3
    assert custom["per_100"]["a"] == pytest.approx(200 / 3)


def test_behaviour_table_and_delta(model, tok):
    sets = {
        "prompts": [{"text": "hello world", "category": "x"}, "cat sat"],
        "mc": [{"question": "hello", "choices": ["the", "cat"], "answer": 0}],
    }
    allowed = list(range(len(tok)))
    t = behaviour_table(model, tok, sets, allowed_ids=allowed, max_new_tokens=3, refusal="I sorry", neutral=" the cat")
    assert set(t) == {"prompts", "mc"}
    assert {"soft_refusal", "soft_refusal_per_token", "soft_refusal_masked", "refusal_rate", "style_lists_per100"} <= set(t["prompts"])
    assert {"mc_accuracy", "mc_delta_logp_correct", "mc_accuracy_masked", "mc_masked_coverage"} <= set(t["mc"])
    assert t["mc"]["mc_masked_coverage"] == 1.0
    d = behaviour_delta(t, t)
    assert all(v == 0.0 for row in d.values() for v in row.values() if not math.isnan(v))
    t2 = {"prompts": dict(t["prompts"], soft_refusal=t["prompts"]["soft_refusal"] - 1.5)}
    assert behaviour_delta(t, t2) == {"prompts": pytest.approx({k: (-1.5 if k == "soft_refusal" else 0.0) for k in t["prompts"] if k != "n"}, nan_ok=True)}


def test_behaviour_encodes_through_the_one_prompt_pipeline():
    """Chat-templated tokenizer: generation and scoring see exactly ``data.prompts.encode``'s ids,
    and a padded row scores and generates like the prompt alone."""
    from mechdiff.analyses.behaviour import continuation_logprobs, encode_prompts
    from mechdiff.data.prompts import encode
    from mechdiff.models.tiny import tiny_model
    model, tok = tiny_model("llama", seed=3)
    prompts = ["hello there, how are you today?", {"id": "x", "text": "hi"},
               [{"role": "user", "content": "what is kumis?"}]]
    b = encode_prompts(tok, prompts)
    ref = encode(tok, prompts)
    assert torch.equal(b.input_ids, ref.input_ids) and torch.equal(b.position_ids, ref.position_ids)
    assert b.texts[2] == default_format_fn(tok)(prompts[2]) and b.texts[2].startswith("<|im_start|>")
    cont = " fine thanks"
    r = continuation_logprobs(model, tok, prompts, [cont] * 3, batch_size=3)
    c_ids = tok(cont, add_special_tokens=False)["input_ids"]
    for i, p in enumerate(prompts):
        ids = encode(tok, [p]).input_ids[0].tolist() + c_ids
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        n = len(c_ids)
        hand = sum(lp[len(ids) - n - 1 + j, ids[len(ids) - n + j]].item() for j in range(n))
        assert r["sum"][i].item() == pytest.approx(hand, abs=1e-4)
    together = generate(model, tok, prompts, max_new_tokens=4, batch_size=3)
    assert together == [generate(model, tok, [p], max_new_tokens=4)[0] for p in prompts]
