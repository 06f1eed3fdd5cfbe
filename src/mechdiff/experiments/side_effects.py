"""Side effects of a patch at the decision token: refusal rate and MC delta-log-prob, clean vs patched.

Both are measured on the destination model with and without the patch, masked to the shared
vocabulary and unmasked:

- refusal rate: greedy generation (``behaviour.generate_ids``; the patch applies to the prompt pass
  only), refusal patterns;
- MC: the question with lettered choices; next-token log p(correct letter) minus the mean over the
  other letters, and accuracy (argmax over the letters), read through the patching engine.
"""
from __future__ import annotations

from typing import Callable

import torch

from mechdiff.analyses.behaviour import generate_ids, is_refusal
from mechdiff.data.prompts import encode, pad_id_of
from mechdiff.fairness import mask_logits
from mechdiff.patching import Patch, PatchEngine
from mechdiff.sites.hooks import intervene, replace_at

LETTERS = "ABCDEFGH"


def mc_prompt(item: dict) -> dict:
    """An MC item as a prompt whose answer is one letter."""
    lines = [item["question"]] + [f"{LETTERS[i]}) {c}" for i, c in enumerate(item["choices"])]
    return {"id": item["id"], "text": "\n".join(lines) + "\nAnswer with the letter only."}


def _letter_ids(tok, n: int) -> torch.Tensor:
    return torch.tensor([tok.encode(LETTERS[i], add_special_tokens=False)[0] for i in range(n)])


def mc_scores(logits: torch.Tensor, items: list[dict], tok, allowed_ids=None) -> dict:
    """Mean delta-log-prob(correct) and accuracy from next-token logits ``[B, V]``."""
    logits = logits.float()
    if allowed_ids is not None:
        logits = mask_logits(logits, allowed_ids)
    lp = logits.log_softmax(-1)
    deltas, correct = [], []
    for i, it in enumerate(items):
        ids = _letter_ids(tok, len(it["choices"]))
        s = lp[i, ids]
        a = int(it["answer"])
        others = torch.cat([s[:a], s[a + 1:]])
        deltas.append(float(s[a] - others[torch.isfinite(others)].mean()) if torch.isfinite(s[a]) else float("nan"))
        correct.append(int(s.argmax()) == a)
    d = torch.tensor(deltas)
    return {"dlogp_correct": float(d[torch.isfinite(d)].mean()) if torch.isfinite(d).any() else float("nan"),
            "accuracy": sum(correct) / max(1, len(correct))}


def refusal_rates(model, tok, prompts, patches: list[tuple[str, torch.Tensor]], allowed_ids,
                  max_new_tokens: int = 16) -> tuple[dict, list[dict]]:
    """Refusal rate of the clean model (once) and with each patch ``(site, value [B, d])`` at the
    decision token, masked and unmasked. Returns (clean rates, one dict of rates + deltas per patch)."""
    batch = encode(tok, prompts).to(next(model.parameters()).device)
    T = batch.input_ids.shape[1]

    def rate(edit, masked):
        with intervene(model, edit or {}):
            toks = generate_ids(model, batch.input_ids, batch.attention_mask, max_new_tokens,
                                pad_id_of(tok), allowed_ids if masked else None)
        texts = tok.batch_decode(toks, skip_special_tokens=True)
        return sum(is_refusal(t) for t in texts) / max(1, len(texts))

    clean = {m: rate(None, m == "masked") for m in ("unmasked", "masked")}
    rows = []
    for site, value in patches:
        edit = {site: _first_pass(replace_at(value, batch.decision), T)}
        row = {}
        for m in ("unmasked", "masked"):
            row[f"refusal_clean_{m}"] = clean[m]
            row[f"refusal_patched_{m}"] = rate(edit, m == "masked")
            row[f"d_refusal_pp_{m}"] = 100 * (row[f"refusal_patched_{m}"] - clean[m])
        rows.append(row)
    return clean, rows


def _first_pass(edit: Callable, T: int) -> Callable:
    """Apply ``edit`` only on the full-prompt pass (length T), not on the cached decode steps."""
    return lambda t: edit(t) if t.shape[1] == T else None


def mc_effects(model, tok, items, patches: list[tuple[str, torch.Tensor]], allowed_ids) -> list[dict]:
    """MC delta-log-prob and accuracy, clean vs each patch (all patches in one engine pass),
    masked and unmasked; one dict per patch."""
    eng = PatchEngine(model, encode(tok, [mc_prompt(it) for it in items]), measure="last")
    patched = eng.run([Patch(site, value) for site, value in patches])
    clean = {m: mc_scores(eng.clean_logits, items, tok, ids)
             for m, ids in (("unmasked", None), ("masked", allowed_ids))}
    rows = []
    for k in range(len(patches)):
        out = {}
        for m, ids in (("unmasked", None), ("masked", allowed_ids)):
            c, p = clean[m], mc_scores(patched[k], items, tok, ids)
            out.update({f"mc_dlogp_clean_{m}": c["dlogp_correct"], f"mc_dlogp_patched_{m}": p["dlogp_correct"],
                        f"d_mc_dlogp_{m}": p["dlogp_correct"] - c["dlogp_correct"],
                        f"d_mc_acc_pp_{m}": 100 * (p["accuracy"] - c["accuracy"])})
        rows.append(out)
    return rows
