"""Cache and layer plumbing for the patching engine: per-pass views of the prefix KV cache that
serve each pass row its prompt's prefix without storing anything (``_pass_cache``), swapping blocks
below a pass's first computed layer for identities (``_Skip``/``_skipping``), the branching layout in
which pass rows join at their own start layer (``_branching``), a contiguous input for the output
layer (``_contiguous_head``), the SDPA backend choice on CUDA (``_attn_backends``) and a
model-signature probe (``_accepts``). Nothing here knows about patches; it only changes what a
forward pass recomputes."""
from __future__ import annotations

import copy
import inspect
from contextlib import contextmanager

import torch
from torch import nn


def _pass_cache(cache, rows: list):
    """A shallow copy of an HF cache whose layer ``i`` answers ``update(k, v)`` with the prefix
    keys/values of prompt rows ``rows[i]`` (``[n_i]`` indices into the cache's batch; None: layer not
    run) concatenated before ``k``/``v`` (``[n_i, heads, s, hd]``), and stores nothing: the original
    cache stays intact and each layer's gathered copy is freed once its attention has run."""
    new = copy.copy(cache)
    new.layers = []
    for i, layer in enumerate(cache.layers):
        lay = copy.copy(layer)
        r = rows[i] if i < len(rows) else None
        if r is not None and getattr(layer, "keys", None) is not None and layer.keys.numel() > 0:
            lay.update = _gathering_update(layer.keys, layer.values, r)
        new.layers.append(lay)
    return new


def _gathering_update(keys: torch.Tensor, values: torch.Tensor, r: torch.Tensor):
    def gather(prefix, new):
        # = torch.cat([prefix.index_select(0, r), new], -2), with one copy of the n_i rows, not two
        k = prefix.shape[-2]
        room = prefix.new_empty((*prefix.shape[:-2], k + new.shape[-2], prefix.shape[-1]))
        room[..., :k, :] = prefix
        out = room.index_select(0, r)
        out[..., k:, :] = new
        return out

    def update(key_states, value_states, *args, **kwargs):
        return gather(keys, key_states), gather(values, value_states)
    return update


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


def _rows(x, N: int, n: int):
    """Cut a block argument laid out for ``N`` batch rows to its first ``n`` rows (masks
    ``[N, 1, q, k]``, position ids ``[N, q]``, cos/sin ``[N, q, hd]``; others pass unchanged)."""
    if n == N:
        return x
    if isinstance(x, (tuple, list)):
        return type(x)(_rows(y, N, n) for y in x)
    if isinstance(x, dict):
        return {k: _rows(v, N, n) for k, v in x.items()}
    if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[0] == N:
        return x[:n]
    return x


@contextmanager
def _branching(blocks, start: int, counts: list, join: torch.Tensor, first: torch.Tensor, N: int):
    """Pass rows join at their own start layer. Block ``i >= start`` runs the first ``counts[i]`` of
    the pass's ``N`` rows: at ``start`` its input is ``first`` (``[counts[start], s, d]``, the clean
    residual); at ``i > start`` rows ``counts[i-1]:counts[i]`` join as copies of rows
    ``join[counts[i-1]:counts[i]]`` of its input (their reference rows, so a row that joins at ``i``
    enters exactly the state its reference has there). Hooks are prepended, so patch hooks on the
    block see the grown input."""
    handles = []

    def make(i):
        na, prev = counts[i], counts[i - 1] if i > start else 0

        def pre(mod, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            if i == start:
                h = first.to(h.dtype)
            elif na > prev:
                h = torch.cat([h, h.index_select(0, join[prev:na])], dim=0)
            rest_args = tuple(_rows(a, N, na) for a in args[1:])
            rest_kw = {k: (v if k == "hidden_states" else _rows(v, N, na)) for k, v in kwargs.items()}
            if args:
                return (h,) + rest_args, rest_kw
            return rest_args, {**rest_kw, "hidden_states": h}
        return pre

    try:
        for i in range(start, len(blocks)):
            handles.append(blocks[i].register_forward_pre_hook(make(i), with_kwargs=True, prepend=True))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _contiguous_head(model):
    """With ``logits_to_keep=1`` HF hands the output layer a strided ``[B, 1, d]`` slice, which runs
    as a slow batched kernel on CUDA (DESIGN.md, GPU facts); give it a contiguous copy instead."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        yield
        return
    h = head.register_forward_pre_hook(
        lambda m, args: (args[0].contiguous(),) + tuple(args[1:]) if args else None)
    try:
        yield
    finally:
        h.remove()


def _attn_backends(device: torch.device):
    """On CUDA, keep SDPA off the cuDNN backend: it builds a new plan for every new shape (seen:
    ~1.5 s on the first sweep of an 8B model, whose passes have a new shape per layer); the
    memory-efficient kernel takes the same masks at the same steady speed."""
    if device.type != "cuda":
        return contextmanager(lambda: (yield))()
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
    except ImportError:  # torch < 2.3
        return contextmanager(lambda: (yield))()


def _accepts(fn, name: str, var_keyword: bool = False) -> bool:
    """Whether callable ``fn`` takes a parameter ``name`` (or, with ``var_keyword``, any ``**kw``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or (var_keyword and any(p.kind is p.VAR_KEYWORD for p in params.values()))
