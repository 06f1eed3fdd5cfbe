"""Prompt formatting and batching through the one pipeline (``data.prompts``), greedy generation.

Every behaviour metric renders, tokenizes and left-pads its prompts with
:func:`mechdiff.data.prompts.tokenize` / :func:`~mechdiff.data.prompts.collate` (chat template,
specials, padding, position ids): the same input ids as capture and patching see.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from mechdiff.data.prompts import Batch, Encoded, batches, collate, format_prompt, pad_id_of, tokenize
from mechdiff.fairness import allowed_mask


# ----------------------------------------------------------------------------- formatting

def default_format_fn(tok: Any) -> Callable[[Any], str]:
    """The text the model sees for one prompt (a string, a ``{'text': ...}`` dict or chat messages):
    the tokenizer's chat template with a generation prompt if it has one, else the raw text
    (``data.prompts.format_prompt``)."""
    def fmt(prompt: Any) -> str:
        return format_prompt(tok, prompt)[0]

    fmt.templated = bool(getattr(tok, "chat_template", None))  # type: ignore[attr-defined]
    return fmt


def tokenize_prompts(tok: Any, prompts: Sequence[Any], format_fn: Callable[[Any], str] | None = None
                     ) -> list[Encoded]:
    """Render and tokenize ``prompts`` (no padding). Default: ``data.prompts.tokenize`` (chat template
    if the tokenizer has one). A custom ``format_fn(prompt) -> str`` renders the text, which is then
    tokenized as raw text by the same rule (specials added unless the text already starts with BOS)."""
    if format_fn is None:
        return tokenize(tok, list(prompts))
    return tokenize(tok, [{"id": str(i), "text": format_fn(p)} for i, p in enumerate(prompts)], chat=False)


def encode_prompts(tok: Any, prompts: Sequence[Any], format_fn: Callable[[Any], str] | None = None
                   ) -> Batch:
    """:func:`tokenize_prompts`, left-padded into a :class:`~mechdiff.data.prompts.Batch`."""
    return collate(tokenize_prompts(tok, prompts, format_fn), pad_id_of(tok))


def model_device(model: Any) -> torch.device:
    """Where inputs go (a sharded model: where its input embeddings run)."""
    from mechdiff.scale.devices import input_device
    return input_device(model)


# ----------------------------------------------------------------------------- generation

class _MaskProcessor:
    """Logits processor: -inf outside an allowed id set (generation stays in the shared vocab)."""

    def __init__(self, allowed_ids: Any):
        self.allowed_ids = allowed_ids
        self._mask: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._mask is None or self._mask.shape[0] != scores.shape[-1] or self._mask.device != scores.device:
            self._mask = allowed_mask(self.allowed_ids, scores.shape[-1], device=scores.device)
        return scores.masked_fill(~self._mask, float("-inf"))


@torch.no_grad()
def generate_ids(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 pad_id: int, allowed_ids: Any = None) -> torch.Tensor:
    """Greedy continuation ``[B, max_new_tokens]`` of a left-padded batch (HF ``generate``, which
    derives the same position ids from the mask); ``allowed_ids`` restricts every generated token
    to that set (masked generation)."""
    from transformers import LogitsProcessorList

    kwargs = dict(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad_id)
    if allowed_ids is not None:
        kwargs["logits_processor"] = LogitsProcessorList([_MaskProcessor(allowed_ids)])
    gen = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    return gen[:, input_ids.shape[1]:]


def n_generated(rows: torch.Tensor, eos: int | None, pad: int) -> list[int]:
    """Tokens generated per row before the first EOS or padding."""
    stop = rows == pad
    if eos is not None:
        stop |= rows == eos
    first = torch.where(stop, torch.arange(rows.shape[1], device=rows.device), rows.shape[1])
    return first.amin(-1).tolist() if rows.shape[1] else [0] * rows.shape[0]


@torch.no_grad()
def generate(
    model: Any,
    tok: Any,
    prompts: Sequence[Any],
    max_new_tokens: int = 32,
    format_fn: Callable[[Any], str] | None = None,
    batch_size: int = 16,
    allowed_ids: Any = None,
    return_n_tokens: bool = False,
) -> list[str] | tuple[list[str], list[int]]:
    """Greedy batched generation; returns the decoded new text per prompt (special tokens
    skipped) and, with ``return_n_tokens``, the number of generated tokens before EOS/padding.
    ``allowed_ids`` restricts every generated token to that set (masked generation)."""
    encoded = tokenize_prompts(tok, prompts, format_fn)
    pad, eos = pad_id_of(tok), getattr(tok, "eos_token_id", None)
    dev = model_device(model)
    outs: list[str] = []
    counts: list[int] = []
    from mechdiff.progress import progress
    n_chunks = -(-len(encoded) // batch_size)
    for chunk in progress(batches(encoded, batch_size), f"generate ({len(encoded)} prompts, {max_new_tokens} tokens)",
                          total=n_chunks):
        b = collate(chunk, pad).to(dev)
        new = generate_ids(model, b.input_ids, b.attention_mask, max_new_tokens, pad, allowed_ids)
        outs.extend(tok.batch_decode(new, skip_special_tokens=True))
        counts.extend(n_generated(new, eos, pad))
    return (outs, counts) if return_n_tokens else outs
