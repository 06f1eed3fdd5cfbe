"""Multiple-choice scoring by per-token log-prob of each choice continuation."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

from mechdiff.errors import DataError
from mechdiff.analyses.behaviour.logprobs import continuation_logprobs


def mc_logprob(
    model: Any,
    tok: Any,
    items: Sequence[Mapping[str, Any]],
    allowed_ids: Any = None,
    format_fn: Callable[[Any], str] | None = None,
    batch_size: int = 16,
    choice_prefix: str | None = None,
) -> dict:
    """Multiple-choice scoring by per-token log-prob of each choice continuation.

    Items are ``{question, choices, answer}`` (answer = index). The prompt is ``format_fn(question)``;
    each choice is scored as a continuation (prefixed by ``choice_prefix``; default ``" "`` for raw
    text, ``""`` after a chat template). Returns ``{accuracy, delta, pred, correct, logp_per_token,
    n}`` (``delta`` = logp(correct) - mean logp(others), per token; ``logp_per_token`` one tensor per
    item) and, with ``allowed_ids``, ``masked`` = the same keys plus ``coverage`` (mean over all
    choices of the fraction of their tokens inside ``allowed_ids``).
    """
    items = list(items)
    if not items:
        raise DataError("mc_logprob got no items")
    for k, it in enumerate(items):
        ch = it.get("choices")
        if not isinstance(ch, (list, tuple)) or len(ch) < 2:
            raise DataError(f"MC item {k} needs a 'choices' list with >= 2 entries")
        a = it.get("answer")
        if not isinstance(a, int) or not 0 <= a < len(ch):
            raise DataError(f"MC item {k}: 'answer' must be an index into choices, got {a!r}")
    if choice_prefix is None:
        templated = bool(getattr(tok, "chat_template", None)) if format_fn is None else False
        choice_prefix = "" if templated else " "
    prompts, conts, owner = [], [], []
    for k, it in enumerate(items):
        for c in it["choices"]:
            prompts.append(it["question"])
            conts.append(choice_prefix + str(c))
            owner.append(k)
    r = continuation_logprobs(model, tok, prompts, conts, allowed_ids, format_fn, batch_size)

    def summarise_scores(per_tok: torch.Tensor) -> dict:
        per_item, deltas, preds, correct = [], [], [], []
        start = 0
        for it in items:
            c = len(it["choices"])
            s = per_tok[start : start + c]
            start += c
            per_item.append(s)
            a = it["answer"]
            others = torch.cat([s[:a], s[a + 1 :]])
            fin = others[torch.isfinite(others)]
            other_mean = fin.mean() if fin.numel() else torch.tensor(float("-inf"), dtype=s.dtype)
            deltas.append(s[a] - other_mean)
            p = int(torch.argmax(s)) if torch.isfinite(s).any() else -1
            preds.append(p)
            correct.append(p == a)
        correct_t = torch.tensor(correct)
        return {
            "accuracy": float(correct_t.double().mean()),
            "delta": torch.stack(deltas),
            "pred": torch.tensor(preds, dtype=torch.long),
            "correct": correct_t,
            "logp_per_token": per_item,
            "n": len(items),
        }

    out = summarise_scores(r["mean"])
    if allowed_ids is not None:
        masked = summarise_scores(r["mean_masked"])
        masked["coverage"] = float(r["coverage"].mean())
        out["masked"] = masked
    return out
