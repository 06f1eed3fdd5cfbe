"""Patch sources taken along the engine's own path: ``chunked_clean_states`` returns a model's
clean-run states at the decision token, computed exactly as the destination engines of a chunked
patch loop compute theirs, so that a state both models share is bit-for-bit the destination's clean
state and the patch is detected as a no-op (KL exactly 0)."""
from __future__ import annotations

from typing import Sequence

import torch

from mechdiff.patching.engine import PatchEngine
from mechdiff.sites.names import site_str


@torch.no_grad()
def chunked_clean_states(model, tokenizer, prompts: Sequence, sites: Sequence[str], *, batch_size: int,
                         measure: str = "decision", encode_kw: dict | None = None,
                         **engine_kw) -> dict[str, torch.Tensor]:
    """``{site: [N, d]}`` (``[N, H, head_dim]`` for head_z) clean states of ``model`` at each prompt's
    decision token, in the model's dtype, on the CPU.

    Chunks of ``batch_size`` prompts, each encoded with ``mechdiff.data.prompts.encode(tokenizer,
    chunk, **encode_kw)`` and run through one ``PatchEngine(model, batch, measure=measure,
    record_sites=sites, **engine_kw)``: the same chunking, encoding, measure and engine settings as
    the destination's patch loop (``experiments.steps.patch_measure``) give the same computation.
    The values are exact only along that path: states from a full forward (``sites.capture``), from
    another chunking or measure, or standardised, differ from the destination's clean states in
    the last bits, and a patch at a layer both models share then computes a small nonzero KL."""
    from mechdiff.data.prompts import encode
    sites = [site_str(s) for s in sites]
    parts: dict[str, list] = {s: [] for s in sites}
    for i in range(0, len(prompts), batch_size):
        eng = PatchEngine(model, encode(tokenizer, prompts[i:i + batch_size], **(encode_kw or {})),
                          measure=measure, record_sites=sites, **engine_kw)
        for s, v in eng.clean_states(sites).items():
            parts[s].append(v.cpu())
        del eng
    return {s: torch.cat(v) for s, v in parts.items()}
