"""One behaviour table per model (refusal, style, MC per prompt set) and the tuned - base delta."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from mechdiff.errors import DataError
from mechdiff.analyses.behaviour.generation import generate
from mechdiff.analyses.behaviour.mc import mc_logprob, mean_finite
from mechdiff.analyses.behaviour.refusal import is_refusal, soft_refusal
from mechdiff.analyses.behaviour.style import style_markers


def behaviour_table(
    model: Any,
    tok: Any,
    sets: Mapping[str, Sequence[Any]],
    allowed_ids: Any = None,
    max_new_tokens: int = 32,
    format_fn: Callable[[Any], str] | None = None,
    batch_size: int = 16,
    generate_text: bool = True,
    refusal: str = "I'm sorry, but I can't help with that.",
    neutral: str = "Sure, here is",
) -> dict:
    """One small table per model: ``{set name: {metric: float}}``.

    A set of MC items (dicts with ``choices``) gives accuracy and delta-log-prob(correct) per token;
    a prompt set gives soft refusal (sum and per-token) and, with ``generate_text``, the binary
    refusal rate and style markers per 100 tokens (unmasked generation). With ``allowed_ids`` the
    masked diagnostics are added with a ``_masked`` suffix.
    """
    table: dict[str, dict[str, float]] = {}
    for name, data in sets.items():
        data = list(data)
        if not data:
            raise DataError(f"behaviour set {name!r} is empty")
        row: dict[str, float] = {"n": float(len(data))}
        if isinstance(data[0], Mapping) and "choices" in data[0]:
            mc = mc_logprob(model, tok, data, allowed_ids, format_fn, batch_size)
            row["mc_accuracy"] = mc["accuracy"]
            row["mc_delta_logp_correct"] = mean_finite(mc["delta"])
            if "masked" in mc:
                row["mc_accuracy_masked"] = mc["masked"]["accuracy"]
                row["mc_delta_logp_correct_masked"] = mean_finite(mc["masked"]["delta"])
                row["mc_masked_coverage"] = mc["masked"]["coverage"]
        else:
            sr = soft_refusal(model, tok, data, refusal, neutral, allowed_ids, format_fn, batch_size)
            row["soft_refusal"] = mean_finite(sr["delta"])
            row["soft_refusal_per_token"] = mean_finite(sr["delta_mean"])
            if allowed_ids is not None:
                row["soft_refusal_masked"] = mean_finite(sr["delta_masked"])
                row["soft_refusal_per_token_masked"] = mean_finite(sr["delta_mean_masked"])
            if generate_text:
                texts, n_tok = generate(model, tok, data, max_new_tokens, format_fn, batch_size, return_n_tokens=True)
                flags = [is_refusal(t) for t in texts]
                row["refusal_rate"] = sum(flags) / len(flags)
                st = style_markers(texts, n_tokens=n_tok)
                for k, v in st["per_100"].items():
                    row[f"style_{k}_per100"] = v
        table[name] = row
    return table


def behaviour_delta(table_base: Mapping[str, Mapping[str, float]], table_tuned: Mapping[str, Mapping[str, float]]) -> dict:
    """``tuned - base`` for every (set, metric) present in both tables (``n`` is not differenced)."""
    out: dict[str, dict[str, float]] = {}
    for name in table_base:
        if name not in table_tuned:
            continue
        b, t = table_base[name], table_tuned[name]
        out[name] = {k: float(t[k]) - float(b[k]) for k in b if k in t and k != "n"}
    return out
