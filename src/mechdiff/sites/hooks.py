"""Context managers that read and write sites during a forward pass.

Every hook is installed by :func:`hooked` and removed when its ``with`` block ends, also when the
block raises. ``record`` and ``intervene`` are the two common shapes of it::

    with record(model, ["resid_post.3", ("attn_out", 5)], select=last_pos) as rec:
        model(**batch)
    rec["resid_post.3"]                      # whatever select returned, e.g. [B, d]

    with intervene(model, {"resid_post.3": replace_at(values, positions)}):
        logits = model(**batch).logits

An edit is a function ``f(t) -> t_new | None`` on the site's tensor (``[B, T, d]``, or
``[B, T, H, head_dim]`` for ``head_z``); ``None`` leaves it unchanged. Reads see the edited value.
With ``stop_after_last=True`` the forward pass stops right after the deepest recorded site
(later layers are not computed) and the ``with`` block ends there.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from mechdiff.errors import SiteError
from mechdiff.sites.names import READ_ONLY, Site, SiteMap, resolve, site_str, sites_at

Edit = Callable[[torch.Tensor], "torch.Tensor | None"]
Select = Callable[[torch.Tensor], torch.Tensor]


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early; swallowed by :func:`hooked`."""


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _with_first(out, new):
    return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new


def _head_out(sm: SiteMap, layer: int, z: torch.Tensor) -> torch.Tensor:
    """Per-head contributions ``[..., H, d]`` from o_proj input ``z`` ``[..., H*hd]``."""
    w = sm.oproj_weight(layer)  # [d, H*hd]
    zh = z.reshape(*z.shape[:-1], sm.n_heads, sm.head_dim)
    wh = w.reshape(w.shape[0], sm.n_heads, sm.head_dim).to(device=z.device, dtype=z.dtype)
    return torch.einsum("...hk,dhk->...hd", zh, wh)


def _install(sm: SiteMap, name: str, layer: int, fn: Callable[[torch.Tensor], "torch.Tensor | None"]):
    """Register one hook that maps the site's tensor through ``fn``; returns the handle."""
    if name in ("resid_pre", "head_z", "head_out"):
        module = sm.blocks[layer] if name == "resid_pre" else sm.oproj[layer]

        def pre_hook(mod, args, kwargs):
            if args:
                t = args[0]
            elif "hidden_states" in kwargs:
                t = kwargs["hidden_states"]
            else:
                t = kwargs.get("input")
            if name == "head_out":
                fn(_head_out(sm, layer, t))
                return None
            if name == "head_z":
                new = fn(t.reshape(*t.shape[:-1], sm.n_heads, sm.head_dim))
                new = None if new is None else new.reshape(t.shape)
            else:
                new = fn(t)
            if new is None:
                return None
            if args:
                return (new,) + tuple(args[1:]), kwargs
            key = "hidden_states" if "hidden_states" in kwargs else "input"
            return args, {**kwargs, key: new}

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    module = {"resid_post": sm.blocks, "attn_out": sm.attn, "mlp_out": sm.mlp}[name][layer]

    def hook(mod, args, out):
        new = fn(_first(out))
        return None if new is None else _with_first(out, new)

    return module.register_forward_hook(hook)


def _own(x: torch.Tensor) -> torch.Tensor:
    """``x`` detached; copied when it is a view into a larger storage (e.g. ``t[:, -1]``), so that
    storing it does not keep the whole activation alive. Exact: the values are copied unchanged."""
    x = x.detach()
    try:
        if x.untyped_storage().nbytes() > x.numel() * x.element_size():
            return x.clone(memory_format=torch.contiguous_format)
    except (RuntimeError, NotImplementedError):  # tensors without a storage (e.g. some subclasses)
        pass
    return x


class Recording(dict):
    """Maps ``"name.layer"`` to what was recorded there (accepts :class:`Site` and tuple keys too)."""

    def __getitem__(self, key):
        return super().__getitem__(site_str(key))

    def __contains__(self, key):
        return super().__contains__(site_str(key))


@contextmanager
def hooked(model: nn.Module, read: Iterable = (), edit: Mapping | None = None,
           select: Select | None = None, stop_after_last: bool = False,
           on_record: Callable[[str, torch.Tensor], None] | None = None) -> Iterator[Recording]:
    """Install edit hooks, then read hooks; yield the recording; always remove every hook.

    read: site keys to record; select(t) reduces each recorded tensor (e.g. keep some positions)
    before it is stored (detached, same device; a selection that is a view of a larger tensor, such
    as ``t[:, -1]``, is stored as a compact copy, so the full activation is freed). Without
    ``select`` the activation itself is stored. edit: {site: f(t) -> t_new | None}.
    on_record(key, value): called right after each site is stored (during the forward pass), e.g.
    to start moving it elsewhere while later layers run.
    """
    sm = resolve(model)
    read = [Site.parse(k) for k in read]
    edits = [(Site.parse(k), f) for k, f in (edit or {}).items()]
    for (name, layer) in read:
        sm.check(name, layer)
    for (name, layer), _ in edits:
        sm.check(name, layer)
        if name in READ_ONLY:
            raise SiteError(f"site {name!r} is read-only; to patch single heads edit 'head_z'")
    rec = Recording()
    # The deepest recorded site, in forward order (resid_pre < head_z/head_out < attn_out < mlp_out
    # < resid_post within a layer).
    order = {"resid_pre": 0, "head_z": 1, "head_out": 1, "attn_out": 2, "mlp_out": 3, "resid_post": 4}
    # Ties (head_z and head_out: pre-hooks on the same module, run in the order installed): the last
    # one installed stops the pass, so the others at that point are recorded first.
    last = max(reversed(read), key=lambda s: (s.layer, order[s.name])) if (stop_after_last and read) else None
    handles = []
    try:
        for (name, layer), f in edits:
            handles.append(_install(sm, name, layer, f))
        for site in read:
            key = str(site)

            def store(t, key=key, stop=(site == last)):
                v = _own(select(t)) if select is not None else t.detach()
                dict.__setitem__(rec, key, v)
                if on_record is not None:
                    on_record(key, v)
                if stop:
                    raise StopForward
                return None

            handles.append(_install(sm, site.name, site.layer, store))
        try:
            yield rec
        except StopForward:
            pass
    finally:
        for h in handles:
            h.remove()


def record(model: nn.Module, sites: Iterable, select: Select | None = None,
           stop_after_last: bool = False, on_record: Callable[[str, torch.Tensor], None] | None = None):
    """Record ``sites`` during the forward passes run inside the ``with`` block."""
    return hooked(model, read=sites, select=select, stop_after_last=stop_after_last, on_record=on_record)


def intervene(model: nn.Module, edits: Mapping):
    """Apply ``edits`` ({site: f(t) -> t_new | None}) inside the ``with`` block."""
    return hooked(model, edit=edits)


# ---- edit factories ------------------------------------------------------------------------

def _rows_positions(t: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    positions = positions.to(t.device)
    if positions.dim() == 1:
        positions = positions[:, None]
    rows = torch.arange(t.shape[0], device=t.device)[:, None].expand_as(positions)
    return rows, positions


def replace_at(values: torch.Tensor, positions: torch.Tensor | None = None) -> Edit:
    """Write ``values`` at ``positions``.

    values: ``[B, d]`` (one position per row) or ``[B, P, d]``; positions: ``[B]`` or ``[B, P]``
    indices into T. With ``positions=None``, values ``[B, T, d]`` replace every position.
    """
    def f(t):
        if positions is None:
            return values.to(device=t.device, dtype=t.dtype).expand_as(t).clone()
        rows, pos = _rows_positions(t, positions)
        out = t.clone()
        out[rows, pos] = values.to(device=t.device, dtype=t.dtype).reshape(*pos.shape, *t.shape[2:])
        return out
    return f


def add_at(vector: torch.Tensor, positions: torch.Tensor | None = None, alpha: float = 1.0) -> Edit:
    """Add ``alpha * vector`` (``[d]``, ``[B, d]`` or ``[B, P, d]``) at ``positions`` (None = all)."""
    def f(t):
        v = alpha * vector.to(device=t.device, dtype=t.dtype)
        if positions is None:
            return t + (v[:, None] if v.dim() == 2 else v)
        rows, pos = _rows_positions(t, positions)
        out = t.clone()
        out[rows, pos] = out[rows, pos] + (v.reshape(*pos.shape, -1) if v.dim() > 1 else v)
        return out
    return f


def project_out_at(basis: torch.Tensor, positions: torch.Tensor | None = None) -> Edit:
    """Remove the span of ``basis`` (``[d, k]``, orthonormal columns) at ``positions`` (None = all)."""
    def f(t):
        u = basis.to(device=t.device, dtype=t.dtype)
        if positions is None:
            return t - (t @ u) @ u.T
        rows, pos = _rows_positions(t, positions)
        out = t.clone()
        h = out[rows, pos]
        out[rows, pos] = h - (h @ u) @ u.T
        return out
    return f


def validate_sites(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   atol: float = 1e-4) -> None:
    """Check site resolution against HF: captured resid_pre/resid_post must equal
    ``output_hidden_states`` (hidden_states[l] = resid_pre.l, hidden_states[l+1] = resid_post.l for
    all but the last layer, whose HF entry is after the final norm). Raises SiteError on mismatch."""
    sm = resolve(model)
    sites = sites_at("resid_pre", range(sm.n_layers)) + sites_at("resid_post", range(sm.n_layers))
    with torch.no_grad(), record(model, sites) as rec:
        hs = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
    for l in range(sm.n_layers):
        pairs = [("resid_pre", hs[l])] + ([("resid_post", hs[l + 1])] if l < sm.n_layers - 1 else [])
        for name, ref in pairs:
            got = rec[Site(name, l)]
            err = (got.float().cpu() - ref.float().cpu()).abs().max().item()   # layers may live on other devices
            scale = ref.float().abs().max().item() + 1e-6
            if not err <= atol * max(1.0, scale):
                raise SiteError(f"site {Site(name, l)} of {sm.family} does not match output_hidden_states "
                                f"(max abs error {err:.3g}); site resolution is wrong for this model")
