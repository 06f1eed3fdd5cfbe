"""Cache and layer plumbing for the patching engine: per-pass views of the prefix KV cache that
serve each pass row its prompt's prefix without storing anything (``_pass_cache``), swapping blocks
below a pass's first computed layer for identities (``_Skip``/``_skipping``), the branching layout in
which pass rows join at their own start layer (``_branching``), a contiguous input for the output
layer (``_contiguous_head``), the final block's output projection and MLP on the last position only
(``_last_position_only``), the SDPA backend choice on CUDA (``_attn_backends``) and a model-signature
probe (``_accepts``). Nothing here knows about patches; it only changes what a
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
        out = room.index_select(0, r.to(prefix.device))    # a sharded model: the layer's GPU
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
                h = torch.cat([h, h.index_select(0, join[prev:na].to(h.device))], dim=0)
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


@contextmanager
def _last_position_only(modules):
    """When only the last position's logits are read, the final block's outputs at the other
    positions feed nothing (their keys/values there, which the last position attends to, are made
    before the output projection). Inside the ``with`` block ``modules`` (that block's attention
    output projection and MLP) run on a contiguous copy of the last position, ``[N, 1, w]``; the
    block's residual adds broadcast it, so the block's output is right at the last position and
    meaningless (never read) at the others."""
    def pre(mod, args):
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.dim() == 3 and x.shape[1] > 1:
            return (x[:, -1:].contiguous(),) + tuple(args[1:])
        return None
    handles = [m.register_forward_pre_hook(pre) for m in modules if m is not None]
    try:
        yield
    finally:
        for h in handles:
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


def _grouped_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                  **kwargs):
    """transformers' ``sdpa`` attention for grouped-query models without repeating the keys/values per
    query head: query ``[N, H, s, hd]`` is viewed as ``[N, H_kv, g s, hd]`` (head ``h`` = kv head
    ``h // g``, as ``repeat_kv`` pairs them) and the shared mask ``[N, 1, s, k]`` repeated ``g`` times
    along the query axis. Returns ``([N, s, H, hd], None)``. The suffix passes attend a few query
    tokens to a prefix of many keys, where the ``g``-fold copy of the keys/values cost more than the
    attention itself. Other cases (no mask, per-head masks, soft-capping, position bias) go to
    transformers' own function."""
    g = int(getattr(module, "num_key_value_groups", 1) or 1)
    if (g == 1 or attention_mask is None or attention_mask.dim() != 4 or attention_mask.shape[1] != 1
            or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None
            or kwargs.get("output_attentions")):
        return _HF_SDPA[0](module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                           is_causal=is_causal, **kwargs)
    N, H, s, hd = query.shape
    out = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(N, H // g, g * s, hd), key, value, attn_mask=attention_mask.repeat(1, 1, g, 1),
        dropout_p=dropout, scale=scaling)
    return out.reshape(N, H, s, hd).transpose(1, 2).contiguous(), None


_HF_SDPA: list = []


@contextmanager
def _grouped_attention():
    """Inside the ``with`` block, models running transformers' ``sdpa`` attention use
    :func:`_grouped_sdpa` (an instance-local override of the registry entry, always restored)."""
    try:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:
        yield
        return
    local = getattr(ALL_ATTENTION_FUNCTIONS, "_local_mapping", None)
    if local is None or "sdpa" in local:      # an older registry, or someone else's override: leave it
        yield
        return
    if not _HF_SDPA:
        _HF_SDPA.append(sdpa_attention_forward)
    local["sdpa"] = _grouped_sdpa
    try:
        yield
    finally:
        local.pop("sdpa", None)


def _accepts(fn, name: str, var_keyword: bool = False) -> bool:
    """Whether callable ``fn`` takes a parameter ``name`` (or, with ``var_keyword``, any ``**kw``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or (var_keyword and any(p.kind is p.VAR_KEYWORD for p in params.values()))


def _cache_arg(model) -> str:
    """The keyword ``model.forward`` takes a KV cache by: ``cache`` (transformers >= 5.2x), else the
    older ``past_key_values``."""
    return "cache" if _accepts(model.forward, "cache") else "past_key_values"
