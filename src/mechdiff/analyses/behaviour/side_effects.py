"""Side effects of a patch at the decision token (a readout any stage uses): refusal rate and
multiple-choice delta-log-prob, clean vs patched.

Both are measured on the destination model with and without each patch ``(site, value [B, d])``,
masked to the shared vocabulary and unmasked:

- refusal rate: greedy generation (``generation.generate_ids``; the patch applies to the prompt pass
  only), refusal patterns;
- MC: the question with lettered choices (``mc.mc_prompt``), read by the one MC scorer
  (``mc.mc_scores``) from the patching engine's logits at the end of the prompt. The clean reference
  of each patch is the engine's in-pass reference (``PatchEngine.run(..., with_reference=True)``): the
  clean model computed along the same path as the patched rows, so a patch that writes back the clean
  value gives a side effect of exactly 0 (not the rounding difference between two computations).

Prompts are encoded by ``data.prompts.encode``, as for capture, so a patch value captured on the
same prompts lines up with the decision tokens here.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from mechdiff.analyses.behaviour.generation import generate_ids, model_device
from mechdiff.analyses.behaviour.mc import mc_prompt, mc_scores
from mechdiff.analyses.behaviour.refusal import is_refusal
from mechdiff.data.prompts import encode, pad_id_of
from mechdiff.patching import Patch, PatchEngine
from mechdiff.patching.measure import variant_slice
from mechdiff.sites.hooks import intervene, replace_at
from mechdiff.sites.names import site_str

MODES = (("unmasked", False), ("masked", True))


def _first_pass(edit: Callable, T: int) -> Callable:
    """Apply ``edit`` only on the full-prompt pass (length T), not on the cached decode steps."""
    return lambda t: edit(t) if t.shape[1] == T else None


def refusal_rates(model, tok, prompts, patches: Sequence[tuple], allowed_ids,
                  max_new_tokens: int = 16, batch_size: int | None = None) -> tuple[dict, list[dict]]:
    """Refusal rate of the clean model (once) and with each patch ``(site, value [B, d])`` at the
    decision token, masked and unmasked. Returns (clean rates, one dict of rates + deltas per patch).
    batch_size: prompts per generation pass (None: all at once); the prompts are padded once, so every
    row sees the same padding whatever the batch size."""
    batch = encode(tok, prompts).to(model_device(model))
    T, B = batch.input_ids.shape[1], batch.input_ids.shape[0]
    step = max(1, batch_size or B)

    def rate(value, masked):
        texts = []
        for i in range(0, B, step):
            j = min(i + step, B)
            edit = {} if value is None else {site_str(value[0]): _first_pass(
                replace_at(value[1][i:j], batch.decision[i:j]), T)}
            with intervene(model, edit):
                toks = generate_ids(model, batch.input_ids[i:j], batch.attention_mask[i:j], max_new_tokens,
                                    pad_id_of(tok), allowed_ids if masked else None)
            texts += tok.batch_decode(toks, skip_special_tokens=True)
        return sum(is_refusal(t) for t in texts) / max(1, len(texts))

    clean = {m: rate(None, masked) for m, masked in MODES}
    rows = []
    for site, value in patches:
        edit = (site, value)
        row = {}
        for m, masked in MODES:
            row[f"refusal_clean_{m}"] = clean[m]
            row[f"refusal_patched_{m}"] = rate(edit, masked)
            row[f"d_refusal_pp_{m}"] = 100 * (row[f"refusal_patched_{m}"] - clean[m])
        rows.append(row)
    return clean, rows


def mc_effects(model, tok, items, patches: Sequence, allowed_ids, batch_size: int | None = None,
               **engine_kw) -> list[dict]:
    """MC delta-log-prob and accuracy, clean vs each patch (all patches in one engine run per chunk of
    ``batch_size`` items; None: one chunk), masked and unmasked; one dict per patch. A patch is
    ``(site, value [B, d])`` or a :class:`~mechdiff.patching.Patch` (alpha and centre applied by the
    engine; ``[B, ...]`` tensors over all items, cut per chunk). The clean side of each delta is the
    engine's in-pass reference for that patch (module docstring); a patch source taken on the same
    chunks (``patching.clean_run`` with this ``batch_size``) is bit for bit the clean state. engine_kw:
    passed to :class:`~mechdiff.patching.PatchEngine` (e.g. ``detect_noops=False``, ``max_rows``)."""
    variants = [p if isinstance(p, Patch) else Patch(site_str(p[0]), p[1]) for p in patches]
    step = max(1, batch_size or len(items))
    parts = []
    for i in range(0, len(items), step):
        eng = PatchEngine(model, encode(tok, [mc_prompt(it) for it in items[i:i + step]]), measure="last",
                          **engine_kw)
        parts.append(eng.run([variant_slice(v, i, i + step) for v in variants], with_reference=True))
    patched, ref = (torch.cat([p[k] for p in parts], 1) for k in (0, 1))
    ids = {"unmasked": None, "masked": allowed_ids}
    rows = []
    for k in range(len(patches)):
        out = {}
        for m in ids:
            c, p = mc_scores(ref[k], items, tok, ids[m]), mc_scores(patched[k], items, tok, ids[m])
            out.update({f"mc_dlogp_clean_{m}": c["dlogp_correct"], f"mc_dlogp_patched_{m}": p["dlogp_correct"],
                        f"d_mc_dlogp_{m}": p["dlogp_correct"] - c["dlogp_correct"],
                        f"d_mc_acc_pp_{m}": 100 * (p["accuracy"] - c["accuracy"])})
        rows.append(out)
    return rows

