"""Summed and per-token log-probs of a continuation after each prompt, unmasked and masked."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from mechdiff.data.prompts import Encoded, collate, pad_id_of
from mechdiff.errors import DataError
from mechdiff.fairness import allowed_mask
from mechdiff.analyses.behaviour.generation import model_device, tokenize_prompts


@torch.no_grad()
def continuation_logprobs(
    model: Any,
    tok: Any,
    prompts: Sequence[Any],
    continuations: Sequence[str],
    allowed_ids: Any = None,
    format_fn: Callable[[Any], str] | None = None,
    batch_size: int = 16,
) -> dict:
    """Score ``continuations[i]`` after ``prompts[i]``.

    Returns ``{sum, n_tokens, mean, sum_masked, mean_masked, coverage}``: tensors ``[N]`` of the summed
    token log-probs, token counts, per-token means; masked versions (log-softmax over
    ``allowed_ids``) and the fraction of continuation tokens inside ``allowed_ids`` when given.
    The continuation is tokenised on its own (no special tokens) and appended to the prompt ids.
    """
    if len(prompts) != len(continuations):
        raise DataError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    enc = tokenize_prompts(tok, prompts, format_fn)
    uniq = sorted(set(continuations))
    c_enc = dict(zip(uniq, tok(uniq, add_special_tokens=False)["input_ids"])) if uniq else {}
    c_ids = [list(c_enc[c]) for c in continuations]
    if any(len(c) == 0 for c in c_ids):
        raise DataError("a continuation tokenises to zero tokens: pass a non-empty continuation")
    # prompt + continuation, left-padded by the one pipeline (same ids, padding and positions)
    rows_all = [Encoded(e.id, e.text, e.input_ids + c, e.content + [False] * len(c)) for e, c in zip(enc, c_ids)]
    pad = pad_id_of(tok)
    dev = model_device(model)
    N = len(prompts)
    s_un = torch.zeros(N, dtype=torch.float64)
    s_m = torch.zeros(N, dtype=torch.float64)
    n_tok = torch.zeros(N, dtype=torch.long)
    n_in = torch.zeros(N, dtype=torch.long)
    mask_cache: dict[int, torch.Tensor] = {}
    for start in range(0, N, max(1, batch_size)):
        sl = slice(start, min(N, start + max(1, batch_size)))
        rows = rows_all[sl]
        clen = [len(c) for c in c_ids[sl]]
        b = collate(rows, pad).to(dev)
        ids, T = b.input_ids, b.input_ids.shape[1]
        logits = model(**b.model_inputs(), use_cache=False).logits
        # shifted index t predicts token t+1; continuation tokens sit at T-c..T-1
        tpos = torch.arange(T - 1, device=dev)
        cl = torch.tensor(clen, device=dev)
        sel = tpos[None, :] >= (T - 1 - cl)[:, None]  # [b, T-1]
        lg = logits[:, :-1][sel].float()  # [M, V]
        tgt = ids[:, 1:][sel]  # [M]
        row = torch.arange(len(rows), device=dev)[:, None].expand(-1, T - 1)[sel]
        lp = torch.log_softmax(lg, -1).gather(-1, tgt[:, None]).squeeze(-1)
        s_un[sl] += torch.zeros(len(rows), dtype=torch.float64, device=dev).index_add_(0, row, lp.double()).cpu()
        n_tok[sl] += torch.tensor(clen)
        if allowed_ids is not None:
            V = lg.shape[-1]
            if V not in mask_cache:
                mask_cache[V] = allowed_mask(allowed_ids, V, device=dev)
            m = mask_cache[V]
            lpm = torch.log_softmax(lg.masked_fill(~m, float("-inf")), -1).gather(-1, tgt[:, None]).squeeze(-1)
            s_m[sl] += torch.zeros(len(rows), dtype=torch.float64, device=dev).index_add_(0, row, lpm.double()).cpu()
            inside = m[tgt].long()
            n_in[sl] += torch.zeros(len(rows), dtype=torch.long, device=dev).index_add_(0, row, inside).cpu()
    out = {"sum": s_un, "n_tokens": n_tok, "mean": s_un / n_tok}
    if allowed_ids is not None:
        out.update(sum_masked=s_m, mean_masked=s_m / n_tok, coverage=n_in.double() / n_tok)
    return out
