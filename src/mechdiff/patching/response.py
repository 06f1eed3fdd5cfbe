"""Response readout: read the whole answer, not only its first token, under any patch.

Each text is a prompt with a response, teacher-forced (the same ids in both models: one tokenizer).
A *variant* is an edit of the destination model ``dst`` at one or more sites, applied at *every*
position (prompt and response alike) through the one formula per mode of
:class:`mechdiff.patching.Patch` (``variants._apply``: replace / add / steer / ablate / affine). Where
a mode needs another model's states (a raw patch's value, a mapped patch's input, an ablation's
reference), the variant reads the reference model ``ref``'s states at a site on the same batch,
``[B, T, w]`` (left padding included, so they line up with the destination's positions).

Per text, means over its first ``k`` response tokens (the distributions that predict them, masked to
the shared vocabulary):

- ``gap``: KL(ref clean || dst clean), the response-level gap;
- ``patch_kl``: KL(dst clean || dst patched) (RQ1's / RQ2's patch KL read over the response); layers
  both models share below a fine-tune's first changed layer give exactly 0 for a raw patch;
- ``to_ref``: KL(ref clean || dst patched); ``share_closed = 1 - mean(to_ref) / mean(gap)``.

:func:`response_readout` is the one loop; :func:`response_patch` (RQ1's layer patching, the source's
``resid_post`` written into the destination) is that loop with one raw replace variant per layer.

Shapes: ``ids`` is a list of token id lists; ``response_start[i]`` is the index of text ``i``'s first
response token; logits are read only at ``[B, k]`` rows (the output layer never sees ``[B, T]``).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

from mechdiff.data.prompts import Encoded, collate, pad_id_of
from mechdiff.errors import DataError
from mechdiff.patching.kl import kl_shared
from mechdiff.patching.variants import Patch, _prepare, site_edits
from mechdiff.sites.hooks import hooked
from mechdiff.sites.names import resolve, site_str
from mechdiff.texts.divergence import final_hidden, head_logits

__all__ = ["response_rows", "response_readout", "response_patch", "States", "Build"]

#: ``states(site) -> [B, T, w]``: the reference model's states at ``site`` on the current batch
States = Callable[[str], torch.Tensor]
#: a variant: ``build(states) -> Patch | [Patch, ...]`` (values ``[B, T, w]``, ``[B, w]`` or ``[w]``)
Build = Callable[[States], "Patch | Sequence[Patch]"]


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


def _states(model: Any, batch, site: str) -> torch.Tensor:
    """``[B, T, w]`` the model's (clean) states at ``site`` on ``batch`` (``head_z``: ``[B, T, H, hd]``)."""
    kept: list[torch.Tensor] = []

    def grab(t):
        kept.append(t.detach())
        return None
    with hooked(model, edit={site: grab}):
        final_hidden(model, batch)
    return kept[0]


def _kl_rows(p_logits: torch.Tensor, q_logits: torch.Tensor, p_ids, q_ids) -> torch.Tensor:
    """``[B, k]`` KL(p || q) per row over the shared vocabulary (:func:`mechdiff.patching.kl.kl_shared`;
    ``q`` moved to ``p``'s device: two models may sit on two GPUs)."""
    return kl_shared(p_logits, q_logits.to(p_logits.device), p_ids, q_ids)


@torch.no_grad()
def response_readout(dst: Any, ref: Any, tokenizer: Any, ids: Sequence[Sequence[int]], response_start: Sequence[int],
                     k: int, variants: Mapping[Any, Build], dst_ids: torch.Tensor, ref_ids: torch.Tensor,
                     batch_size: int = 16) -> dict:
    """Every variant of ``dst`` read over the first ``k`` response tokens of each text, against ``ref``.

    dst / ref: HF causal LMs reading the same ids (``ref`` may be ``dst``: a model against itself).
    variants: ``{name: build}``; ``build(states)`` returns the :class:`Patch` (or list) of one batch,
    ``states(site)`` giving ``ref``'s clean states there, ``[B, T, w]`` (read once per batch and site).
    dst_ids / ref_ids: the shared vocabulary in each model's ids. Returns ``{"gap": [N], "patch_kl":
    {name: [N]}, "to_ref": {name: [N]}, "share_closed": {name: float | None}}`` (float64; per text the
    mean over its first ``k`` response tokens; share None without a gap)."""
    if k < 1:
        raise DataError(f"k must be >= 1 (response tokens read), got {k}")
    if len(ids) != len(response_start):
        raise DataError("give one response start per text")
    names = list(variants)
    gap, to_ref, patched = [], {n: [] for n in names}, {n: [] for n in names}
    pad, sm, dev = pad_id_of(tokenizer), resolve(dst), next(dst.parameters()).device
    for i in range(0, len(ids), batch_size):
        chunk = [list(x) for x in ids[i:i + batch_size]]
        rs = list(response_start[i:i + batch_size])
        b = collate([Encoded(str(j), "", x, [True] * len(x)) for j, x in enumerate(chunk)], pad)
        idx, valid = response_rows(b, rs, [len(x) for x in chunk], k)
        n = valid.sum(-1).clamp_min(1)
        ref_logits = _logits_at(ref, b, idx)
        clean = _logits_at(dst, b, idx)
        gap.append(((_kl_rows(ref_logits, clean, ref_ids, dst_ids).cpu() * valid).sum(-1) / n))
        cache: dict[str, torch.Tensor] = {}

        def states(site, b=b, cache=cache):
            key = site_str(site)
            if key not in cache:
                cache[key] = _states(ref, b, key)
            return cache[key]
        for name in names:
            patches = variants[name](states)
            prepared = _prepare(sm, patches, len(chunk), dev, positions="all")[0]
            out = _logits_at(dst, b, idx, site_edits(prepared))
            to_ref[name].append((_kl_rows(ref_logits, out, ref_ids, dst_ids).cpu() * valid).sum(-1) / n)
            patched[name].append((_kl_rows(clean, out, dst_ids, dst_ids).cpu() * valid).sum(-1) / n)
    g = torch.cat(gap).double() if gap else torch.zeros(0, dtype=torch.float64)
    res = {n: torch.cat(v).double() if v else torch.zeros(0, dtype=torch.float64) for n, v in to_ref.items()}
    share = {n: (1 - float(v.mean()) / float(g.mean())) if g.numel() and float(g.mean()) > 0 else None
             for n, v in res.items()}
    return {"gap": g, "to_ref": res, "share_closed": share,
            "patch_kl": {n: torch.cat(v).double() if v else torch.zeros(0, dtype=torch.float64)
                         for n, v in patched.items()}}


def raw_patch(site: str) -> Build:
    """The raw patch at ``site``: the reference model's states written at every position (replace)."""
    return lambda states: Patch(site, states(site))


@torch.no_grad()
def response_patch(src: Any, dst: Any, tokenizer: Any, ids: Sequence[Sequence[int]], response_start: Sequence[int],
                   layers: Sequence[int], k: int, src_ids: torch.Tensor, dst_ids: torch.Tensor,
                   batch_size: int = 16) -> dict:
    """Patch ``src``'s ``resid_post`` into ``dst`` at every position, per layer; the response readout
    (:func:`response_readout` with one :func:`raw_patch` per layer, ``ref = src``).

    src/dst: HF causal LMs of the same width and depth reading the same ids. src_ids/dst_ids: the
    shared vocabulary in each model's ids. Returns ``{"gap": [N], "patch_kl": {layer: [N]}, "to_src":
    {layer: [N]}, "share_closed": {layer: float | None}}`` (per text: the mean over its first ``k``
    response tokens; share None without a gap)."""
    out = response_readout(dst, src, tokenizer, ids, response_start, k,
                           {int(l): raw_patch(f"resid_post.{int(l)}") for l in layers}, dst_ids, src_ids, batch_size)
    return {"gap": out["gap"], "to_src": out["to_ref"], "patch_kl": out["patch_kl"],
            "share_closed": out["share_closed"]}
