"""Default batch size and patched-pass rows: chosen from the free memory of the models' device and
the models' shapes.

On CUDA a forward pass of a few dozen prompts leaves most of the GPU idle (measured on one H200 with
an 8B-shaped model: capture in batches of 32 ran at 0.64x the throughput of batches of 150), so the
default fills a share of the free memory instead; ``--batch-size`` still overrides it. On CPU the
batch size hardly changes throughput and 32 is kept.
"""
from __future__ import annotations

import torch

CPU_BATCH = 32
MAX_BATCH = 256           # larger batches gained nothing in the H200 measurement (benchmarks/RESULTS.md)
MEMORY_SHARE = 0.25       # of the free device memory, for one batch's activations
CPU_ROWS = 2048           # rows of one patched pass off CUDA
MIN_ROWS, MAX_ROWS = 256, 16384


def _cfg(model, *names, default=None):
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def _dims(model) -> tuple[int, int, int, int, int, int]:
    """(bytes per element, d_model, ffn width, layers, key/value width, vocabulary) of ``model``."""
    p = next(model.parameters())
    d = int(_cfg(model, "hidden_size", "d_model", "n_embd", default=p.shape[-1]))
    ffn = int(_cfg(model, "intermediate_size", "ffn_dim", "n_inner", default=4 * d) or 4 * d)
    L = int(_cfg(model, "num_hidden_layers", "n_layer", "num_layers", default=1))
    heads = int(_cfg(model, "num_attention_heads", "n_head", default=1))
    kv = int(_cfg(model, "num_key_value_heads", default=heads)) * int(_cfg(model, "head_dim", default=d // heads))
    return p.element_size(), d, ffn, L, kv, int(_cfg(model, "vocab_size", default=0))


def bytes_per_prompt(model, n_tokens: int) -> int:
    """Device bytes one prompt of ``n_tokens`` tokens needs in the project's forward passes: one
    block's activations (``[T, 6 d + 3 ffn]``), the KV cache the patch engine keeps for every layer
    (``[L, T, 2 kv]``), both in the model's dtype, and float32 logits at one position with their
    log-softmax temporaries (``[3, V]``)."""
    elt, d, ffn, L, kv, V = _dims(model)
    return n_tokens * (6 * d + 3 * ffn) * elt + L * n_tokens * 2 * kv * elt + 3 * V * 4


def bytes_per_pass_row(model, suffix: int, prefix: int) -> int:
    """Device bytes one row of a patched pass needs (``mechdiff.patching``): one block's activations
    of its ``suffix`` tokens (``[s, 6 d + 3 ffn]``), one layer's keys/values of its prompt's prefix
    and suffix (gathered per layer, ``[prefix + s, 2 kv]``), its logits at one position in the model's
    dtype and float32 with the KL's temporaries (``[V]`` + ``[3, V]`` float32)."""
    elt, d, ffn, L, kv, V = _dims(model)
    return suffix * (6 * d + 3 * ffn) * elt + (prefix + suffix) * 2 * kv * elt + V * elt + 3 * V * 4


def default_batch_size(models, n_tokens: int, free_bytes: int | None = None) -> int:
    """Prompts per forward pass for ``models`` (on one device) and prompts of up to ``n_tokens``
    tokens: ``MEMORY_SHARE`` of the free memory (``free_bytes``, default: the CUDA device's) over the
    largest model's :func:`bytes_per_prompt`, between 8 and ``MAX_BATCH``; ``CPU_BATCH`` off CUDA."""
    if free_bytes is None:
        dev = next(models[0].parameters()).device
        if dev.type != "cuda":
            return CPU_BATCH
        free_bytes, _ = torch.cuda.mem_get_info(dev)
    free = free_bytes
    need = max(bytes_per_prompt(m, n_tokens) for m in models)
    return int(max(8, min(MAX_BATCH, (MEMORY_SHARE * free) // need)))


def default_max_rows(model, suffix: int, prefix: int, free_bytes: int | None = None) -> int:
    """Rows of one patched pass of the patch engine for ``model``, suffixes of up to ``suffix`` tokens
    after prefixes of up to ``prefix``: ``MEMORY_SHARE`` of the free memory over
    :func:`bytes_per_pass_row`, between ``MIN_ROWS`` and ``MAX_ROWS``; ``CPU_ROWS`` off CUDA. Fewer,
    larger passes run fewer reference rows (one per prompt and pass) and fewer launches."""
    if free_bytes is None:
        dev = next(model.parameters()).device
        if dev.type != "cuda":
            return CPU_ROWS
        free_bytes, _ = torch.cuda.mem_get_info(dev)
    need = bytes_per_pass_row(model, suffix, prefix)
    return int(max(MIN_ROWS, min(MAX_ROWS, (MEMORY_SHARE * free_bytes) // need)))
