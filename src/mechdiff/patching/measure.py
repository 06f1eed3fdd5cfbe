"""The patch-and-measure runtime every stage shares: the clean run of both sides along the engines'
own path, the chunked patch-and-measure loop over a prompt set, and capture split over torchrun ranks.

The ``reducer`` of :func:`patch_measure` is a factory ``(engine, i, j) -> reduce`` for prompts
``i:j``; the KL reducers live in :mod:`mechdiff.patching.kl` (``kl_to_clean``, ``kl_and_gap``).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Sequence

import torch

from mechdiff.data.prompts import encode
from mechdiff.errors import ConfigError
from mechdiff.models.load import LoadedModel
from mechdiff.patching.engine import PatchEngine
from mechdiff.patching.kl import Reducer
from mechdiff.patching.variants import Patch
from mechdiff.progress import progress
from mechdiff.scale.distributed import active, map_items
from mechdiff.sites.capture import Captured, _plan, capture
from mechdiff.sites.names import Site

__all__ = ["clean_run", "patch_measure", "capture_split"]


def clean_run(side: LoadedModel, prompts: Sequence, sites: Sequence = (), *, batch_size: int,
              measure: str, max_rows: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clean run of :func:`patch_measure`'s engines, chunk by chunk: ``[N, V]`` float32 logits at
    the measured position and ``{site: [N, d]}`` states at the decision token (model dtype), on CPU.

    The states are computed along the destination engines' own path, so a patch source taken from
    here at a layer both models share is bit-for-bit the destination's clean state: the engine sees
    a no-op and the patch KL is exactly 0 (states from a plain forward differ in the last bits)."""
    keys = [str(s) for s in sites]

    def one(i):      # one chunk: ([b, V] logits, {site: [b, d]}) on CPU
        eng = PatchEngine(side.model, encode(side.tokenizer, prompts[i:i + batch_size]), measure=measure,
                          record_sites=keys, max_rows=max_rows)
        return eng.clean_logits.cpu(), {k: v.cpu() for k, v in eng.clean_states(keys).items()}

    starts = list(range(0, len(prompts), batch_size))
    # under torchrun: chunk k on rank k mod world size, gathered in order (scale.distributed)
    parts = map_items(starts if active() else progress(starts, f"clean run ({len(prompts)} prompts)",
                                                       total=len(starts)), one)
    return torch.cat([lg for lg, _ in parts]), {k: torch.cat([st[k] for _, st in parts]) for k in keys}


def _slice(p: Patch, i: int, j: int) -> Patch:
    """``p`` with per-prompt tensors (``[N, ...]`` value / centre) cut to prompts ``i:j``."""
    cut = {}
    for name in ("value", "centre"):
        t = getattr(p, name)
        if t is not None and t.dim() >= 2:
            cut[name] = t[i:j]
    return replace(p, **cut) if cut else p


def variant_slice(var, i: int, j: int):
    """A variant (Patch or list of Patch) for prompts ``i:j`` of the ``[N, ...]`` tensors it holds."""
    return _slice(var, i, j) if isinstance(var, Patch) else [_slice(p, i, j) for p in var]


def patch_measure(side: LoadedModel, prompts: Sequence, variants: list, *, batch_size: int,
                  measure: str = "decision", reducer: Reducer, record_sites: Sequence[Site | str] = (),
                  positions: str = "decision", on_chunk: Callable[[PatchEngine, int, int], None] | None = None,
                  max_rows: int | None = None) -> torch.Tensor:
    """The chunked patch-and-measure loop: ``variants`` (Patch or list of Patch whose per-prompt
    tensors are ``[N, ...]`` over all ``prompts``) run through one :class:`PatchEngine` per chunk of
    ``batch_size`` prompts; ``reducer(engine, i, j)`` gives the ``reduce`` for prompts ``i:j``.

    Returns ``[n_variants, N, ...]`` (on CPU). ``on_chunk(engine, i, j)`` sees each chunk's engine
    (e.g. to read its clean logits or recorded states) before the variants run. positions:
    "decision" (patch the decision token) or "all" (every position; the engine's full-recompute path).
    max_rows: rows per engine pass (``--max-rows``; None: the engine's default).
    """
    out = []
    starts = range(0, len(prompts), batch_size)
    split = active()     # under torchrun: chunk k on rank k mod world size, gathered in order

    def one(i):
        chunk = prompts[i:i + batch_size]
        j = i + len(chunk)
        eng = PatchEngine(side.model, encode(side.tokenizer, chunk), measure=measure,
                          record_sites=record_sites, max_rows=max_rows)
        if on_chunk is not None and not split:
            on_chunk(eng, i, j)
        res = eng.run([variant_slice(v, i, j) for v in variants], positions=positions,
                      reduce=reducer(eng, i, j))
        return res.cpu(), (eng.clean_logits.cpu() if split and on_chunk is not None else None)

    starts = list(starts)
    bar = starts if split else progress(starts, f"patch ({len(variants)} variants x {len(prompts)} prompts)",
                                        total=len(starts))
    for i, (res, clean) in zip(starts, map_items(bar, one)):
        if split and on_chunk is not None:      # every rank sees every chunk, in order
            on_chunk(_ChunkClean(clean), i, min(i + batch_size, len(prompts)))
        out.append(res)
    if not out:
        raise ConfigError("no prompts to patch: the prompt set is empty after the fairness filter")
    return torch.cat(out, 1)


class _ChunkClean:
    """What ``on_chunk`` gets for a chunk under torchrun (it may have run on another rank): the
    chunk's ``clean_logits`` ``[b, V]`` (CPU)."""

    def __init__(self, clean_logits: torch.Tensor):
        self.clean_logits = clean_logits


def capture_split(side: LoadedModel, prompts: Sequence, sites, positions, seed: int, batch_size: int) -> Captured:
    """:func:`capture` with the very batches one process runs (length-sorted, same padding), batch k
    on rank k mod world size (:mod:`mechdiff.scale.distributed`), gathered to every rank in prompt order: bitwise the one-process result."""
    ids, chunks = _plan(side.model, side.tokenizer, prompts, batch_size, True, None)
    parts = map_items(chunks, lambda rc: capture(side.model, side.tokenizer, rc[1], sites, positions=positions,
                                                 batch_size=len(rc[1]), seed=seed))
    N, first = len(ids), parts[0]
    tensors = {k: v.new_empty((N, *v.shape[1:])) for k, v in first.tensors.items()}
    pos = first.positions.new_full((N, *first.positions.shape[1:]), -1)
    valid = None if first.valid is None else first.valid.new_zeros((N, *first.valid.shape[1:]))
    for (rows, _), cap in zip(chunks, parts):
        for k in tensors:
            tensors[k][rows] = cap.tensors[k]
        pos[rows] = cap.positions
        if valid is not None:
            valid[rows] = cap.valid
    return Captured(tensors, ids, pos, valid)
