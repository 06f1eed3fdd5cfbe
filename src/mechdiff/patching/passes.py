"""Patched passes in the branching layout (what :meth:`PatchEngine.run` computes for the prompts a
variant really changes).

A pass runs the suffix tokens of one group (prompts sharing a decision column ``p``) for ``N``
stacked rows: first ``R`` *reference* rows (the clean model, one per prompt in the pass), then one
row per (variant, prompt) entry, entries sorted by start layer. The reference rows enter at the
pass's start layer ``S`` with the clean residual; an entry joins at its own start layer as a copy of
its prompt's reference row there (``plumbing._branching``), so up to its first patch an entry *is*
its reference, computed in the same kernel calls. Every row attends to its own prompt's prefix KV
cache (``plumbing._pass_cache``). Each entry is compared with its own reference row: a patch that
changes nothing gives the reference's logits bit for bit, and a real patch is not mixed with
rounding differences between the pass and the clean run (DESIGN.md, "bf16 path dependence").
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mechdiff.patching.plumbing import (_attn_backends, _branching, _contiguous_head, _grouped_attention,
                                       _last_position_only, _pass_cache, _skipping)
from mechdiff.patching.variants import _apply
from mechdiff.sites.hooks import hooked

_ORDER = {"resid_pre": 0, "head_z": 1, "attn_out": 2, "mlp_out": 3, "resid_post": 4}


def _inert(name: str, layer: int, L: int) -> bool:
    """A patch at the decision token that cannot reach a later position's logits: it edits the final
    block after its keys/values are made (head_z, attn_out, mlp_out, resid_post of layer ``L-1``), so
    it changes only the decision token's own output. Where the measured position is later (``last``
    readout, suffix longer than one token) such a patch is dropped and changes nothing, exactly."""
    return layer == L - 1 and name in ("head_z", "attn_out", "mlp_out", "resid_post")


def _trimmed(eng, g) -> bool:
    """Whether group ``g``'s passes read a position after the decision token (``last`` readout, a
    suffix of more than one token): then the final block runs on the last position only and
    :func:`_inert` patches are dropped (``eng._trim_final = False`` turns this off, for benchmarks)."""
    return eng._trim_final and eng.measure == "last" and g.e - g.p > 1


def _pass_site(name: str, layer: int, L: int) -> tuple[str, int]:
    """Where a pass applies a patch: ``resid_post.l`` is the input of block ``l+1`` (the same tensor),
    so it is applied there and its variant starts one layer later."""
    return ("resid_pre", layer + 1) if name == "resid_post" and layer < L - 1 else (name, layer)


def _start(var, L: int) -> int:
    """First block a variant's pass rows must run (a variant without patches: the last)."""
    return min((_pass_site(name, layer, L)[1] for name, layer, *_ in var), default=L - 1)


@dataclass
class _Seg:
    v: int                   # variant index
    start: int               # its start layer
    rows: torch.Tensor       # [k] sorted rows of the group (local indices) it runs on


@dataclass
class _Plan:
    segs: list = field(default_factory=list)
    refs: torch.Tensor = None  # [R] sorted local rows with a reference row

    def size_with(self, rows: torch.Tensor) -> int:
        n = sum(len(s.rows) for s in self.segs) + len(rows)
        refs = rows if self.refs is None else torch.cat([self.refs, rows]).unique()
        return n + len(refs)

    def add(self, seg: _Seg):
        self.segs.append(seg)
        self.refs = seg.rows if self.refs is None else torch.cat([self.refs, seg.rows]).unique()


def plan_passes(segs: list, max_rows: int) -> list:
    """Group segments (sorted by start, then variant) into passes of at most ``max_rows`` rows
    (entries plus reference rows; a pass holds at least one entry and its reference)."""
    plans, cur = [], _Plan()
    for seg in sorted(segs, key=lambda s: (s.start, s.v)):
        rows = seg.rows
        while len(rows):
            if cur.segs and cur.size_with(rows) > max_rows:
                plans.append(cur)
                cur = _Plan()
            k = len(rows) if cur.size_with(rows) <= max_rows else max(1, max_rows // 2)
            cur.add(_Seg(seg.v, seg.start, rows[:k]))
            rows = rows[k:]
            if len(rows):
                plans.append(cur)
                cur = _Plan()
    if cur.segs:
        plans.append(cur)
    return plans


def _edits(eng, g, plan: _Plan, prepared, R: int) -> dict:
    """{site: f(t)} editing each entry's decision token (suffix offset 0) in the pass layout
    (:func:`_inert` patches dropped where the group is :func:`_trimmed`)."""
    L, trim = eng.sm.n_layers, _trimmed(eng, g)
    by_site: dict[str, list] = {}
    off = R
    for seg in plan.segs:
        sl = slice(off, off + len(seg.rows))
        off += len(seg.rows)
        grows = g.rows[seg.rows.to(g.rows.device)]
        var = sorted(prepared[seg.v], key=lambda x: (x[1], _ORDER[x[0]]))   # forward order
        for name, layer, p, value, basis, centre in var:
            if trim and _inert(name, layer, L):
                continue
            value = value[grows] if value is not None and value.dim() == 2 else value
            centre = centre[grows] if centre is not None and centre.dim() == 2 else centre
            site = "%s.%d" % _pass_site(name, layer, L)
            by_site.setdefault(site, []).append((sl, p, value, basis, centre))

    def make(entries):
        def f(t):
            out = t.clone()
            flat = out.view(*out.shape[:2], -1)
            for sl, p, value, basis, centre in entries:
                flat[sl, 0] = _apply(flat[sl, 0], p, value, basis, centre)
            return out
        return f

    return {k: make(v) for k, v in by_site.items()}


def run_pass(eng, g, plan: _Plan, prepared) -> tuple[torch.Tensor, int]:
    """Run one pass; returns its logits at the measured position ``[N, V]`` float32 (rows: the
    ``R`` references in ``plan.refs`` order, then each segment's entries) and ``R``."""
    b, dev, L = eng.batch, eng.device, eng.sm.n_layers
    refs = plan.refs.to(dev)
    local = torch.cat([refs] + [s.rows.to(dev) for s in plan.segs])         # [N] rows of the group
    N, R = len(local), len(refs)
    grow = g.rows[local]
    kw = dict(input_ids=b.input_ids[grow, g.p:g.e], attention_mask=b.attention_mask[grow, g.lead:g.e],
              position_ids=b.position_ids[grow, g.p:g.e], **eng._logits_kw)
    branch = eng._blocks is not None
    S = min(s.start for s in plan.segs) if branch else 0
    if branch:
        counts = [R + sum(len(s.rows) for s in plan.segs if s.start <= i) for i in range(L)]
    else:
        counts = [N] * L
    if g.cache is not None:
        kw.update({eng._cache: _pass_cache(g.cache, [local[:counts[i]] if i >= S else None for i in range(L)]),
                   "use_cache": True})
    else:
        kw.update(use_cache=False)
    join = torch.cat([torch.arange(R, device=dev), torch.searchsorted(refs, local[R:])])
    skip = _skipping(eng._blocks if S > 0 else None, S, eng._tuple_len)
    if branch:
        first = g.resid_pre[S]                      # on block S's input device (sharded: another GPU)
        grow_ctx = _branching(eng.sm.blocks, S, counts, join, first[local[:counts[S]].to(first.device)], N)
    else:
        grow_ctx = _skipping(None, 0, 0)
    last_only = (eng.sm.oproj[L - 1], eng.sm.ffn[L - 1]) if _trimmed(eng, g) else ()
    with skip, grow_ctx, hooked(eng.model, edit=_edits(eng, g, plan, prepared, R)), \
            _last_position_only(last_only), _contiguous_head(eng.model), _attn_backends(dev), _grouped_attention():
        logits = eng.model(**kw).logits
    return logits[:, -1].float().to(dev), R
