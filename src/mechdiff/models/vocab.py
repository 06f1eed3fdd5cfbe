"""Vocabulary extension as a fine-tune does it: new regular tokens, mean-of-pieces embeddings."""
from __future__ import annotations

import copy
from typing import Any, Sequence

import torch

from mechdiff.errors import ModelLoadError


def extend_vocab(model: Any, tok: Any, words: Sequence[str], new_tok: Any = None
                 ) -> tuple[Any, list[int], dict[str, list[int]]]:
    """Add ``words`` that ``tok`` splits into more than one piece as regular single-word tokens.

    ``new_tok`` receives them (default: a deep copy of ``tok``). The model's embedding grows by
    exactly those words, appended in order; each new row is the float64 mean of the base embedding
    rows of the word's pieces, cast to the weight's dtype (an untied unembedding gets the same row).
    Returns ``(new tokenizer, new ids, {word: piece ids})``; the words added are the keys of the last.
    """
    from transformers import AddedToken

    new_tok = copy.deepcopy(tok) if new_tok is None else new_tok
    n_base = len(tok)
    pieces = {w: list(tok(w, add_special_tokens=False)["input_ids"]) for w in words}
    pieces = {w: p for w, p in pieces.items() if len(p) > 1}
    added = new_tok.add_tokens([AddedToken(w, single_word=True, normalized=False, special=False) for w in pieces])
    if added != len(pieces):
        raise ModelLoadError(f"expected to add {len(pieces)} tokens, added {added}")
    emb = model.get_input_embeddings().weight.detach().to(torch.float64)
    rows = torch.stack([emb[p].mean(0) for p in pieces.values()]) if pieces else emb[:0]
    model.resize_token_embeddings(n_base + len(pieces), mean_resizing=False)
    with torch.no_grad():
        w_in = model.get_input_embeddings().weight
        w_in[n_base:] = rows.to(w_in.device, w_in.dtype)
        if not getattr(model.config, "tie_word_embeddings", False):
            w_out = model.get_output_embeddings().weight
            w_out[n_base:] = rows.to(w_out.device, w_out.dtype)
    new_ids = [new_tok.convert_tokens_to_ids(w) for w in pieces]
    if new_ids != list(range(n_base, n_base + len(pieces))):
        raise ModelLoadError("the new token ids are not the rows appended to the embedding")
    return new_tok, new_ids, pieces
