"""Align two tokenizations of the same text by character offsets.

Two tokenizers cut one string at different places. An *aligned span* is a shortest piece of the
text whose two ends are boundaries in both tokenizations: each span is covered by a whole number
of tokens on each side, so a quantity summed over tokens (a log-likelihood) is comparable span by
span.

A tokenization is ``ids`` and ``offsets`` (``[(start, end)]`` character offsets into the text, as
fast tokenizers return them). What this module copes with:

- **special and zero-width tokens** (a BOS only one tokenizer adds, chat-template markers): tokens
  flagged ``special`` take no part; a non-special token of zero width joins its neighbours' span.
- **a character split over byte-level tokens** (one multi-byte character -> two tokens with the same
  offsets, or a token whose offsets run into the next one's): a cut between two tokens exists only
  where everything before ends at or before everything after starts, so no span boundary falls
  inside a character.
- **whitespace a tokenizer leaves out of its offsets** (SentencePiece's ``▁``): a cut is the
  interval between the end of the tokens before and the start of the tokens after; two cuts match
  where their intervals meet.
- **different chat templates**: align only a *region* of each text that holds the same plain text
  (the prompt's content, the response), given per side as ``(start, end)``; template tokens outside
  it take no part, tokens straddling its edge are clipped to it.
- **no offsets** (a slow tokenizer) or offsets that do not cover the region's text (a normaliser that
  rewrites it): :class:`~mechdiff.errors.DataError` saying what to use instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from mechdiff.errors import DataError

__all__ = ["Tokenization", "Alignment", "tokenize_text", "align", "align_regions"]


@dataclass
class Tokenization:
    """One tokenization of a text: ``ids[i]`` covers ``text[offsets[i][0]:offsets[i][1]]``;
    ``special[i]`` marks tokens that stand for no text (BOS, template markers)."""

    text: str
    ids: list[int]
    offsets: list[tuple[int, int]]
    special: list[bool]

    def __post_init__(self) -> None:
        if not (len(self.ids) == len(self.offsets) == len(self.special)):
            raise DataError("a tokenization needs as many offsets and special flags as ids")


@dataclass
class Alignment:
    """Aligned spans of a region: span ``k`` is ``text[spans[k][0]:spans[k][1]]`` (offsets into side
    A's text) and is covered by A's tokens ``a_tokens[k][0]:a_tokens[k][1]`` and B's tokens
    ``b_tokens[k][0]:b_tokens[k][1]`` (indices into each side's whole token list).
    ``coverage``: share of the region's characters inside aligned spans (1.0: every boundary met)."""

    spans: list[tuple[int, int]]
    a_tokens: list[tuple[int, int]]
    b_tokens: list[tuple[int, int]]
    coverage: float
    n_chars: int

    def __len__(self) -> int:
        return len(self.spans)


def tokenize_text(tok: Any, text: str, add_special_tokens: bool = True) -> Tokenization:
    """``text`` through a fast HF tokenizer with offsets; DataError for a tokenizer without offset
    mappings (a slow tokenizer)."""
    if not getattr(tok, "is_fast", False):
        raise DataError(f"{type(tok).__name__} gives no character offsets (a slow tokenizer): load the "
                        "fast tokenizer (use_fast=True) to align texts across tokenizers")
    try:
        enc = tok(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True,
                  return_attention_mask=False)
    except NotImplementedError as e:
        raise DataError(f"{type(tok).__name__} cannot return offset mappings ({e}); use a fast tokenizer") from None
    ids = [int(i) for i in enc["input_ids"]]
    offsets = [(int(s), int(e)) for s, e in enc["offset_mapping"]]
    special_ids = set(getattr(tok, "all_special_ids", []) or [])
    return Tokenization(text, ids, offsets, [i in special_ids for i in ids])


def _pieces(t: Tokenization, r0: int, r1: int) -> tuple[list[int], list[tuple[int, int]]]:
    """Token indices taking part in region ``[r0, r1)`` and their offsets clipped to it (local)."""
    idx, offs = [], []
    for i, ((s, e), sp) in enumerate(zip(t.offsets, t.special)):
        if sp or s < 0 or e < s or e > len(t.text):
            continue
        inside = (s < r1 and e > r0) or (s == e and r0 <= s < r1)
        if inside:
            idx.append(i)
            offs.append((max(s, r0) - r0, min(e, r1) - r0))
    return idx, offs


def _check_covers(t: Tokenization, offs: list[tuple[int, int]], r0: int, r1: int, side: str) -> None:
    covered = bytearray(r1 - r0)
    for s, e in offs:
        covered[s:e] = b"\x01" * (e - s)
    region = t.text[r0:r1]
    missing = [k for k, ch in enumerate(region) if not covered[k] and not ch.isspace()]
    if missing:
        k = missing[0]
        raise DataError(f"tokenizer {side}'s offsets leave {len(missing)} non-space character(s) of the text "
                        f"uncovered (first {region[k]!r} at {r0 + k}): its normaliser rewrites the text, so "
                        "tokens cannot be aligned by offsets; compare these models with one tokenizer")


def _cuts(offs: list[tuple[int, int]], n_chars: int) -> list[tuple[int, int, int]]:
    """``(lo, hi, k)`` per cut before local token ``k`` (``k = n``: the region's end): ``lo`` the latest
    end of the tokens before, ``hi`` the earliest start of the tokens after; the cut exists where
    ``lo <= hi`` (no token runs over it)."""
    n = len(offs)
    suffix_min = [n_chars] * (n + 1)
    for k in range(n - 1, -1, -1):
        suffix_min[k] = min(suffix_min[k + 1], offs[k][0])
    out, prefix_max = [], 0
    for k in range(n + 1):
        if prefix_max <= suffix_min[k]:
            out.append((prefix_max, suffix_min[k], k))
        if k < n:
            prefix_max = max(prefix_max, offs[k][1])
    return out


def align(a: Tokenization, b: Tokenization, region_a: tuple[int, int] | None = None,
          region_b: tuple[int, int] | None = None) -> Alignment:
    """Aligned spans of ``a.text[region_a]`` and ``b.text[region_b]`` (the same string; default the
    whole texts, which must then be equal)."""
    ra = region_a or (0, len(a.text))
    rb = region_b or (0, len(b.text))
    if a.text[ra[0]:ra[1]] != b.text[rb[0]:rb[1]]:
        raise DataError("the two regions to align hold different text: align only the text both models "
                        "read (the prompt's content, the response), not the chat templates around it")
    n_chars = ra[1] - ra[0]
    ia, oa = _pieces(a, *ra)
    ib, ob = _pieces(b, *rb)
    _check_covers(a, oa, *ra, side="A")
    _check_covers(b, ob, *rb, side="B")
    ca, cb = _cuts(oa, n_chars), _cuts(ob, n_chars)
    # a token straddling a region edge (clipped) means that edge is no boundary of that side
    ca = _drop_straddled(ca, a, ia, ra, n_chars)
    cb = _drop_straddled(cb, b, ib, rb, n_chars)
    matched: list[tuple[int, int, int]] = []        # (position, token pos in A, token pos in B)
    i = j = 0
    while i < len(ca) and j < len(cb):
        (alo, ahi, ak), (blo, bhi, bk) = ca[i], cb[j]
        if ahi < blo:
            i += 1
        elif bhi < alo:
            j += 1
        else:
            pos = max(alo, blo)
            if not matched or pos > matched[-1][0]:
                matched.append((pos, ak, bk))
            i += 1
            j += 1
    spans, a_tok, b_tok = [], [], []
    for (p0, a0, b0), (p1, a1, b1) in zip(matched, matched[1:]):
        if a1 == a0 or b1 == b0:     # only zero-width tokens apart: no span (cannot happen for
            continue                 # text both sides cover, kept as a guard)
        spans.append((ra[0] + p0, ra[0] + p1))
        a_tok.append((ia[a0], ia[a1 - 1] + 1))
        b_tok.append((ib[b0], ib[b1 - 1] + 1))
    covered = sum(e - s for s, e in spans)
    return Alignment(spans, a_tok, b_tok, covered / n_chars if n_chars else 1.0, n_chars)


def _drop_straddled(cuts, t: Tokenization, idx: list[int], region: tuple[int, int], n_chars: int):
    r0, r1 = region
    starts_inside = not idx or t.offsets[idx[0]][0] >= r0
    ends_inside = not idx or t.offsets[idx[-1]][1] <= r1
    out = []
    for lo, hi, k in cuts:
        if k == 0 and not starts_inside:
            continue
        if k == len(idx) and not ends_inside:
            continue
        out.append((lo, hi, k))
    return out


def align_regions(a: Tokenization, b: Tokenization, regions_a: Sequence[tuple[int, int]],
                  regions_b: Sequence[tuple[int, int]]) -> Alignment:
    """:func:`align` over several regions (e.g. the prompt's content, then the response), concatenated;
    coverage over all their characters."""
    if len(regions_a) != len(regions_b):
        raise DataError("give as many regions for each side")
    parts = [align(a, b, x, y) for x, y in zip(regions_a, regions_b)]
    n = sum(p.n_chars for p in parts)
    cov = sum(p.coverage * p.n_chars for p in parts) / n if n else 1.0
    return Alignment([s for p in parts for s in p.spans], [s for p in parts for s in p.a_tokens],
                     [s for p in parts for s in p.b_tokens], cov, n)
