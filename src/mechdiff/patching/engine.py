"""The :class:`PatchEngine`: the clean run (prefix KV caches grouped by decision position, recorded
states), batched patched runs in the stacked or packed layout (including the packed layout's 4D
attention masks) and the naive full-recomputation reference ``run_naive``. The package docstring
describes what it computes and why it is fast."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from mechdiff.errors import ConfigError, SiteError
from mechdiff.patching.plumbing import (_accepts, _attn_backends, _block_list, _copy_cache, _growing,
                                      _skipping)
from mechdiff.patching.variants import _apply, _prepare
from mechdiff.sites.hooks import hooked
from mechdiff.sites.names import parse_site, resolve, site_str

MEASURES = ("last", "decision")

_ORDER = {"resid_pre": 0, "head_z": 1, "attn_out": 2, "mlp_out": 3, "resid_post": 4}


@dataclass
class _Group:
    rows: torch.Tensor       # [Bg] indices into the batch
    lead: int                # first column with any content in these rows
    p: int                   # decision column, shared by the rows
    e: int                   # end (exclusive) of the suffix
    cache: object            # prefix KV cache (None when the prefix is empty)
    resid_pre: dict          # layer -> clean suffix residual entering the block, [Bg, s, d]


class PatchEngine:
    """Clean run plus batched patched runs of one model on one batch (see the package docstring).

    model: HF causal LM (eval mode). batch: ``mechdiff.data.prompts.Batch`` (left padded).
    measure: "last" | "decision". record_sites: sites whose clean value at the decision position
    :meth:`clean_states` returns. max_rows: most (variant, prompt) pairs in one suffix pass (memory
    per pass ~ max_rows x (suffix length x d_model + vocab) packed, plus max_rows prefix caches when
    stacked); also the most prompts that share one prefix pass. skip_layers: do not recompute layers below a pass's shallowest patched layer.
    packed: lay a pass's variants side by side along the sequence of each prompt, all attending to
    one shared prefix cache through a custom 4D mask (needs sdpa or eager attention; otherwise, or
    with packed=False, variants are stacked along the batch with the prefix cache repeated).
    max_packed: most suffix tokens side by side in one packed pass (variants per pass <=
    max_packed // suffix length): with ``measure="last"`` (a template tail of several tokens) a
    pass then holds a few variants of neighbouring start layers (variants are sorted by start)
    instead of all of them; with ``"decision"`` (1 token) up to 48 variants share a pass.
    All settings give the same numbers as :meth:`run_naive` up to float rounding.
    """

    def __init__(self, model: nn.Module, batch, *, measure: str = "last", record_sites: Iterable = (),
                 max_rows: int = 2048, skip_layers: bool = True, packed: bool = True,
                 max_packed: int = 48):
        if measure not in MEASURES:
            raise ConfigError(f"measure must be one of {', '.join(MEASURES)}, got {measure!r}")
        if max_rows < 1:
            raise ConfigError(f"max_rows must be >= 1, got {max_rows}")
        if max_packed < 1:
            raise ConfigError(f"max_packed must be >= 1, got {max_packed}")
        self.max_packed = int(max_packed)
        self.model, self.measure, self.max_rows, self.skip_layers = model, measure, int(max_rows), skip_layers
        self.sm = resolve(model)
        self.device = next(model.parameters()).device
        self.batch = batch.to(self.device)
        self.record_sites = [site_str(s) for s in record_sites]
        for s in self.record_sites:
            self.sm.check(*parse_site(s))
        self._blocks = _block_list(model, self.sm) if skip_layers else None
        self._keep = _accepts(model, "logits_to_keep")
        self._logits_kw = {"logits_to_keep": 1} if self._keep else {}
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        self._mask_kind = impl if impl in ("sdpa", "eager") else None
        self.packed = packed and self._mask_kind is not None
        self._tuple_len = 0
        B, T = self.batch.input_ids.shape
        dec = self.batch.decision.long()
        if (dec < 0).any() or (dec >= T).any():
            raise ConfigError(f"batch.decision must index into T={T}")
        self.B, self.T = B, T
        self.groups: list[_Group] = []
        self._clean = torch.empty(0)
        self._states: dict[str, torch.Tensor] = {}
        self._run_clean()

    # ---- clean pass ----------------------------------------------------------------------
    def _suffix_end(self, p: int) -> int:
        return self.T if self.measure == "last" else p + 1

    @torch.no_grad()
    def _run_clean(self):
        b, sm = self.batch, self.sm
        dec = b.decision.long().cpu()
        mask = b.attention_mask.bool()
        logits: torch.Tensor | None = None
        states: dict[str, torch.Tensor] = {}
        pre_sites = [f"resid_pre.{l}" for l in range(sm.n_layers)] if self._blocks is not None else []
        read = list(dict.fromkeys(self.record_sites + pre_sites))
        for p in sorted(set(dec.tolist())):
            all_rows = torch.nonzero(dec == p).flatten()
            for c in range(0, len(all_rows), self.max_rows):
                rows = all_rows[c:c + self.max_rows].to(self.device)
                cols = mask[rows].any(0).nonzero().flatten()
                lead = min(int(cols[0]), p) if len(cols) else p
                e = self._suffix_end(p)
                cache = None
                if p > lead:
                    from transformers import DynamicCache
                    cache = DynamicCache(config=self.model.config)
                    with _attn_backends(self.device):
                        self.model.base_model(input_ids=b.input_ids[rows, lead:p],
                                              attention_mask=b.attention_mask[rows, lead:p],
                                              position_ids=b.position_ids[rows, lead:p],
                                              past_key_values=cache, use_cache=True)
                kinds = []
                h0 = sm.blocks[0].register_forward_hook(
                    lambda m, a, o: kinds.append(len(o) if isinstance(o, tuple) else 0))
                try:
                    with hooked(self.model, read=read) as rec:
                        out = self._forward(rows, lead, p, e, cache, n=1, start=0)
                finally:
                    h0.remove()
                self._tuple_len = kinds[0] if kinds else 0
                if logits is None:
                    logits = out.new_empty((self.B, *out.shape[1:]))
                logits[rows] = out
                for s in self.record_sites:
                    v = rec[s][:, 0]
                    if s not in states:
                        states[s] = v.new_empty((self.B, *v.shape[1:]))
                    states[s][rows] = v
                self.groups.append(_Group(rows, lead, p, e, cache,
                                          {l: rec[f"resid_pre.{l}"] for l in range(sm.n_layers)} if pre_sites else {}))
        self._clean = logits
        self._states = states

    def _forward(self, rows, lead, p, e, cache, n: int, start: int) -> torch.Tensor:
        """Suffix forward of ``n`` stacked copies of ``rows``; logits at the measured position."""
        b = self.batch
        rep = lambda t: t.repeat(n, 1) if n > 1 else t  # noqa: E731
        kw = dict(input_ids=rep(b.input_ids[rows, p:e]), attention_mask=rep(b.attention_mask[rows, lead:e]),
                  position_ids=rep(b.position_ids[rows, p:e]), **self._logits_kw)
        if cache is not None:
            kw.update(past_key_values=_copy_cache(cache, n, start), use_cache=True)
        else:
            kw.update(use_cache=False)
        with _skipping(self._blocks if start > 0 else None, start, self._tuple_len), \
                _attn_backends(self.device):
            logits = self.model(**kw).logits
        return logits[:, -1].float()

    # ---- public accessors ----------------------------------------------------------------
    @property
    def clean_logits(self) -> torch.Tensor:
        """``[B, V]`` float32 logits of the clean run at the measured position."""
        return self._clean

    def clean_states(self, sites: Iterable | None = None) -> dict[str, torch.Tensor]:
        """Clean values at the decision position: ``{site: [B, d]}`` (``[B, H, head_dim]`` for head_z).
        Only sites given as ``record_sites=`` at construction are available."""
        sites = self.record_sites if sites is None else [site_str(s) for s in sites]
        missing = [s for s in sites if s not in self._states]
        if missing:
            raise SiteError(f"sites {missing} were not recorded; pass them as record_sites= when building "
                            "the PatchEngine")
        return {s: self._states[s] for s in sites}

    # ---- patched runs --------------------------------------------------------------------
    @torch.no_grad()
    def run(self, variants, positions: str = "decision", reduce=None) -> torch.Tensor:
        """``[n_variants, B, V]`` float32 logits at the measured position, one row per variant.

        A variant is a Patch or a list of Patch (all applied in one run); an empty list is the
        clean model run through the same batched path (its numerical noise floor).
        positions: "decision" (cache reuse) or "all" (every position; goes through run_naive).
        reduce: ``f(logits [n, b, V] float32, rows [b] long) -> [n, b, ...]``, applied to each pass's
        logits (``rows``: which prompts of the batch, on the engine's device) so that only the
        reduced values are kept: the result is ``[n_variants, B, ...]`` (e.g. KL per prompt, see
        :func:`patch_kl`) and the full ``[n_variants, B, V]`` logits never exist at once."""
        if positions == "all":
            return self.run_naive(variants, positions="all", reduce=reduce)
        if positions != "decision":
            raise ConfigError(f"positions must be 'decision' or 'all', got {positions!r}")
        prepared = _prepare(self.sm, variants, self.B, self.device)
        n_var = len(prepared)
        out = None
        if n_var == 0 or reduce is None:
            out = torch.empty(n_var, self.B, self._clean.shape[-1], dtype=torch.float32,
                              device=self._clean.device)
        if n_var == 0:
            return out if reduce is None else out[..., 0]
        L = self.sm.n_layers

        def start_of(var):
            return min((layer for _, layer, *_ in var), default=L - 1)

        order = sorted(range(n_var), key=lambda i: start_of(prepared[i]))
        for g in self.groups:
            Bg = len(g.rows)
            packed = self.packed and self._packable(g)
            per = max(1, self.max_rows // Bg)
            if packed:
                per = min(per, max(1, self.max_packed // (g.e - g.p)))
            rows_dev = g.rows.to(self.device)
            for c in range(0, n_var, per):
                idx = order[c:c + per]
                start = start_of(prepared[idx[0]]) if self._blocks is not None else 0
                edits = self._edits(g, [prepared[i] for i in idx], 0 if packed else start, packed)
                starts = [start_of(prepared[i]) for i in idx] if self._blocks is not None else None
                with hooked(self.model, edit=edits):
                    if packed:
                        lg = self._forward_packed(g, n=len(idx), starts=starts)       # [Bg, n, V]
                        lg = lg.transpose(0, 1)
                    else:
                        lg = self._forward(g.rows, g.lead, g.p, g.e, g.cache, n=len(idx), start=start)
                        lg = lg.view(len(idx), Bg, -1)
                if reduce is not None:
                    lg = reduce(lg, rows_dev)
                    if out is None:
                        out = lg.new_empty((n_var, self.B, *lg.shape[2:]))
                out[torch.tensor(idx, device=out.device)[:, None], g.rows.to(out.device)[None, :]] = \
                    lg.to(out.device)
        return out

    def _edits(self, g: _Group, chunk, start: int, packed: bool) -> dict:
        """{site: f(t)} editing each variant's decision token. Stacked layout: variant v owns rows
        [v*Bg, (v+1)*Bg) at suffix offset 0; packed layout: all rows, sequence offset v*s."""
        Bg, s, n = len(g.rows), g.e - g.p, len(chunk)
        by_site: dict[str, list] = {}
        for v, var in enumerate(chunk):
            for name, layer, p, value, basis in var:
                if value is not None and value.dim() == 2:
                    value = value[g.rows]
                by_site.setdefault(f"{name}.{layer}", []).append((v, p, value, basis))
        restore = None
        if start > 0:
            clean = g.resid_pre[start]  # [Bg, s, d]
            restore = clean if n == 1 else (clean.repeat(1, n, 1) if packed else clean.repeat(n, 1, 1))
            by_site.setdefault(f"resid_pre.{start}", [])

        def make(key, entries):
            is_restore = restore is not None and key == f"resid_pre.{start}"

            def f(t):
                out = restore.to(t.dtype).clone() if is_restore else t.clone()
                flat = out.view(*out.shape[:2], -1)
                for v, p, value, basis in entries:
                    sel = (slice(None), v * s) if packed else (slice(v * Bg, (v + 1) * Bg), 0)
                    flat[sel] = _apply(flat[sel], p, value, basis)
                return out
            return f

        return {k: make(k, ents) for k, ents in by_site.items()}

    # ---- packed layout: variants side by side along the sequence, sharing one prefix cache ----
    def _packable(self, g: _Group) -> bool:
        """Packed passes need sdpa/eager attention (custom 4D masks) and HF dynamic cache layers
        whose prefix length is readable (full: all of it; sliding: the most recent window - 1)."""
        if g.cache is None:
            return True
        for lay in g.cache.layers:
            if type(lay).__name__ not in ("DynamicLayer", "DynamicSlidingWindowLayer"):
                return False
        return True

    def _packed_mask(self, g: _Group, n: int):
        """4D masks ``[Bg, 1, n*s, k + n*s]`` (one per attention layer type when they differ): each
        variant's suffix sees the prefix (minus padding, within the sliding window) and itself,
        causally; never another variant."""
        b, dev = self.batch, self.device
        s, P = g.e - g.p, g.p - g.lead
        o = torch.arange(s, device=dev).repeat(n)                  # suffix offset of each query/key
        blk = torch.arange(n, device=dev).repeat_interleave(s)
        own = (blk[:, None] == blk[None, :]) & (o[None, :] <= o[:, None])
        pad = b.attention_mask[g.rows, g.lead:g.p].bool()          # [Bg, P]
        dtype = next(self.model.parameters()).dtype

        def build(k: int, window: int | None):
            pre = pad[:, P - k:] if k else pad[:, :0]
            r = torch.arange(k, device=dev)
            pre = pre[:, None, :].expand(-1, n * s, -1)
            own_w = own
            if window is not None:    # query index p+o, prefix key index p-k+r: (o + k - r) < window
                pre = pre & ((o[:, None] + k - r[None, :]) < window)[None]
                own_w = own & ((o[:, None] - o[None, :]) < window)
            m = torch.cat([pre, own_w[None].expand(len(g.rows), -1, -1)], dim=-1)[:, None]
            if self._mask_kind == "eager":
                m = torch.zeros(m.shape, dtype=dtype, device=dev).masked_fill(~m, torch.finfo(dtype).min)
            return m

        if g.cache is None:
            return build(0, None)
        types = getattr(self.model.config.get_text_config(), "layer_types", None)
        specs = {}
        for i, lay in enumerate(g.cache.layers):
            k = lay.keys.shape[-2] if getattr(lay, "keys", None) is not None and lay.keys.numel() else 0
            window = getattr(lay, "sliding_window", None) if getattr(lay, "is_sliding", False) else None
            specs.setdefault(types[i] if types else "all", set()).add((k, window))
        if any(len(v) != 1 for v in specs.values()):
            raise SiteError("cache layers of one attention type hold different prefix lengths; "
                            "build the PatchEngine with packed=False")
        kinds = {t: next(iter(v)) for t, v in specs.items()}
        if len(set(kinds.values())) == 1:   # one layout for every layer: a plain 4D mask
            return build(*next(iter(kinds.values())))
        return {t: build(*spec) for t, spec in kinds.items()}  # per layer type (Gemma-style hybrids)

    def _forward_packed(self, g: _Group, n: int, starts: list | None) -> torch.Tensor:
        """One pass over Bg rows whose sequence holds ``n`` copies of the suffix; ``[Bg, n, V]``.
        With ``starts`` (sorted, one per variant) each variant enters at its own start layer."""
        b = self.batch
        s = g.e - g.p
        start = starts[0] if starts else 0
        kw = dict(input_ids=b.input_ids[g.rows, g.p:g.e].repeat(1, n),
                  attention_mask=self._packed_mask(g, n),
                  position_ids=b.position_ids[g.rows, g.p:g.e].repeat(1, n))
        keep = torch.arange(n, device=self.device) * s + (s - 1)
        if self._keep:
            kw["logits_to_keep"] = keep
        if g.cache is not None:
            kw.update(past_key_values=_copy_cache(g.cache, 1, start), use_cache=True)
        else:
            kw.update(use_cache=False)
        grow = contextmanager(lambda: (yield))()
        if starts:
            L = self.sm.n_layers
            active = [s * sum(1 for st in starts if st <= i) for i in range(L)]
            grow = _growing(self.sm.blocks, start, active, n * s, g.resid_pre, s)
        with _skipping(self._blocks if start > 0 else None, start, self._tuple_len), grow, \
                _attn_backends(self.device):
            logits = self.model(**kw).logits
        if not self._keep or logits.shape[1] != n:
            logits = logits[:, keep]
        return logits.float()

    @torch.no_grad()
    def run_naive(self, variants, positions: str = "decision", reduce=None) -> torch.Tensor:
        """Reference: one full forward of the whole batch per variant, ``[n_variants, B, V]`` float32.
        positions="decision" patches at ``batch.decision``; "all" patches every position.
        reduce: as in :meth:`run`, applied to each variant's ``[1, B, V]`` logits."""
        if positions not in ("decision", "all"):
            raise ConfigError(f"positions must be 'decision' or 'all', got {positions!r}")
        prepared = _prepare(self.sm, variants, self.B, self.device, positions=positions)
        b = self.batch
        ar = torch.arange(self.B, device=self.device)
        dec = b.decision.long()
        outs = []
        for var in prepared:
            edits: dict[str, list] = {}
            for name, layer, p, value, basis in var:
                edits.setdefault(f"{name}.{layer}", []).append((p, value, basis))

            def make(entries):
                def f(t):
                    out = t.clone()
                    flat = out.view(*out.shape[:2], -1)
                    for p, value, basis in entries:
                        if positions == "all":
                            v = value[:, None] if value is not None and value.dim() == 2 else value
                            flat[:] = _apply(flat, p, v, basis)
                        else:
                            flat[ar, dec] = _apply(flat[ar, dec], p, value, basis)
                    return out
                return f

            with hooked(self.model, edit={k: make(v) for k, v in edits.items()}), _attn_backends(self.device):
                if self.measure == "last":
                    lg = self.model(**b.model_inputs(), **self._logits_kw).logits[:, -1]
                else:
                    lg = self.model(**b.model_inputs()).logits[ar, dec]
            lg = lg.float()
            outs.append(lg if reduce is None else reduce(lg[None], ar)[0])
        if not outs:
            e = torch.empty(0, self.B, self._clean.shape[-1])
            return e if reduce is None else e[..., 0]
        return torch.stack(outs)
