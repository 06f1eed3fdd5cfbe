"""KL divergence and the gap measures, in one place: between next-token distributions (fair across
tokenizers) and as read-outs of patched runs.

Plain KL (``kl_from_logits``, ``kl_shared``, ``kl_masked``) reduces over the last (vocabulary) axis
and returns one value per row: logits ``[..., V]`` give KL ``[...]``; ``P`` is the reference (clean)
distribution. Math runs in float32 via ``log_softmax``; tokens with ``p = 0`` contribute 0 (so a token
that is -inf in both P and Q is fine); a token with ``p > 0`` and ``q = 0`` gives ``+inf`` (a true KL).

Read-outs of patched runs: ``kl_reducer`` (a ``reduce`` for :meth:`PatchEngine.run` that keeps only
KL(clean || patched) per prompt of each pass, the clean side being the pass's own reference), the
reducer factories of :func:`mechdiff.patching.measure.patch_measure` (``kl_to_clean``, ``kl_and_gap``:
the share of the base-tuned gap a patch closes), ``patch_kl`` and the cross-model ``layer_sweep``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import torch

from mechdiff.errors import NumericsError, SiteError
from mechdiff.fairness import allowed_mask, mask_logits, shared_logits
from mechdiff.patching.engine import PatchEngine
from mechdiff.patching.variants import Patch
from mechdiff.sites.names import site_str

__all__ = ["kl_from_logits", "kl_shared", "kl_masked", "summarise", "kl_reducer", "kl_to_clean", "kl_and_gap",
           "patch_kl", "layer_sweep", "Reducer"]


def _check_rows(logits: torch.Tensor, name: str) -> None:
    if logits.shape[-1] == 0:
        raise NumericsError(f"{name} has an empty vocabulary axis: nothing to compare")
    if torch.isnan(logits).any():
        raise NumericsError(f"{name} contains NaN: check the model's forward pass (dtype overflow?)")
    dead = torch.isneginf(logits).all(dim=-1)
    if dead.any():
        raise NumericsError(
            f"{int(dead.sum())} row(s) of {name} are -inf everywhere (no allowed token): "
            "the allowed/shared id set is empty for this vocabulary"
        )


def kl_from_logits(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per row from logits ``[..., V]`` (same vocabulary order) -> ``[...]``."""
    if p_logits.shape != q_logits.shape:
        raise NumericsError(
            f"KL needs logits of the same shape, got {tuple(p_logits.shape)} and {tuple(q_logits.shape)}: "
            "use kl_shared for models with different vocabularies"
        )
    _check_rows(p_logits, "p_logits")
    _check_rows(q_logits, "q_logits")
    logp = torch.log_softmax(p_logits.float(), dim=-1)
    logq = torch.log_softmax(q_logits.float(), dim=-1)
    p = logp.exp()
    diff = torch.where(p > 0, logp - logq, torch.zeros_like(logp))
    terms = torch.where(p > 0, p * diff, torch.zeros_like(p))
    return terms.sum(dim=-1).clamp_min(0.0)


def kl_shared(
    p_logits: torch.Tensor, q_logits: torch.Tensor, p_ids: torch.Tensor, q_ids: torch.Tensor
) -> torch.Tensor:
    """KL(P || Q) over the shared vocabulary, renormalised on it.

    ``p_ids``/``q_ids`` are ``SharedVocab.a_ids``/``b_ids`` (same string at the same position), so
    tokens only one tokenizer has (e.g. an extension) cannot inflate the divergence.
    """
    return kl_from_logits(shared_logits(p_logits, p_ids), shared_logits(q_logits, q_ids))


def kl_masked(p_logits: torch.Tensor, q_logits: torch.Tensor, allowed_ids: Any) -> torch.Tensor:
    """KL(P || Q) for the same vocabulary with both masked to ``allowed_ids`` and renormalised."""
    return kl_from_logits(mask_logits(p_logits, allowed_ids), mask_logits(q_logits, allowed_ids))


def summarise(values: torch.Tensor | Iterable[float]) -> dict:
    """``{mean, std, median, n}`` (std with Bessel's correction; 0.0 for n = 1; NaN for n = 0).

    Non-finite values are counted in ``n_nonfinite`` and excluded from the statistics.
    """
    t = torch.as_tensor(values if isinstance(values, torch.Tensor) else list(values), dtype=torch.float64).flatten()
    finite = t[torch.isfinite(t)]
    n = int(finite.numel())
    if n == 0:
        return {"mean": math.nan, "std": math.nan, "median": math.nan, "n": 0, "n_nonfinite": int(t.numel())}
    return {
        "mean": float(finite.mean()),
        "std": float(finite.std(correction=1)) if n > 1 else 0.0,
        "median": float(finite.median()) if n % 2 else float(finite.sort().values[n // 2 - 1 : n // 2 + 1].mean()),
        "n": n,
        "n_nonfinite": int(t.numel() - n),
    }



def kl_reducer(engine: PatchEngine, allowed_ids=None, with_unmasked: bool = False):
    """``reduce`` for :meth:`PatchEngine.run`: KL(clean || patched) per prompt of each pass, masked
    to ``allowed_ids`` when given; ``with_unmasked`` adds a last axis ``[masked, unmasked]``. The
    clean side is ``ref`` (the engine passes each row's same-path reference, the same for every
    variant: exactly 0 for a patch that changes nothing); called as ``reduce(logits, rows)`` it falls
    back to ``clean_logits``."""
    clean = engine.clean_logits
    keep = None
    if allowed_ids is not None:   # the allowed ids as a vocabulary mask, built once for every pass
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
    (ids or a boolean vocabulary mask) when given: :func:`kl_from_logits` / ``kl_masked`` row by row (float32
    log-softmax, tokens with p = 0 contribute 0, exactly 0 where a row of Q is bit for bit P's), with
    P's log-softmax taken once, a few variants at a time, and one device-to-host read for the checks."""
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


Reducer = Callable[[PatchEngine, int, int], Callable]


def kl_to_clean(allowed_ids) -> Reducer:
    """Reducer factory: KL(clean || patched) per prompt, masked to ``allowed_ids`` and unmasked
    (last axis ``[masked, unmasked]``)."""
    return lambda eng, i, j: kl_reducer(eng, allowed_ids, with_unmasked=True)


def kl_and_gap(allowed_ids, other_logits: torch.Tensor, other_ids) -> Reducer:
    """Reducer factory: last axis ``[masked, unmasked, to_other]``: KL(clean || patched) masked to
    ``allowed_ids`` and unmasked (as :func:`kl_to_clean`), and KL(other || patched) over the shared
    vocabulary, where ``other_logits`` ``[N, V_other]`` are the other model's clean logits on the same
    prompts (``other_ids``: the shared vocabulary in its tokenizer, same order as ``allowed_ids``).
    The share of the gap a patch closes is ``1 - to_other / KL(other || clean)``."""

    def factory(eng: PatchEngine, i: int, j: int):
        base = kl_reducer(eng, allowed_ids, with_unmasked=True)
        other = other_logits[i:j]

        def reduce(logits: torch.Tensor, rows: torch.Tensor, ref: torch.Tensor | None = None) -> torch.Tensor:
            k = base(logits, rows) if ref is None else base(logits, rows, ref)
            o = other.to(logits.device)[rows.to(logits.device)][None].expand(logits.shape[0], -1, -1)
            return torch.cat([k, kl_shared(o, logits, other_ids, allowed_ids)[..., None]], -1)
        return reduce
    return factory
