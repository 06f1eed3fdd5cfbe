"""KL divergence between next-token distributions, fair across tokenizers.

All functions reduce over the last (vocabulary) axis and return one value per row: logits of shape
``[..., V]`` give KL of shape ``[...]``. ``P`` is the reference (clean) distribution.
Math runs in float32 via ``log_softmax``; tokens with ``p = 0`` contribute 0 (so a token that is
-inf in both P and Q is fine); a token with ``p > 0`` and ``q = 0`` gives ``+inf`` (a true KL).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from mechdiff.errors import NumericsError
from mechdiff.fairness import mask_logits, shared_logits

__all__ = ["kl_from_logits", "kl_shared", "kl_masked", "summarise"]


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
