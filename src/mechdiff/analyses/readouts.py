"""Side-effect readouts of a model under patches, read through the one patching engine (batched
variants, the full logits of all variants never held at once), for any stage: RQ3 measures its
handles with it, and RQ2's mapped patches can call :func:`side_effects` the same way. (The distance
of a patched model to the *other* model of a pair is ``mechdiff.patching.kl.kl_and_gap``.)

- :func:`side_effects`: on a neutral prompt set, the next-token perplexity change, and on
  multiple-choice items the accuracy and delta-log-prob change, clean vs each variant, masked to the
  shared vocabulary and unmasked.

**Perplexity change.** The next-token perplexity of the patched model at a measured position (by
default the end of the prompt: the first token of the response, what a user would see): the
cross-entropy of the patched distribution ``q`` on the clean model's own distribution ``p``, against
the clean model's own, ``exp(E[H(p, q)] - E[H(p)]) = exp(mean KL(p || q))``. So ``ppl_change_pct =
100 (exp(mean KL) - 1)`` (0 for the clean model, 5% at a mean KL of 0.0488 nats).

**MC.** The question with lettered choices (``behaviour.mc.mc_prompt``), read at the end of the
prompt; per variant the letter log-probs go through the one MC scorer (``behaviour.mc.score_choices``).
The clean side of each variant is the engine's in-pass reference (the clean model along the same path
as that variant's rows), as for the perplexity KL: a variant that writes back the clean value changes
nothing, exactly.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from mechdiff.analyses.behaviour.mc import check_items, letter_ids, mc_prompt, mean_finite, score_choices
from mechdiff.fairness import mask_logits
from mechdiff.models.load import LoadedModel
from mechdiff.patching.kl import kl_to_clean
from mechdiff.patching.measure import patch_measure

MASKS = ("masked", "unmasked")


def perplexity_change_pct(kl: torch.Tensor) -> float:
    """``100 (exp(mean KL) - 1)``: the next-token perplexity change of a patched model on the clean
    model's own distribution (module docstring); ``kl`` per prompt, nats."""
    m = mean_finite(kl)
    return 100.0 * math.expm1(m) if math.isfinite(m) else float("nan")


def mc_letters(tok, items: Sequence[dict], allowed_ids):
    """Reducer factory: letter log-probs ``[n, b, 2, 2, C]`` (``[patched, clean reference]``, then
    ``[masked, unmasked]``; ``C`` = most choices) at the end of each :func:`mc_prompt`, masked ones
    renormalised over ``allowed_ids`` (None: no mask). The clean reference is the engine's in-pass
    ``ref`` (its clean logits where the engine gives none)."""
    ids = letter_ids(tok, max(len(it["choices"]) for it in items))

    def factory(eng, i, j):
        clean = eng.clean_logits

        def letters(lg: torch.Tensor) -> torch.Tensor:
            lid = ids.to(lg.device)
            un = lg.float().log_softmax(-1)[..., lid]
            ma = un if allowed_ids is None else mask_logits(lg.float(), allowed_ids).log_softmax(-1)[..., lid]
            return torch.stack([ma, un], -2)

        def reduce(logits: torch.Tensor, rows: torch.Tensor, ref: torch.Tensor | None = None) -> torch.Tensor:
            c = ref if ref is not None else clean.to(logits.device)[rows.to(logits.device)][None]
            return torch.stack([letters(logits), letters(c.to(logits.device)).expand(logits.shape[0], -1, -1, -1)], 2)
        return reduce
    return factory


def mc_summary(letters: torch.Tensor, items: Sequence[dict]) -> dict:
    """``{masked|unmasked: {accuracy, dlogp}}`` from letter log-probs ``[N, 2, C]`` (:func:`mc_letters`)."""
    answers = [int(it["answer"]) for it in items]
    out = {}
    for m, name in enumerate(MASKS):
        s = score_choices([letters[i, m, :len(it["choices"])] for i, it in enumerate(items)], answers)
        out[name] = {"accuracy": s["accuracy"], "dlogp": mean_finite(s["delta"])}
    return out


def side_effects(side: LoadedModel, neutral: Sequence, mc_items: Sequence[dict], variants: list, allowed_ids, *,
                 batch_size: int, measure: str = "last", also: str | None = None, positions: str = "decision",
                 max_rows: int | None = None) -> list[dict]:
    """Side effects of each variant on ``side``: one dict per variant with ``ppl_change_pct_{masked,
    unmasked}`` on the ``neutral`` prompts read at ``measure`` ("last": the first token of the response,
    what the patched model would answer; "decision": the patched token itself), with ``also`` the same
    at the other position as ``ppl_change_pct_{m}_at_{also}``; with ``mc_items``, ``mc_acc_{m}`` /
    ``mc_acc_clean_{m}``, ``mc_drop_pp_{m}`` (clean - patched accuracy, points) and ``mc_dlogp_drop_{m}``.

    variants: engine variants whose tensors do not depend on the prompt (bases, ``[d]`` values).
    positions: "decision" or "all" (patch every position). max_rows: rows per engine pass (``--max-rows``)."""
    pos = {"positions": "all"} if positions == "all" else {}
    rows: list[dict] = [{} for _ in variants]
    for where in ([measure] + ([also] if also and also != measure else [])) if neutral else []:
        kl = patch_measure(side, list(neutral), variants, batch_size=batch_size, max_rows=max_rows, measure=where,
                           reducer=kl_to_clean(allowed_ids), **pos)                # [n, N, 2]
        tail = "" if where == measure else f"_at_{where}"
        for v, row in enumerate(rows):
            row.update({f"ppl_change_pct_{m}{tail}": perplexity_change_pct(kl[v, :, c]) for c, m in enumerate(MASKS)})
    if mc_items:
        items = check_items(mc_items)
        prompts = [mc_prompt(it) for it in items]
        let = patch_measure(side, prompts, list(variants), batch_size=batch_size, max_rows=max_rows, measure="last",
                            reducer=mc_letters(side.tokenizer, items, allowed_ids), **pos)  # [n, N, 2, 2, C]
        for v, row in enumerate(rows):
            p, clean = mc_summary(let[v, :, 0], items), mc_summary(let[v, :, 1], items)
            for m in MASKS:
                row.update({f"mc_acc_clean_{m}": clean[m]["accuracy"], f"mc_acc_{m}": p[m]["accuracy"],
                            f"mc_drop_pp_{m}": 100.0 * (clean[m]["accuracy"] - p[m]["accuracy"]),
                            f"mc_dlogp_drop_{m}": clean[m]["dlogp"] - p[m]["dlogp"]})
    return rows


def within(row: dict, max_ppl_pct: float, max_mc_drop_pp: float) -> bool:
    """Side effects within the thresholds, masked and unmasked (``ppl_change_pct_{m}`` and
    ``mc_drop_pp_{m}``; a readout that was not measured does not count, but with neither measured
    there is no evidence: False)."""
    ppl = [row[f"ppl_change_pct_{m}"] for m in MASKS if f"ppl_change_pct_{m}" in row]
    mc = [row[f"mc_drop_pp_{m}"] for m in MASKS if f"mc_drop_pp_{m}" in row]
    if not ppl and not mc:
        return False
    return all(math.isfinite(x) and x <= max_ppl_pct for x in ppl) and \
        all(math.isfinite(x) and x <= max_mc_drop_pp for x in mc)
