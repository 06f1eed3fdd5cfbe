"""The naive reference of :class:`PatchEngine`: one full forward of the whole batch per variant with
hooks at the decision position (or every position), no cache reuse, no layer skipping."""
from __future__ import annotations

import torch

from mechdiff.errors import ConfigError
from mechdiff.patching.plumbing import _accepts, _attn_backends
from mechdiff.patching.variants import _prepare, site_edits
from mechdiff.sites.hooks import hooked


@torch.no_grad()
def run_naive(eng, variants, positions: str = "decision", reduce=None) -> torch.Tensor:
    """``[n_variants, B, V]`` float32 logits at ``eng``'s measured position, one full forward per
    variant. positions="decision" patches at ``batch.decision``; "all" patches every position
    (values ``[B, T, d]`` or ``[B, d]``/``[d]`` broadcast over positions). reduce: as in
    :meth:`PatchEngine.run`, applied to each variant's ``[1, B, V]`` logits; one that takes ``ref``
    gets the unpatched full forward (same path) as ``[1, B, V]``."""
    if positions not in ("decision", "all"):
        raise ConfigError(f"positions must be 'decision' or 'all', got {positions!r}")
    prepared = _prepare(eng.sm, variants, eng.B, eng.device, positions=positions)
    b = eng.batch
    ar = torch.arange(eng.B, device=eng.device)
    dec = b.decision.long()

    def forward(edits):
        with hooked(eng.model, edit=edits), _attn_backends(eng.device):
            if eng.measure == "last":
                return eng.model(**b.model_inputs(), **eng._logits_kw).logits[:, -1].float().to(eng.device)
            lg = eng.model(**b.model_inputs()).logits
            return lg[ar.to(lg.device), dec.to(lg.device)].float().to(eng.device)

    wants_ref = reduce is not None and _accepts(reduce, "ref", var_keyword=True)
    ref = forward({})[None] if wants_ref and prepared else None
    outs = []
    for var in prepared:
        lg = forward(site_edits(var, None if positions == "all" else (ar, dec)))
        if reduce is not None:
            lg = (reduce(lg[None], ar, ref=ref) if wants_ref else reduce(lg[None], ar))[0]
        outs.append(lg)
    if not outs:
        e = torch.empty(0, eng.B, eng.clean_logits.shape[-1])
        return e if reduce is None else e[..., 0]
    return torch.stack(outs)
