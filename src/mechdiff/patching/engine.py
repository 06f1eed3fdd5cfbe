"""The :class:`PatchEngine`: the clean run (prefix KV caches grouped by decision position, clean
states at the decision position), no-op detection, and the batched patched runs (passes in the
branching layout: ``passes.py``; the naive full-recomputation reference: ``naive.py``). The package
docstring describes what it computes, why it is exact and why it is fast."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from mechdiff.errors import ConfigError, SiteError
from mechdiff.patching.passes import _inert, _Seg, _start, _trimmed, plan_passes, run_pass
from mechdiff.patching.plumbing import (_accepts, _attn_backends, _block_list, _cache_arg, _contiguous_head,
                                       _grouped_attention, _pass_cache)
from mechdiff.patching.variants import _noop_rows, _prepare
from mechdiff.sites.hooks import hooked
from mechdiff.sites.names import parse_site, resolve, site_str

MEASURES = ("last", "decision")


@dataclass
class _Group:
    rows: torch.Tensor       # [Bg] indices into the batch (engine device)
    lead: int                # first column with any content in these rows
    p: int                   # decision column, shared by the rows
    e: int                   # end (exclusive) of the suffix
    cache: object            # prefix KV cache (None when the prefix is empty)
    resid_pre: dict          # layer -> clean suffix residual entering the block, [Bg, s, d]


class PatchEngine:
    """Clean run plus batched patched runs of one model on one batch (see the package docstring).

    model: HF causal LM (eval mode). batch: ``mechdiff.data.prompts.Batch`` (left padded).
    measure: "last" | "decision". record_sites: sites whose clean value at the decision position
    :meth:`clean_states` returns. max_rows: most rows in one pass (reference rows + one row per
    (variant, prompt) computed); also the most prompts that share one prefix pass. Memory per pass
    ~ max_rows x (suffix length x d_model + vocab), plus one layer's prefix KV for those rows. None
    (default): :func:`mechdiff.batching.default_max_rows` (a share of the free GPU memory; 2048 on
    CPU), and the clean run's prefix passes take the whole batch.
    skip_layers: a pass row starts at its variant's first patched layer (blocks below are not
    recomputed). detect_noops: prompts a variant leaves bit for bit at the clean state get the clean
    logits without being computed (False: compute them too, e.g. to test the pass itself).
    packed, max_packed: accepted for compatibility and ignored (the packed layout, variants side by
    side along the sequence, is gone: identical variants at different pack positions did not give
    bitwise-equal logits, so it could not carry an exact in-pass reference).
    All settings give the same numbers as :meth:`run_naive` up to float rounding.
    """

    def __init__(self, model: nn.Module, batch, *, measure: str = "last", record_sites: Iterable = (),
                 max_rows: int | None = None, skip_layers: bool = True, packed: bool = True,
                 max_packed: int = 48, detect_noops: bool = True):
        if measure not in MEASURES:
            raise ConfigError(f"measure must be one of {', '.join(MEASURES)}, got {measure!r}")
        if max_rows is not None and max_rows < 1:
            raise ConfigError(f"max_rows must be >= 1, got {max_rows}")
        if max_packed < 1:
            raise ConfigError(f"max_packed must be >= 1, got {max_packed}")
        self.model, self.measure, self.skip_layers = model, measure, skip_layers
        self.max_rows = None if max_rows is None else int(max_rows)
        self.packed, self.max_packed, self.detect_noops = False, int(max_packed), bool(detect_noops)
        self._trim_final = True     # passes.py, _trimmed: the final block on the measured position only
        self.sm = resolve(model)
        from mechdiff.scale.devices import input_device
        self.device = input_device(model)           # a sharded model: where its embeddings run
        self.batch = batch.to(self.device)
        self.record_sites = [site_str(s) for s in record_sites]
        for s in self.record_sites:
            self.sm.check(*parse_site(s))
        self._blocks = _block_list(model, self.sm) if skip_layers else None
        self._logits_kw = {"logits_to_keep": 1} if _accepts(model.forward, "logits_to_keep") else {}
        self._cache, self._base_cache = _cache_arg(model), _cache_arg(model.base_model)
        self._tuple_len = 0
        B, T = self.batch.input_ids.shape
        dec = self.batch.decision.long()
        if (dec < 0).any() or (dec >= T).any():
            raise ConfigError(f"batch.decision must index into T={T}")
        self.B, self.T = B, T
        self.groups: list[_Group] = []
        self._clean = torch.empty(0)
        self._dec: dict[str, torch.Tensor] = {}   # "name.layer" -> [B, w] clean value at the decision token
        self._run_clean()
        if self.max_rows is None:
            from mechdiff.batching import default_max_rows
            s = max((g.e - g.p for g in self.groups), default=1)
            self.max_rows = default_max_rows(model, s, T)

    # ---- clean pass ----------------------------------------------------------------------
    def _suffix_end(self, p: int) -> int:
        return self.T if self.measure == "last" else p + 1

    @torch.no_grad()
    def _run_clean(self):
        b, L = self.batch, self.sm.n_layers
        dec = b.decision.long().cpu()
        mask = b.attention_mask.bool()
        logits: torch.Tensor | None = None
        resid = [f"{n}.{l}" for l in range(L) for n in ("resid_pre", "resid_post")]
        read = list(dict.fromkeys(resid + self.record_sites))
        for p in sorted(set(dec.tolist())):
            all_rows = torch.nonzero(dec == p).flatten()
            step = self.max_rows or self.B
            for c in range(0, len(all_rows), step):
                rows = all_rows[c:c + step].to(self.device)
                cols = mask[rows].any(0).nonzero().flatten()
                lead = min(int(cols[0]), p) if len(cols) else p
                cache = None
                if p > lead:
                    from transformers import DynamicCache
                    cache = DynamicCache(config=self.model.config)
                    with _attn_backends(self.device):
                        self.model.base_model(input_ids=b.input_ids[rows, lead:p],
                                              attention_mask=b.attention_mask[rows, lead:p],
                                              position_ids=b.position_ids[rows, lead:p],
                                              use_cache=True, **{self._base_cache: cache})
                g = _Group(rows, lead, p, self._suffix_end(p), cache, {})
                kinds = []
                h0 = self.sm.blocks[0].register_forward_hook(
                    lambda m, a, o: kinds.append(len(o) if isinstance(o, tuple) else 0))
                try:
                    out, rec = self._forward_clean(g, read)
                finally:
                    h0.remove()
                self._tuple_len = kinds[0] if kinds else 0
                if logits is None:
                    logits = out.new_empty((self.B, *out.shape[1:]))
                logits[rows] = out
                self._store(g, rec, read)
                if self._blocks is not None:
                    g.resid_pre = {l: rec[f"resid_pre.{l}"] for l in range(L)}
                self.groups.append(g)
        self._clean = logits

    def _forward_clean(self, g: _Group, read) -> tuple[torch.Tensor, dict]:
        """The clean suffix forward of group ``g``: logits ``[Bg, V]`` float32 at the measured position
        and the recording of ``read``. Deterministic: rerunning it reads the same values."""
        b = self.batch
        kw = dict(input_ids=b.input_ids[g.rows, g.p:g.e], attention_mask=b.attention_mask[g.rows, g.lead:g.e],
                  position_ids=b.position_ids[g.rows, g.p:g.e], **self._logits_kw)
        if g.cache is not None:
            kw.update({self._cache: _pass_cache(g.cache, []), "use_cache": True})  # never mutates g.cache
        else:
            kw.update(use_cache=False)
        with hooked(self.model, read=read) as rec, _contiguous_head(self.model), _attn_backends(self.device), \
                _grouped_attention():
            logits = self.model(**kw).logits
        return logits[:, -1].float().to(self.device), rec

    def _store(self, g: _Group, rec, sites):
        """Keep the decision-token column of each recorded site, ``[B, w]`` (head_z flattened)."""
        for s in sites:
            v = rec[s][:, 0]
            v = v.reshape(v.shape[0], -1).to(self.device, copy=True)   # [B, w] on the engine's device
            if s not in self._dec:
                self._dec[s] = v.new_empty((self.B, v.shape[-1]))
            self._dec[s][g.rows] = v

    @torch.no_grad()
    def _ensure_states(self, sites):
        """Record clean decision-token values at ``sites`` not yet recorded (re-runs the clean
        suffix passes, which reproduce the clean run bit for bit)."""
        missing = [s for s in dict.fromkeys(sites) if s not in self._dec]
        for g in self.groups if missing else ():
            _, rec = self._forward_clean(g, missing)
            self._store(g, rec, missing)

    # ---- public accessors ----------------------------------------------------------------
    @property
    def clean_logits(self) -> torch.Tensor:
        """``[B, V]`` float32 logits of the clean run at the measured position."""
        return self._clean

    def clean_states(self, sites: Iterable | None = None) -> dict[str, torch.Tensor]:
        """Clean values at the decision position: ``{site: [B, d]}`` (``[B, H, head_dim]`` for head_z)
        in the model's dtype. Only sites given as ``record_sites=`` at construction are available.
        Written back as a replace patch, such a value is a no-op: KL exactly 0."""
        sites = self.record_sites if sites is None else [site_str(s) for s in sites]
        missing = [s for s in sites if s not in self.record_sites]
        if missing:
            raise SiteError(f"sites {missing} were not recorded; pass them as record_sites= when building "
                            "the PatchEngine")
        out = {}
        for s in sites:
            v = self._dec[s]
            out[s] = v.view(self.B, self.sm.n_heads, self.sm.head_dim) if parse_site(s)[0] == "head_z" else v
        return out

    # ---- patched runs --------------------------------------------------------------------
    @torch.no_grad()
    def run(self, variants, positions: str = "decision", reduce=None, with_reference: bool = False):
        """``[n_variants, B, V]`` float32 logits at the measured position, one row per variant.

        A variant is a Patch or a list of Patch (all applied in one run); an empty list changes
        nothing (its rows are the clean logits). positions: "decision" (cache reuse) or "all" (every
        position; goes through run_naive).
        reduce: ``f(logits [n, b, V] float32, rows [b] long[, ref]) -> [n, b, ...]``, applied to each
        pass's logits (``rows``: which prompts of the batch, on the engine's device) so that only the
        reduced values are kept: the result is ``[n_variants, B, ...]`` (e.g. KL per prompt, see
        :func:`patch_kl`). A reduce that takes ``ref`` gets ``[n, b, V]``: the clean model computed
        along the same path as each of those rows (its in-pass reference; for prompts a variant
        leaves unchanged, the clean logits and ``logits`` is the same tensor). Compare with ``ref``,
        not ``clean_logits``: the two differ by float rounding. with_reference (no reduce): return
        ``(logits, ref)``, both ``[n_variants, B, V]``."""
        if positions == "all":
            if with_reference:
                raise ConfigError("with_reference needs positions='decision' (use run_naive's reduce with ref)")
            from mechdiff.patching.naive import run_naive
            return run_naive(self, variants, positions="all", reduce=reduce)
        if positions != "decision":
            raise ConfigError(f"positions must be 'decision' or 'all', got {positions!r}")
        prepared = _prepare(self.sm, variants, self.B, self.device)
        sink = _Sink(len(prepared), self.B, self._clean, reduce, with_reference)
        if not prepared:
            return sink.result()
        if self.detect_noops:
            self._ensure_states(f"{name}.{layer}" for var in prepared for name, layer, *_ in var)
            noop = _noop_rows(prepared, self._dec, self.B)                     # [n, B] bool, CPU
        else:
            noop = torch.zeros(len(prepared), self.B, dtype=torch.bool)
        L = self.sm.n_layers
        rows_cpu = [g.rows.cpu() for g in self.groups]
        inert = torch.tensor([v for v, var in enumerate(prepared)
                              if var and all(_inert(name, layer, L) for name, layer, *_ in var)], dtype=torch.long)
        for g, on_cpu in zip(self.groups, rows_cpu) if len(inert) else ():
            if _trimmed(self, g):   # variants that cannot reach the measured position: exactly clean
                noop[inert[:, None], on_cpu[None, :]] = True
        sink.put_clean(noop)
        starts = [_start(var, L) for var in prepared]
        for g, on_cpu in zip(self.groups, rows_cpu):
            todo = ~noop[:, on_cpu]                                            # [n, Bg]
            segs = [_Seg(v, starts[v], todo[v].nonzero().flatten()) for v in range(len(prepared))
                    if todo[v].any()]
            for plan in plan_passes(segs, self.max_rows):
                lg, R = run_pass(self, g, plan, prepared)                      # [N, V]
                refs, off, segs = plan.refs.to(self.device), R, plan.segs
                while segs:   # consecutive segments on the same rows: one reduce call
                    m = 1
                    while m < len(segs) and torch.equal(segs[m].rows, segs[0].rows):
                        m += 1
                    rows, k = segs[0].rows.to(self.device), len(segs[0].rows)
                    ref = lg[torch.searchsorted(refs, rows)][None].expand(m, -1, -1)
                    sink.put([s.v for s in segs[:m]], g.rows[rows], lg[off:off + m * k].view(m, k, -1), ref)
                    off, segs = off + m * k, segs[m:]
        return sink.result()

    def run_naive(self, variants, positions: str = "decision", reduce=None) -> torch.Tensor:
        """Reference: one full forward of the whole batch per variant (see :func:`naive.run_naive`)."""
        from mechdiff.patching.naive import run_naive
        return run_naive(self, variants, positions=positions, reduce=reduce)


class _Sink:
    """Collects ``[n_variants, B, ...]`` results: logits, or ``reduce`` of them, written by (variants,
    rows) blocks; ``put_clean`` writes the clean logits where a variant changes nothing."""

    def __init__(self, n: int, B: int, clean: torch.Tensor, reduce, with_reference: bool):
        self.n, self.B, self.clean, self.reduce = n, B, clean, reduce
        self.with_ref = with_reference and reduce is None
        self.wants_ref = reduce is not None and _accepts(reduce, "ref", var_keyword=True)
        self.out = self.ref = None
        if reduce is None:
            self.out = torch.empty(n, B, clean.shape[-1], dtype=torch.float32, device=clean.device)
            self.ref = torch.empty_like(self.out) if self.with_ref else None

    def put(self, vs: list, rows: torch.Tensor, lg: torch.Tensor, ref: torch.Tensor):
        """lg, ref: ``[len(vs), len(rows), V]``."""
        if self.reduce is not None:
            lg = self.reduce(lg, rows, ref=ref) if self.wants_ref else self.reduce(lg, rows)
            if self.out is None:
                self.out = lg.new_empty((self.n, self.B, *lg.shape[2:]))
        idx = (torch.tensor(vs, device=self.out.device)[:, None], rows.to(self.out.device)[None, :])
        self.out[idx] = lg.to(self.out.device)
        if self.ref is not None:
            self.ref[idx] = ref.to(self.out.device)

    def put_clean(self, noop: torch.Tensor):
        groups: dict[bytes, list] = {}
        for v in range(self.n):
            if noop[v].any():
                groups.setdefault(noop[v].numpy().tobytes(), []).append(v)
        for vs in groups.values():
            rows = noop[vs[0]].nonzero().flatten().to(self.clean.device)
            c = self.clean[rows][None].expand(len(vs), -1, -1)
            self.put(vs, rows, c, c)

    def result(self):
        if self.out is None:   # no variants, with a reduce
            return torch.empty(self.n, self.B)
        return (self.out, self.ref) if self.with_ref else self.out
