"""Prompt formatting, left-padded batching helpers and greedy (optionally masked) generation."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterable, Sequence

import torch

from mechdiff.errors import DataError
from mechdiff.fairness import allowed_mask


# ----------------------------------------------------------------------------- formatting

def default_format_fn(tok: Any) -> Callable[[Any], str]:
    """Chat template with a generation prompt if ``tok`` has one, else the raw text."""
    has_template = bool(getattr(tok, "chat_template", None))

    def fmt(prompt: Any) -> str:
        if isinstance(prompt, dict) and "text" in prompt:
            prompt = prompt["text"]
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) for m in prompt):
            messages = list(prompt)
        else:
            raise DataError(f"a prompt must be a string, a {{'text': ...}} dict or chat messages, got {type(prompt).__name__}")
        if has_template:
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if isinstance(prompt, str):
            return prompt
        return "\n".join(str(m.get("content", "")) for m in messages)

    fmt.templated = has_template  # type: ignore[attr-defined]
    return fmt


def _formatter(tok: Any, format_fn: Callable[[Any], str] | None) -> tuple[Callable[[Any], str], bool]:
    """Return (format_fn, add_special_tokens). Chat-templated text already holds BOS etc.; a custom
    ``format_fn`` is assumed to template when the tokenizer has a chat template (override by
    giving the function an ``add_special_tokens`` attribute)."""
    if format_fn is None:
        fmt = default_format_fn(tok)
        return fmt, not fmt.templated  # type: ignore[attr-defined]
    default = not bool(getattr(tok, "chat_template", None))
    return format_fn, bool(getattr(format_fn, "add_special_tokens", default))


@contextmanager
def _left_padding(tok: Any):
    old = tok.padding_side
    tok.padding_side = "left"
    try:
        yield
    finally:
        tok.padding_side = old


def _pad_id(tok: Any) -> int:
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tok, name, None)
        if v is not None:
            return int(v)
    raise DataError("the tokenizer has no pad, eos or unk token: set tok.pad_token before batching")


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def _batches(n: int, batch_size: int) -> Iterable[slice]:
    for i in range(0, n, max(1, batch_size)):
        yield slice(i, min(n, i + batch_size))



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
    """Greedy continuation ``[B, max_new_tokens]`` of a left-padded batch (HF ``generate``);
    ``allowed_ids`` restricts every generated token to that set (masked generation)."""
    from transformers import LogitsProcessorList

    kwargs = dict(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad_id)
    if allowed_ids is not None:
        kwargs["logits_processor"] = LogitsProcessorList([_MaskProcessor(allowed_ids)])
    gen = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    return gen[:, input_ids.shape[1]:]


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
    fmt, add_special = _formatter(tok, format_fn)
    texts = [fmt(p) for p in prompts]
    pad = _pad_id(tok)
    eos = getattr(tok, "eos_token_id", None)
    dev = _device(model)
    outs: list[str] = []
    counts: list[int] = []
    with _left_padding(tok):
        for sl in _batches(len(texts), batch_size):
            enc = tok(texts[sl], return_tensors="pt", padding=True, add_special_tokens=add_special)
            enc = {k: v.to(dev) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            new = generate_ids(model, enc["input_ids"], enc["attention_mask"], max_new_tokens, pad, allowed_ids)
            outs.extend(tok.batch_decode(new, skip_special_tokens=True))
            for row in new.tolist():
                n = 0
                for t in row:
                    if (eos is not None and t == eos) or t == pad:
                        break
                    n += 1
                counts.append(n)
    return (outs, counts) if return_n_tokens else outs
