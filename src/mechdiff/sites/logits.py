"""Logits at a few kept positions per prompt: the LM head runs only there.

::

    logits = capture_logits(model, batch)                 # [B, V] float32 at each prompt's decision
    logits = capture_logits(model, batch, idx)            # idx [B, P] -> [B, P, V]
"""
from __future__ import annotations

import torch
from torch import nn

from mechdiff.data.prompts import Batch
from mechdiff.errors import DataError, SiteError
from mechdiff.scale.devices import input_device


def model_device(model: nn.Module) -> torch.device:
    """Where inputs go (a model spread over devices: where its input embeddings run)."""
    return input_device(model)


@torch.no_grad()
def capture_logits(model: nn.Module, batch: Batch, positions="last") -> torch.Tensor:
    """float32 logits at one position per prompt (``"last"`` = decision, or idx ``[B]``) -> ``[B, V]``;
    idx ``[B, P]`` -> ``[B, P, V]``.

    The LM head runs only on the kept positions: a pre-hook on the output embeddings gathers them
    from the final hidden states, so the model's own post-processing (e.g. Gemma's logit
    soft-capping) still applies. Equal to ``model(**batch.model_inputs()).logits[rows, idx]``.
    """
    dev = model_device(model)
    b = batch.to(dev)
    idx = b.decision if isinstance(positions, str) and positions == "last" else positions
    if isinstance(idx, str):
        raise DataError(f"positions={positions!r}: use 'last' or an index tensor")
    idx = idx.to(dev)
    idx2 = idx[:, None] if idx.dim() == 1 else idx
    head = model.get_output_embeddings()
    if head is None:
        raise SiteError(f"{type(model).__name__} has no output embeddings (LM head)")
    rows = torch.arange(idx2.shape[0], device=dev)[:, None]

    def pre(mod, args):
        h = args[0]      # on the head's device (another GPU than the inputs when the model is sharded)
        return (h[rows.to(h.device), idx2.to(h.device)],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(pre)
    try:
        logits = model(**b.model_inputs(), use_cache=False).logits
    finally:
        handle.remove()
    logits = logits.to(dev).float()
    return logits[:, 0] if idx.dim() == 1 else logits
