"""Known answer of the tokens stage on a trained pair: smollm2-culture-lora vs its base.

The fine-tune was trained to answer in a Kazakh cultural register (greetings such as "Сәлеметсіз бе,
құрметті қонақ!" / "dear guest", closings with "Рахмет"). The test: over both models' greedy
responses to held-out culture prompts, the words holding the 20 most divergent response tokens
(KL(base || tuned), shared vocabulary) are words of that register (the training data's greetings and
closings) far more often than the words of all response tokens are, and never words of a neutral
word list (the shipped neutral prompt set's vocabulary) more often than all response tokens are.
Measured once (8 prompts, 24 new tokens): 90% register vs 43% overall; neutral 0% vs 9%."""
from __future__ import annotations

import json
import re

import pytest

import mechdiff
from mechdiff.finetune.culture_data import CLOSINGS, GREETINGS
from mechdiff.texts.result import load_texts
from mechdiff.texts.summaries import response_rows

pytestmark = pytest.mark.real


def _word(text: str, s: int, e: int) -> str:
    """The whole word(s) a row's characters touch, lower-cased ('' for punctuation or space only)."""
    while s < e and not text[s].isalnum():
        s += 1
    while e > s and not text[e - 1].isalnum():
        e -= 1
    if e <= s:
        return ""
    while s > 0 and text[s - 1].isalnum():
        s -= 1
    while e < len(text) and text[e].isalnum():
        e += 1
    return text[s:e].lower()


def _words(texts) -> set[str]:
    return {w.lower() for t in texts for w in re.findall(r"\w+", t)}


def test_most_divergent_response_tokens_are_the_fine_tunes_register(smollm2_loaded, tmp_path):
    from mechdiff.experiments import run_stage
    from mechdiff.models.load import load_model
    from mechdiff.pairs import load_pair
    pair = load_pair("smollm2-culture-lora")
    tuned = load_model(pair.tuned, dtype="float32", device="cpu")
    prompts = f"{mechdiff.__path__[0]}/finetune/sets/culture_eval.jsonl"
    run = run_stage("tokens", pair, out=tmp_path / "run", models=(smollm2_loaded, tuned), device="cpu",
                    batch_size=8, prompts=prompts, n_prompts=6, max_new_tokens=16, n_neutral=0, lens_tokens=0,
                    response_k=2, patch_layers=[0, 29])
    # the tuned tokenizer extends the base's: RQ1's response readout runs on the base's tokenization
    rp = json.loads((run.path / "response_patch.json").read_text())
    assert rp["ids"] == "base ids" and "base's tokenization" in rp["summary"]
    assert {(r["responder"], r["direction"], r["layer"]) for r in rp["table"]} == {
        (w, d, l) for w in ("base", "tuned") for d in ("base->tuned", "tuned->base") for l in (0, 29)}
    assert all(r["patch_kl"] >= 0 and r["gap"] > 0 and r["n_texts"] == 6 for r in rp["table"])
    # the last layer's state written across gives the source's output over the shared vocabulary
    assert all(abs(r["share_closed"] - 1) < 1e-6 for r in rp["table"] if r["layer"] == 29)
    texts = [t for t in load_texts(run.path) if t.summary.responder]
    assert texts and all(t.summary.unit == "span" and t.summary.coverage == 1.0 for t in texts)
    rows = [(r, _word(t.summary.text, r.start, r.end)) for t in texts for r in response_rows(t)]
    rows = sorted(((r, w) for r, w in rows if w), key=lambda x: -x[0].kl_bt)
    register = _words(x for d in (GREETINGS, CLOSINGS) for lines in d.values() for x in lines)
    neutral = _words(json.loads(l)["text"] for l in open(f"{mechdiff.__path__[0]}/data/sets/neutral.jsonl",
                                                         encoding="utf-8") if l.strip())
    top = rows[:20]

    def share(sel, vocab):
        return sum(w in vocab for _, w in sel) / len(sel)
    assert share(top, register) >= share(rows, register) + 0.25, (share(top, register), share(rows, register))
    assert share(top, neutral) <= share(rows, neutral)
