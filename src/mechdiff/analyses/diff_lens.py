"""Activation-difference lens: what a fine-tune adds to the residual stream on unrelated text.

Per layer ``l``: ``delta_l = mean over neutral texts and their first ``n_tokens`` content tokens of
(tuned resid_post_l - base resid_post_l)`` (``[L, d]``; BOS and other special tokens left out, and
only positions up to which both tokenizers read the same token strings). Each ``delta_l`` is read through
each model's final norm and unembedding (:func:`mechdiff.analyses.steering.logit_lens`: the top
promoted and suppressed tokens) and saved as a rank-1 ``add`` :class:`~mechdiff.analyses.steering.Handle`
(``basis = delta_l / ||delta_l||``, ``scale = ||delta_l||``: alpha 1 adds the mean difference to the
base, steering it toward the fine-tune).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from mechdiff.analyses.steering import Handle, logit_lens
from mechdiff.data.prompts import encode
from mechdiff.errors import DataError
from mechdiff.sites.capture import capture

__all__ = ["first_content", "diff_lens", "lens_handles"]


def first_content(batch, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(idx [B, n_tokens], valid [B, n_tokens])``: the first content tokens of each row of a left-padded
    :class:`~mechdiff.data.prompts.Batch` (no BOS, pad or template token)."""
    content = batch.content if batch.content is not None else batch.attention_mask.bool()
    B, T = content.shape
    idx = torch.full((B, n_tokens), -1, dtype=torch.long)
    for b in range(B):
        pos = content[b].nonzero().flatten()[:n_tokens]
        idx[b, :pos.numel()] = pos.cpu()
    return idx, idx >= 0


def _tokens_at(tok: Any, batch, idx: torch.Tensor) -> list[list[str | None]]:
    out = []
    for b in range(idx.shape[0]):
        out.append([tok.decode([int(batch.input_ids[b, int(i)])]) if i >= 0 else None for i in idx[b]])
    return out


@torch.no_grad()
def diff_lens(base: Any, tuned: Any, prompts: Sequence[dict], n_tokens: int = 5, batch_size: int = 32,
              top: int = 10) -> dict:
    """``{"delta": [L, d] float32, "n": kept positions, "lens": [{"layer", "norm", "base": lens, "tuned":
    lens}]}`` for two :class:`~mechdiff.models.load.LoadedModel` of the same width and depth."""
    if base.d_model != tuned.d_model or base.n_layers != tuned.n_layers:
        raise DataError(f"the activation-difference lens needs models of one shape (base d={base.d_model}, "
                        f"{base.n_layers} layers; tuned d={tuned.d_model}, {tuned.n_layers} layers)")
    if not prompts:
        raise DataError("the activation-difference lens needs neutral texts")
    L = base.n_layers
    sites = [f"resid_post.{l}" for l in range(L)]
    states, toks = [], []
    for m in (base, tuned):
        b = encode(m.tokenizer, list(prompts), chat=False)
        idx, valid = first_content(b, n_tokens)
        cap = capture(m.model, m.tokenizer, b, sites, positions=lambda bb: first_content(bb, n_tokens),
                      batch_size=batch_size)
        states.append(torch.stack([cap[s] for s in sites]))         # [L, N, K, d]
        toks.append((_tokens_at(m.tokenizer, b, idx), valid))
    (ta, va), (tb, vb) = toks
    same = torch.tensor([[x == y for x, y in zip(ra, rb)] for ra, rb in zip(ta, tb)])
    keep = (va & vb & same).long().cumprod(-1).bool()    # the whole prefix read alike, not just this token
    n = int(keep.sum())
    if n == 0:
        raise DataError("no neutral position where both tokenizers read the same token: nothing to average")
    diff = (states[1] - states[0]).double()                          # [L, N, K, d]
    delta = (diff * keep[None, :, :, None]).sum((1, 2)) / n          # [L, d]
    norms = delta.norm(dim=-1)
    unit = (delta / norms.clamp_min(1e-12)[:, None]).float()
    lens = {side: logit_lens(m.model, m.tokenizer, unit.T, top=top) for side, m in (("base", base), ("tuned", tuned))}
    rows = [{"layer": l, "norm": float(norms[l]), "base": lens["base"][l], "tuned": lens["tuned"][l]}
            for l in range(L)]
    return {"delta": delta.float(), "n": n, "n_tokens": n_tokens, "lens": rows}


def lens_handles(delta: torch.Tensor, provenance: dict | None = None) -> list[Handle]:
    """One rank-1 ``add`` handle per layer of ``delta [L, d]`` (zero layers skipped)."""
    out = []
    for l, v in enumerate(delta):
        nrm = float(v.double().norm())
        if not nrm > 0:
            continue
        out.append(Handle(layer=l, site="resid_post", basis=(v.double() / nrm).float()[:, None], mode="add",
                          alpha=1.0, scale=nrm, provenance={"kind": "diff_lens", **(provenance or {})}))
    return out
