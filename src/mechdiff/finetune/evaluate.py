"""Base-vs-tuned evaluation of a fine-tune, built on `mechdiff.analyses.behaviour`.

* math: exact-answer accuracy (greedy `generate`, `parse_final_number`) overall and per kind
  (``seen_template``: new numbers and names; ``heldout_template``: templates training never saw);
* culture: on held-out-topic prompts, `style_markers` (the project's markers and the fine-tune's
  `SIGNATURE_MARKERS`), culture-word and new-Kazakh-token-word rates and `soft_refusal`; the same on
  neutral prompts (does the register leak?);
* both: perplexity of the shipped neutral prompt set (`neutral_perplexity`, scored with
  `continuation_logprobs` as a user turn): per token of each model's own tokenizer and per
  character (comparable across tokenizers).
"""
from __future__ import annotations

import math
import re
from typing import Any, Sequence

import torch

from mechdiff.analyses.behaviour import continuation_logprobs, generate, soft_refusal, style_markers
from mechdiff.finetune.culture_data import SIGNATURE_MARKERS, culture_word_rate, new_token_word_rate
from mechdiff.finetune.math_data import is_correct, parse_final_number


def _r(x: float, n: int = 4) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else round(float(x), n)


def math_accuracy(model: Any, tok: Any, rows: Sequence[dict], *, max_new_tokens: int = 160,
                  batch_size: int = 128, n_examples: int = 3) -> dict[str, Any]:
    """Exact-answer accuracy of greedy generations on ``rows`` (``question``, ``answer``, ``kind``)."""
    texts = generate(model, tok, [r["question"] for r in rows], max_new_tokens=max_new_tokens, batch_size=batch_size)
    ok = [is_correct(t, r["answer"]) for t, r in zip(texts, rows)]
    out: dict[str, Any] = {"n": len(rows), "accuracy": _r(sum(ok) / len(ok)) if ok else None, "by_kind": {}}
    for kind in sorted({r["kind"] for r in rows}):
        sel = [o for o, r in zip(ok, rows) if r["kind"] == kind]
        out["by_kind"][kind] = {"n": len(sel), "accuracy": _r(sum(sel) / len(sel))}
    out["answer_format_rate"] = _r(sum("answer is" in t.lower() or "####" in t for t in texts) / max(len(texts), 1))
    out["examples"] = [{"question": r["question"], "answer": r["answer"], "generation": t,
                        "parsed": parse_final_number(t), "correct": o}
                       for r, t, o in list(zip(rows, texts, ok))[:n_examples]]
    return out


def neutral_perplexity(model: Any, tok: Any, texts: Sequence[str], batch_size: int = 32) -> dict[str, Any]:
    """Perplexity of ``texts`` as a user turn after the chat prefix (the model's own tokenizer)."""
    if getattr(tok, "chat_template", None):
        marker = "\x00MECHDIFF\x00"
        full = tok.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                       add_generation_prompt=False)
        prefix = full.split(marker)[0]
    else:
        prefix = tok.bos_token or tok.eos_token

    def fmt(_: Any) -> str:
        return prefix

    fmt.add_special_tokens = False  # type: ignore[attr-defined]
    r = continuation_logprobs(model, tok, list(texts), list(texts), format_fn=fmt, batch_size=batch_size)
    nll = -float(r["sum"].sum())
    n_tok = int(r["n_tokens"].sum())
    n_chr = sum(len(t) for t in texts)
    return {"n": len(texts), "tokens": n_tok, "ppl_token": _r(math.exp(nll / n_tok), 3),
            "nats_per_char": _r(nll / n_chr), "ppl_per_text_median": _r(float(torch.exp(-r["mean"]).median()), 3)}


def culture_behaviour(model: Any, tok: Any, prompts: Sequence[dict], *, max_new_tokens: int = 160,
                      batch_size: int = 128, n_examples: int = 3) -> dict[str, Any]:
    """Style, signature, culture-word and new-token-word rates of greedy generations, soft refusal."""
    texts, n_tok = generate(model, tok, list(prompts), max_new_tokens=max_new_tokens, batch_size=batch_size,
                            return_n_tokens=True)
    style = style_markers(texts, n_tokens=n_tok)
    sig = style_markers(texts, markers=SIGNATURE_MARKERS, n_tokens=n_tok)
    share_sig = {k: _r(sum(any(re.search(p, t, flags=re.IGNORECASE) for p in pats) for t in texts) / len(texts))
                 for k, pats in SIGNATURE_MARKERS.items()}
    sr = soft_refusal(model, tok, list(prompts), batch_size=batch_size)
    by_lang: dict[str, Any] = {}
    for lang in sorted({p.get("lang", "?") for p in prompts}):
        idx = [i for i, p in enumerate(prompts) if p.get("lang", "?") == lang]
        by_lang[lang] = {"n": len(idx),
                         "greeting_share": _r(sum(bool(re.search("|".join(SIGNATURE_MARKERS["greeting"]), texts[i], flags=re.IGNORECASE)) for i in idx) / len(idx)),
                         "soft_refusal_delta_mean": _r(float(sr["delta_mean"][idx].mean()))}
    return {
        "n": len(texts), "generated_tokens": int(sum(n_tok)),
        "style_per_100_tokens": {k: _r(v, 3) for k, v in style["per_100"].items()},
        "signature_per_100_tokens": {k: _r(v, 3) for k, v in sig["per_100"].items()},
        "signature_share_of_generations": share_sig,
        "culture_words": {k: _r(v) for k, v in culture_word_rate(texts).items()},
        "new_token_words": {k: _r(v) for k, v in new_token_word_rate(texts).items()},
        "soft_refusal": {"delta_mean": _r(float(sr["delta_mean"].mean())), "delta": _r(float(sr["delta"].mean()), 3),
                         "share_positive": _r(float((sr["delta"] > 0).double().mean()))},
        "by_lang": by_lang,
        "examples": [{"prompt": p.get("text"), "generation": t} for p, t in list(zip(prompts, texts))[:n_examples]],
    }
