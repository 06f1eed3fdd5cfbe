"""Cache and layer plumbing for the patching engine: shallow per-pass copies of the prefix KV cache
(``_copy_cache``), swapping blocks below a pass's first patched layer for identities
(``_Skip``/``_skipping``), the packed layout's per-variant start layers (``_growing``/``_cut``),
the SDPA backend choice on CUDA (``_attn_backends``) and a model-signature probe (``_accepts``).
Nothing here knows about patches; it only changes what a forward pass recomputes."""
from __future__ import annotations

import copy
import inspect
from contextlib import contextmanager

import torch
from torch import nn


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
