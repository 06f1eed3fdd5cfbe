"""KL read-outs of patched runs: ``kl_reducer`` (a ``reduce`` for :meth:`PatchEngine.run` that keeps
only KL(clean || patched) per prompt of each pass, the clean side being the pass's own reference),
``patch_kl`` and the cross-model ``layer_sweep`` built on it."""
from __future__ import annotations

from typing import Sequence

import torch

from mechdiff.errors import NumericsError, SiteError
from mechdiff.patching.engine import PatchEngine
from mechdiff.patching.variants import Patch
from mechdiff.sites.names import site_str


def kl_reducer(engine: PatchEngine, allowed_ids=None, with_unmasked: bool = False):
    """``reduce`` for :meth:`PatchEngine.run`: KL(clean || patched) per prompt of each pass, masked
    to ``allowed_ids`` when given; ``with_unmasked`` adds a last axis ``[masked, unmasked]``. The
    clean side is ``ref`` (the engine passes each row's same-path reference, the same for every
    variant: exactly 0 for a patch that changes nothing); called as ``reduce(logits, rows)`` it falls
    back to ``clean_logits``."""
    clean = engine.clean_logits
    keep = None
    if allowed_ids is not None:   # the allowed ids as a vocabulary mask, built once for every pass
        from mechdiff.fairness import allowed_mask
        keep = allowed_mask(allowed_ids, clean.shape[-1], clean.device)

    def reduce(logits: torch.Tensor, rows: torch.Tensor, ref: torch.Tensor | None = None) -> torch.Tensor:
        c = ref[0] if ref is not None else clean.to(logits.device)[rows.to(logits.device)]
        return _kl_shared_ref(c.to(logits.device), logits, keep, with_unmasked)
    return reduce


_CHUNK = 1 << 25   # elements (128 MiB in float32)


def _kl_shared_ref(p_logits: torch.Tensor, q_logits: torch.Tensor, allowed_ids=None,
                   with_unmasked: bool = False) -> torch.Tensor:
    """KL(P || Q_i) ``[n, b]`` (``[n, b, 2]`` ``[masked, unmasked]`` with ``with_unmasked``) for one
    reference ``p_logits`` ``[b, V]`` and ``q_logits`` ``[n, b, V]``, both masked to ``allowed_ids``
    (ids or a boolean vocabulary mask) when given: :func:`mechdiff.analyses.kl.kl_from_logits` / ``kl_masked`` row by row (float32
    log-softmax, tokens with p = 0 contribute 0, exactly 0 where a row of Q is bit for bit P's), with
    P's log-softmax taken once, a few variants at a time, and one device-to-host read for the checks."""
    from mechdiff.fairness import allowed_mask, mask_logits
    keep = None if allowed_ids is None else allowed_mask(allowed_ids, p_logits.shape[-1], p_logits.device)
    views = []
    for ids in [keep] + ([None] if with_unmasked else []):   # allowed ids as a mask, built once
        logp = torch.log_softmax((p_logits if ids is None else mask_logits(p_logits, ids)).float(), -1)
        views.append((ids, logp, logp.exp()))
    per = max(1, _CHUNK // max(1, p_logits.numel()))
    out = []
    for i in range(0, q_logits.shape[0], per):
        q, cols = q_logits[i:i + per], []
        for ids, logp, prob in views:
            t = prob * (logp - torch.log_softmax((q if ids is None else mask_logits(q, ids)).float(), -1))
            cols.append(torch.where(prob > 0, t, 0.0).sum(-1).clamp_min(0.0))
        out.append(torch.stack(cols, -1) if with_unmasked else cols[0])
    kl = torch.cat(out)
    bad = torch.isnan(kl).any()
    for _, logp, _ in views:
        bad = bad | torch.isnan(logp).any()
    if bad.item():
        raise NumericsError("the clean or patched logits contain NaN, or a row that is -inf everywhere (an "
                            "empty allowed/shared id set?): check the model's forward pass (dtype overflow?), "
                            "the patch values and the allowed ids")
    return kl


def patch_kl(engine: PatchEngine, variants, allowed_ids=None, positions: str = "decision") -> torch.Tensor:
    """``[n_variants, B]`` KL(clean || patched) per prompt at the measured position, computed pass by
    pass (the patched logits of all variants are never held at once)."""
    return engine.run(variants, positions=positions, reduce=kl_reducer(engine, allowed_ids))


def layer_sweep(engine_dst: PatchEngine, states_src: dict, sites: Sequence | None = None,
                allowed_ids=None) -> dict[str, torch.Tensor]:
    """Cross-model patching: for each site, replace the destination's state at the decision token
    with the source model's (``states_src[site]``, ``[B, d]``); returns ``{site: KL per prompt [B]}``,
    all sites in batched passes. Widths must match (else SiteError: use mapped patching)."""
    sites = [site_str(s) for s in (states_src.keys() if sites is None else sites)]
    src = {site_str(k): v for k, v in states_src.items()}
    missing = [s for s in sites if s not in src]
    if missing:
        raise SiteError(f"no source states for sites {missing}")
    kl = patch_kl(engine_dst, [Patch(s, src[s]) for s in sites], allowed_ids)
    return {s: kl[i] for i, s in enumerate(sites)}
