"""The one patching engine: activation patching, mapped patching, alpha-sweeps and steering.

Everything that writes a value into a model at a site and reads the next-token distribution goes
through :class:`PatchEngine`::

    eng = PatchEngine(model, batch, measure="last", record_sites=["resid_post.3"])
    eng.clean_logits                                  # [B, V] float32
    h = eng.clean_states(["resid_post.3"])            # {"resid_post.3": [B, d]} at the decision token
    logits = eng.run([Patch("resid_post.3", h_src),   # [n_variants, B, V] float32
                      Patch("mlp_out.1", v, mode="add", alpha=2.0),
                      [Patch("attn_out.2", a), Patch("mlp_out.2", m)]])   # several sites at once
    kl = patch_kl(eng, variants)                      # [n_variants, B] KL(clean || patched)

**What a patch does** (at the decision position ``p`` = ``batch.decision``, the last content token;
``h`` is the site's clean-run value there, ``v`` the patch value, ``U`` an orthonormal basis):

- ``replace``:     ``h + alpha * (v - h)``  (alpha=1: ``v`` exactly; mapped patching's alpha-sweep)
- ``add``:         ``h + alpha * v``        (steering)
- ``project_out``: ``h - alpha * (h U) U^T`` (ablation of a subspace)

**Measured position.** ``measure="last"`` reads the logits at the final position ``T-1`` (the next
token of the response, after the chat-template tail); ``measure="decision"`` reads them at ``p``
itself (what the seeds' journal measured).

**Why it is fast (cache reuse).** A patch at position ``p`` changes nothing at positions ``< p``, at
any layer. Rows are grouped by ``p`` (with left padding, rows whose template tail has the same
length share it). For each group the *prefix* (positions ``< p``) runs once with a KV cache; the
clean run is that cache plus the *suffix* (``p`` .. measured position: 1 token for
``measure="decision"``, the template tail for ``"last"``). A patched variant re-runs only the suffix
tokens against the prefix cache, and many variants (layers x alphas x sites ...) are stacked along
the batch dimension of one pass (``max_rows`` bounds rows per pass). Layers below the shallowest
patched layer of a pass are not recomputed either: they are swapped for an identity for the
duration of the pass and the clean suffix residual is written back at the first computed layer
(``skip_layers=True``). The prefix cache is copied per pass (shallow copies of HF's cache layers
whose tensors are replaced, never mutated), so repeated calls give identical results.

``run_naive`` is the reference: one full forward per variant with hooks at ``p``. ``run(...,
positions="all")`` patches every position (values ``[B, T, d]`` or ``[B, d]``/``[d]`` broadcast over
positions); that changes the prefix, so it cannot reuse the cache and goes through ``run_naive``.

Shapes: ``d`` is the site width: ``d_model`` for resid/attn/mlp sites, ``H * head_dim`` for
``head_z`` (values may also be given as ``[B, H, head_dim]``; ``clean_states`` returns
``[B, H, head_dim]`` for ``head_z``).
"""
from __future__ import annotations

import copy
import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

from mechdiff.errors import ConfigError, NumericsError, SiteError
from mechdiff.sites.hooks import hooked
from mechdiff.sites.names import READ_ONLY, parse_site, resolve, site_str

MODES = ("replace", "add", "project_out")
MEASURES = ("last", "decision")


@dataclass(frozen=True, eq=False)
class Patch:
    """One edit at one site, applied at the decision position.

    site: ``"resid_post.12"`` or ``("resid_post", 12)``. value: ``[B, d]`` (per prompt) or ``[d]``
    (same for every prompt); required for replace/add. basis: ``[d, k]`` orthonormal columns for
    project_out. alpha: scale (see the module docstring).
    """

    site: object
    value: torch.Tensor | None = None
    mode: str = "replace"
    basis: torch.Tensor | None = None
    alpha: float = 1.0


Variant = "Patch | Sequence[Patch]"


# ---- math on one site's vectors ------------------------------------------------------------

def _apply(h: torch.Tensor, p: Patch, value: torch.Tensor | None, basis: torch.Tensor | None) -> torch.Tensor:
    """New value of ``h`` ``[..., w]``; value broadcasts against ``h``. Math in float32."""
    a = float(p.alpha)
    if p.mode == "replace":
        if a == 1.0:
            return value.to(h.dtype).expand_as(h)
        hf = h.float()
        return (hf + a * (value.float() - hf)).to(h.dtype)
    if p.mode == "add":
        return (h.float() + a * value.float()).to(h.dtype)
    hf = h.float()
    u = basis.float()
    return (hf - a * ((hf @ u) @ u.T)).to(h.dtype)


def _width(sm, name: str) -> int:
    return sm.n_heads * sm.head_dim if name == "head_z" else sm.d_model


def _prepare(sm, variants, B: int, device, positions: str = "decision"):
    """Normalise variants to ``[[(name, layer, patch, value, basis), ...], ...]`` and validate."""
    if isinstance(variants, Patch):
        variants = [variants]
    out = []
    for var in variants:
        patches = [var] if isinstance(var, Patch) else list(var)
        norm = []
        for p in patches:
            if not isinstance(p, Patch):
                raise ConfigError(f"a variant must be a Patch or a list of Patch, got {type(p).__name__}")
            name, layer = parse_site(p.site)
            sm.check(name, layer)
            if name in READ_ONLY:
                raise SiteError(f"site {name!r} is read-only; to patch single heads edit 'head_z'")
            if p.mode not in MODES:
                raise ConfigError(f"unknown patch mode {p.mode!r}; use one of {', '.join(MODES)}")
            if not torch.isfinite(torch.as_tensor(float(p.alpha))):
                raise NumericsError(f"patch alpha for {name}.{layer} is not finite ({p.alpha})")
            w = _width(sm, name)
            value = basis = None
            if p.mode in ("replace", "add"):
                if p.value is None:
                    raise ConfigError(f"a {p.mode!r} patch at {name}.{layer} needs a value")
                value = p.value.detach()
                if name == "head_z" and value.dim() >= 2 and value.shape[-2:] == (sm.n_heads, sm.head_dim):
                    value = value.reshape(*value.shape[:-2], w)
                if value.shape[-1] != w:
                    raise SiteError(
                        f"patch value width {value.shape[-1]} does not match site {name}.{layer} of this "
                        f"{sm.family} model (width {w}): the two models' widths differ, so states cannot be "
                        "patched across directly; use mapped patching (`mechdiff mapped-patch`) with a map "
                        "between the widths")
                ok_dims = (1, 2, 3) if positions == "all" else (1, 2)
                if value.dim() not in ok_dims or (value.dim() >= 2 and value.shape[0] != B):
                    raise SiteError(f"patch value for {name}.{layer} has shape {tuple(value.shape)}; expected "
                                    f"[{B}, {w}] or [{w}]" + (f" or [{B}, T, {w}]" if positions == "all" else ""))
                if not torch.isfinite(value).all():
                    raise NumericsError(f"patch value for {name}.{layer} contains NaN/Inf; check the source "
                                        "states or the map that produced them")
                value = value.to(device)
            else:
                if p.basis is None or p.basis.dim() != 2 or p.basis.shape[0] != w:
                    raise SiteError(f"project_out at {name}.{layer} needs a basis of shape [{w}, k], got "
                                    f"{None if p.basis is None else tuple(p.basis.shape)}")
                if not torch.isfinite(p.basis).all():
                    raise NumericsError(f"project_out basis for {name}.{layer} contains NaN/Inf")
                basis = p.basis.detach().to(device)
            norm.append((name, layer, p, value, basis))
        out.append(norm)
    return out


# ---- cache and layer plumbing --------------------------------------------------------------

def _copy_cache(cache, n: int, start: int):
    """A shallow copy of an HF cache whose layers >= start hold their keys/values repeated ``n``
    times along the batch (variant-major). HF's dynamic layers replace (never mutate) their tensors
    on ``update``, so the original cache stays intact. Layers < start are not run, keep them as is."""
    new = copy.copy(cache)
    new.layers = []
    for i, layer in enumerate(cache.layers):
        lay = copy.copy(layer)
        if n > 1 and i >= start and getattr(layer, "keys", None) is not None and layer.keys.numel() > 0:
            lay.keys = layer.keys.repeat(n, *([1] * (layer.keys.dim() - 1)))
            lay.values = layer.values.repeat(n, *([1] * (layer.values.dim() - 1)))
        new.layers.append(lay)
    return new


class _Skip(nn.Module):
    """Stands in for a block that need not run: returns its input hidden states unchanged."""

    def __init__(self, block: nn.Module, tuple_len: int):
        super().__init__()
        self.__dict__["_inner"] = block  # not registered: parameters are not duplicated
        self._tuple_len = tuple_len

    def forward(self, *args, **kwargs):
        h = args[0] if args else kwargs.get("hidden_states")
        return (h,) + (None,) * (self._tuple_len - 1) if self._tuple_len else h

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_inner"], name)


def _block_list(model, sm) -> nn.ModuleList | None:
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) == sm.n_layers and m[0] is sm.blocks[0]:
            return m
    return None


@contextmanager
def _skipping(blocks: nn.ModuleList | None, start: int, tuple_len: int):
    """Swap blocks [0, start) for identities inside the ``with`` block; always restore them."""
    saved = []
    try:
        if blocks is not None:
            for i in range(start):
                saved.append((i, blocks[i]))
                blocks[i] = _Skip(blocks[i], tuple_len)
        yield
    finally:
        for i, b in saved:
            blocks[i] = b


def _cut(x, Q: int, qa: int):
    """Slice a block input laid out for ``Q`` suffix tokens down to the first ``qa`` of them."""
    if isinstance(x, tuple):
        return tuple(_cut(y, Q, qa) for y in x)
    if not isinstance(x, torch.Tensor):
        return x
    if x.dim() == 4 and x.shape[-2] == Q:                              # mask [B, 1, Q, prefix + Q]
        return x[..., :qa, :x.shape[-1] - Q + qa]
    if x.dim() in (2, 3) and x.shape[1] == Q:                          # position ids, cos/sin
        return x[:, :qa]
    if x.dim() == 1 and x.shape[0] == Q:                               # cache_position (older HF)
        return x[:qa]
    return x


@contextmanager
def _growing(blocks: list, start: int, active: list, Q: int, clean: dict, s: int):
    """Packed layout with per-variant start layers (variants sorted by start): block i runs only
    the first ``active[i]`` suffix tokens (variants already started) and appends the clean residual
    (``clean[i]``, ``[Bg, s, d]``) of the variants that start at i. Layers before a variant's start
    cost nothing for it; its patch hooks (registered after these) see the clean value at i."""
    handles = []

    def make(i):
        qa_prev = active[i - 1] if i > start else 0
        k_new = (active[i] - qa_prev) // s
        qa = active[i]

        def pre(mod, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            h = h[:, :qa_prev]
            if k_new:
                h = torch.cat([h, clean[i].to(h.dtype).repeat(1, k_new, 1)], dim=1)
            if qa == Q:
                rest_args, rest_kw = args[1:], kwargs
            else:
                rest_args = tuple(_cut(a, Q, qa) for a in args[1:])
                rest_kw = {k: (v if k == "hidden_states" else _cut(v, Q, qa)) for k, v in kwargs.items()}
            if args:
                return (h,) + tuple(rest_args), rest_kw
            return rest_args, {**rest_kw, "hidden_states": h}
        return pre

    try:
        for i in range(start, len(blocks)):
            handles.append(blocks[i].register_forward_pre_hook(make(i), with_kwargs=True, prepend=True))
        yield
    finally:
        for h in handles:
            h.remove()


def _attn_backends(device: torch.device):
    """On CUDA, keep SDPA off the cuDNN backend: it builds a new plan for every new shape (seen:
    ~1.5 s on the first sweep of an 8B model, whose packed passes have a new length per layer);
    the memory-efficient kernel takes the same custom masks at the same steady speed."""
    if device.type != "cuda":
        return contextmanager(lambda: (yield))()
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
    except ImportError:  # torch < 2.3
        return contextmanager(lambda: (yield))()


def _accepts(model, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


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
    """Clean run plus batched patched runs of one model on one batch (see module docstring).

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


# ---- KL helpers ----------------------------------------------------------------------------

def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor, allowed_ids=None) -> torch.Tensor:
    """KL(P || Q) per row (``mechdiff.analyses.kl``), masked to ``allowed_ids`` when given."""
    from mechdiff.analyses.kl import kl_from_logits, kl_masked
    if allowed_ids is None:
        return kl_from_logits(p_logits, q_logits)
    return kl_masked(p_logits, q_logits, allowed_ids)


def kl_reducer(engine: PatchEngine, allowed_ids=None, with_unmasked: bool = False):
    """``reduce`` for :meth:`PatchEngine.run`: KL(clean || patched) per prompt of each pass, masked
    to ``allowed_ids`` when given; ``with_unmasked`` adds a last axis ``[masked, unmasked]``."""
    clean = engine.clean_logits

    def reduce(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        c = clean.to(logits.device)[rows.to(logits.device)][None].expand_as(logits)
        kl = _kl(c, logits, allowed_ids)
        return torch.stack([kl, _kl(c, logits)], -1) if with_unmasked else kl
    return reduce


def patch_kl(engine: PatchEngine, variants, allowed_ids=None, positions: str = "decision") -> torch.Tensor:
    """``[n_variants, B]`` KL(clean || patched) per prompt at the measured position, computed pass by
    pass (the patched logits of all variants are never held at once)."""
    return engine.run(variants, positions=positions, reduce=kl_reducer(engine, allowed_ids))


def layer_sweep(engine_dst: PatchEngine, states_src: dict, sites: Sequence | None = None,
                allowed_ids=None) -> dict[str, torch.Tensor]:
    """Cross-model patching: for each site, replace the destination's state at the decision token
    with the source model's (``states_src[site]``, ``[B, d]``); returns ``{site: KL per prompt [B]}``,
    all sites in batched passes. Widths must match (else SiteError: use mapped patching)."""
    sites = [site_str(s) for s in (states_src.keys() if sites is None else sites)]
    src = {site_str(k): v for k, v in states_src.items()}
    missing = [s for s in sites if s not in src]
    if missing:
        raise SiteError(f"no source states for sites {missing}")
    kl = patch_kl(engine_dst, [Patch(s, src[s]) for s in sites], allowed_ids)
    return {s: kl[i] for i, s in enumerate(sites)}
