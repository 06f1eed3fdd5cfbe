"""Position selectors: index tensors into the T axis of a left-padded :class:`Batch`.

- ``last_content(batch) -> [B]``: each prompt's last content token (``batch.decision``).
- ``content_mask(batch) -> [B, T] bool``: content tokens (no pad / BOS / template / EOS tokens).
- ``k_positions(batch, k, exclude_last=m, seed) -> (idx [B, K], valid [B, K])``: K content
  positions per prompt, sorted, never among the last ``m`` content tokens. A prompt with fewer than
  K eligible positions gets all of them first, then ``-1`` padding with ``valid=False``.

The choice for a prompt depends only on ``(seed, prompt id, the prompt's tokens)``: the same
prompt gets the same positions whatever it is batched with or padded to.
"""
from __future__ import annotations

import torch

from mechdiff.data.prompts import Batch, stable_hash
from mechdiff.errors import DataError


def last_content(batch: Batch) -> torch.Tensor:
    """[B] index of each prompt's last content token."""
    return batch.decision


def content_mask(batch: Batch) -> torch.Tensor:
    """[B, T] bool: tokens overlapping the user's content.

    Batches built by :func:`mechdiff.data.prompts.encode` carry this mask. For a hand-built Batch
    without it, every real token up to and including ``decision`` counts as content.
    """
    if batch.content is not None:
        return batch.content.bool()
    T = batch.input_ids.shape[1]
    ar = torch.arange(T, device=batch.input_ids.device)
    return batch.attention_mask.bool() & (ar[None, :] <= batch.decision[:, None])


def _mix(x: torch.Tensor) -> torch.Tensor:
    """Integer hash of non-negative int64 values < 2**31 (stays < 2**31; no overflow)."""
    for mult in (0x2C1B3C6D, 0x297A2D39, 0x5BD1E995):
        x = x ^ (x >> 15)
        x = (x * (mult & 0xFFFF) + ((x * (mult >> 16)) << 16)) & 0x7FFFFFFF
    return x ^ (x >> 13)


def k_positions(batch: Batch, k: int, exclude_last: int = 0, seed: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """K content positions per prompt, sorted ascending, excluding the last ``exclude_last``.

    Returns ``(idx, valid)``, both ``[B, K]``: ``idx`` indexes T (``-1`` where ``valid`` is False,
    which happens only when a prompt has fewer than K eligible positions; valid entries come first).
    """
    if k < 1:
        raise DataError(f"k must be >= 1, got {k}")
    if exclude_last < 0:
        raise DataError(f"exclude_last must be >= 0, got {exclude_last}")
    cm = content_mask(batch)
    B, T = cm.shape
    dev = cm.device
    rank = cm.long().cumsum(-1) - 1                       # index among content tokens
    n_content = cm.sum(-1, keepdim=True)
    eligible = cm & (rank < n_content - exclude_last)
    ids = batch.ids if len(batch.ids) == B else [str(i) for i in range(B)]
    row = torch.tensor([stable_hash(f"{seed}\x00{i}") for i in ids], dtype=torch.long, device=dev)
    score = _mix((row[:, None] + _mix(rank.clamp_min(0) + 1)) & 0x7FFFFFFF)
    score = (score << 31) | rank.clamp_min(0)             # unique per row: no ties in topk
    big = torch.iinfo(torch.long).max
    score = torch.where(eligible, score, big)
    kk = min(k, T)
    picked_score, picked = score.topk(kk, dim=-1, largest=False)
    ok = picked_score != big
    picked = torch.where(ok, picked, T)                    # invalid last after sorting
    picked, _ = picked.sort(-1)
    ok = picked < T
    idx = torch.where(ok, picked, -1)
    if kk < k:
        pad = torch.full((B, k - kk), -1, dtype=torch.long, device=dev)
        idx = torch.cat([idx, pad], -1)
        ok = torch.cat([ok, torch.zeros_like(pad, dtype=torch.bool)], -1)
    return idx, ok
