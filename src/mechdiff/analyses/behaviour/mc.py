"""Multiple choice: one scorer (:func:`score_choices`) under two readouts.

- :func:`mc_logprob` (the behaviour table): each choice scored as a continuation of the question,
  per-token log-prob.
- :func:`mc_scores` (side effects under a patch): the question with lettered choices
  (:func:`mc_prompt`), next-token log-prob of each letter at the end of the prompt.

Both reduce per-choice scores with :func:`score_choices`: prediction = argmax, delta =
score(correct) - mean score of the other choices (non-finite ones left out of the mean).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

from mechdiff.errors import DataError
from mechdiff.fairness import mask_logits
from mechdiff.analyses.behaviour.logprobs import continuation_logprobs

LETTERS = "ABCDEFGH"


def check_items(items: Sequence[Mapping[str, Any]]) -> list:
    """MC items ``{question, choices, answer}`` (answer = index into choices); DataError otherwise."""
    items = list(items)
    if not items:
        raise DataError("no multiple-choice items to score")
    for k, it in enumerate(items):
        ch = it.get("choices")
        if not isinstance(ch, (list, tuple)) or len(ch) < 2:
            raise DataError(f"MC item {k} needs a 'choices' list with >= 2 entries")
        a = it.get("answer")
        if not isinstance(a, int) or not 0 <= a < len(ch):
            raise DataError(f"MC item {k}: 'answer' must be an index into choices, got {a!r}")
    return items


def score_choices(scores: Sequence[torch.Tensor], answers: Sequence[int]) -> dict:
    """The one MC scorer. ``scores[i]``: ``[C_i]`` score per choice of item i (higher = preferred,
    -inf = impossible); ``answers[i]``: the correct index.

    Returns ``{accuracy, delta [N], pred [N] (-1 when every choice is -inf), correct [N] bool,
    scores, n}``; ``delta`` = score(correct) - mean of the finite other scores (non-finite when the
    correct choice or all others are impossible; means over items skip those).
    """
    deltas, preds = [], []
    for s, a in zip(scores, answers):
        others = torch.cat([s[:a], s[a + 1:]])
        fin = others[torch.isfinite(others)]
        other_mean = fin.mean() if fin.numel() else torch.tensor(float("-inf"), dtype=s.dtype)
        deltas.append(s[a] - other_mean)
        preds.append(int(torch.argmax(s)) if torch.isfinite(s).any() else -1)
    pred = torch.tensor(preds, dtype=torch.long)
    correct = pred == torch.tensor(list(answers), dtype=torch.long)
    return {"accuracy": float(correct.double().mean()), "delta": torch.stack(deltas), "pred": pred,
            "correct": correct, "scores": list(scores), "n": len(pred)}


def mean_finite(t: torch.Tensor) -> float:
    """Mean over the finite entries (nan when there are none)."""
    t = t.double().flatten()
    t = t[torch.isfinite(t)]
    return float(t.mean()) if t.numel() else float("nan")


# ----------------------------------------------------------------------------- continuation readout

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
    items = check_items(items)
    if choice_prefix is None:
        templated = bool(getattr(tok, "chat_template", None)) if format_fn is None else False
        choice_prefix = "" if templated else " "
    prompts = [it["question"] for it in items for _ in it["choices"]]
    conts = [choice_prefix + str(c) for it in items for c in it["choices"]]
    r = continuation_logprobs(model, tok, prompts, conts, allowed_ids, format_fn, batch_size)
    sizes = [len(it["choices"]) for it in items]
    answers = [it["answer"] for it in items]

    def summary(per_tok: torch.Tensor) -> dict:
        out = score_choices(list(torch.split(per_tok, sizes)), answers)
        out["logp_per_token"] = out.pop("scores")
        return out

    out = summary(r["mean"])
    if allowed_ids is not None:
        out["masked"] = dict(summary(r["mean_masked"]), coverage=float(r["coverage"].mean()))
    return out


# ----------------------------------------------------------------------------- letter readout

def mc_prompt(item: Mapping[str, Any]) -> dict:
    """An MC item as a prompt whose answer is one letter."""
    lines = [item["question"]] + [f"{LETTERS[i]}) {c}" for i, c in enumerate(item["choices"])]
    return {"id": item["id"], "text": "\n".join(lines) + "\nAnswer with the letter only."}


def letter_ids(tok: Any, n: int) -> torch.Tensor:
    """Token id of each of the first ``n`` answer letters (first token of the letter alone)."""
    return torch.tensor([tok.encode(LETTERS[i], add_special_tokens=False)[0] for i in range(n)])


def mc_scores(logits: torch.Tensor, items: Sequence[Mapping[str, Any]], tok: Any, allowed_ids: Any = None
              ) -> dict:
    """Letter readout from next-token logits ``[B, V]`` at the end of each :func:`mc_prompt`
    (masked to ``allowed_ids`` and renormalised when given): ``{dlogp_correct, accuracy}`` with
    ``dlogp_correct`` the mean over items of :func:`score_choices`' delta."""
    logits = logits.float()
    if allowed_ids is not None:
        logits = mask_logits(logits, allowed_ids)
    lp = logits.log_softmax(-1)
    ids = letter_ids(tok, max(len(it["choices"]) for it in items)).to(lp.device)
    scores = [lp[i, ids[:len(it["choices"])]].cpu() for i, it in enumerate(items)]
    out = score_choices(scores, [int(it["answer"]) for it in items])
    return {"dlogp_correct": mean_finite(out["delta"]), "accuracy": out["accuracy"]}
