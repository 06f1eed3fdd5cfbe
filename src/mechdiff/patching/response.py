"""Response readout for cross-model layer patching: read the whole answer, not only its first token.

Each text is a prompt with a response, teacher-forced (the same ids in both models: one tokenizer).
For a layer ``l`` and a direction ``src -> dst``, the destination runs with its ``resid_post.l``
replaced at *every* position by the source's (prompt and response alike). Per text, means over its
first ``k`` response tokens (the distributions that predict them, masked to the shared vocabulary):

- ``patch_kl``: KL(dst clean || dst patched), RQ1's patch KL read over the response. Layers both
  models share below a fine-tune's first changed layer give exactly 0 (the destination reads the
  states it makes itself);
- ``gap``: KL(src clean || dst clean), the response-level gap;
- ``to_src``: KL(src clean || dst patched); ``share_closed = 1 - mean(to_src) / mean(gap)``.

Shapes: ``ids`` is a list of token id lists; ``response_start[i]`` is the index of text ``i``'s first
response token; logits are read only at ``[B, k]`` rows (the output layer never sees ``[B, T]``).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from mechdiff.data.prompts import Encoded, collate, pad_id_of
from mechdiff.errors import DataError
from mechdiff.sites.hooks import hooked, replace_at
from mechdiff.texts.divergence import final_hidden, head_logits

__all__ = ["response_rows", "response_patch"]


def response_rows(batch, response_start: Sequence[int], lengths: Sequence[int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(idx [B, k], valid [B, k])``: batch columns of the distributions that predict each text's
    first ``k`` response tokens (left padding accounted for)."""
    T = batch.input_ids.shape[1]
    idx = torch.zeros(len(lengths), k, dtype=torch.long)
    valid = torch.zeros(len(lengths), k, dtype=torch.bool)
    for b, (r, n) in enumerate(zip(response_start, lengths)):
        if r < 1:
            raise DataError("a response must follow at least one prompt token")
        cols = [T - n + r - 1 + j for j in range(k) if r + j < n]
        idx[b, :len(cols)] = torch.tensor(cols, dtype=torch.long)
        valid[b, :len(cols)] = True
    return idx, valid


def _logits_at(model: Any, batch, idx: torch.Tensor, edit: dict | None = None) -> torch.Tensor:
    """Float32 logits ``[B, k, V]`` at batch columns ``idx`` (optionally under site edits)."""
    if edit:
        with hooked(model, edit=edit):
            h = final_hidden(model, batch)
    else:
        h = final_hidden(model, batch)
    rows = torch.arange(h.shape[0], device=h.device)[:, None]
    sel = h[rows, idx.to(h.device)]                                   # [B, k, d]
    return head_logits(model, sel.reshape(-1, sel.shape[-1])).reshape(*idx.shape, -1)


def _states(model: Any, batch, layer: int) -> torch.Tensor:
    kept: list[torch.Tensor] = []

    def grab(t):
        kept.append(t.detach())
        return None
    with hooked(model, edit={f"resid_post.{layer}": grab}):
        final_hidden(model, batch)
    return kept[0]


def _kl_rows(p_logits: torch.Tensor, q_logits: torch.Tensor, p_ids, q_ids) -> torch.Tensor:
    lp = torch.log_softmax(p_logits.index_select(-1, p_ids.to(p_logits.device)), -1)
    lq = torch.log_softmax(q_logits.index_select(-1, q_ids.to(q_logits.device)).to(lp.device), -1)
    p = lp.exp()
    return torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(-1).clamp_min(0)


@torch.no_grad()
def response_patch(src: Any, dst: Any, tokenizer: Any, ids: Sequence[Sequence[int]], response_start: Sequence[int],
                   layers: Sequence[int], k: int, src_ids: torch.Tensor, dst_ids: torch.Tensor,
                   batch_size: int = 16) -> dict:
    """Patch ``src``'s ``resid_post`` into ``dst`` at every position, per layer; the response readout.

    src/dst: HF causal LMs of the same width and depth reading the same ids. src_ids/dst_ids: the
    shared vocabulary in each model's ids. Returns ``{"gap": [N], "patch_kl": {layer: [N]}, "to_src":
    {layer: [N]}, "share_closed": {layer: float | None}}`` (per text: the mean over its first ``k``
    response tokens; share None without a gap)."""
    if k < 1:
        raise DataError(f"k must be >= 1 (response tokens read), got {k}")
    if len(ids) != len(response_start):
        raise DataError("give one response start per text")
    gap, patched, to_dst = [], {int(l): [] for l in layers}, {int(l): [] for l in layers}
    pad = pad_id_of(tokenizer)
    for i in range(0, len(ids), batch_size):
        chunk = [list(x) for x in ids[i:i + batch_size]]
        rs = list(response_start[i:i + batch_size])
        b = collate([Encoded(str(j), "", x, [True] * len(x)) for j, x in enumerate(chunk)], pad)
        idx, valid = response_rows(b, rs, [len(x) for x in chunk], k)
        n = valid.sum(-1).clamp_min(1)
        ref = _logits_at(src, b, idx)
        clean = _logits_at(dst, b, idx)
        gap.append(((_kl_rows(ref, clean, src_ids, dst_ids).cpu() * valid).sum(-1) / n))
        for l in patched:
            states = _states(src, b, l)
            out = _logits_at(dst, b, idx, {f"resid_post.{l}": replace_at(states)})
            patched[l].append((_kl_rows(ref, out, src_ids, dst_ids).cpu() * valid).sum(-1) / n)
            to_dst[l].append((_kl_rows(clean, out, dst_ids, dst_ids).cpu() * valid).sum(-1) / n)
    g = torch.cat(gap).double()
    res = {l: torch.cat(v).double() for l, v in patched.items()}
    share = {l: (1 - float(v.mean()) / float(g.mean())) if float(g.mean()) > 0 else None for l, v in res.items()}
    return {"gap": g, "to_src": res, "patch_kl": {l: torch.cat(v).double() for l, v in to_dst.items()},
            "share_closed": share}
