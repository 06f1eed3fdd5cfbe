"""Style markers (hedges, politeness, exclamations, emoji, lists) per 100 generated tokens."""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

STYLE_MARKERS: dict[str, list[str]] = {
    "hedges": [
        r"\bperhaps\b", r"\bmaybe\b", r"\bmight\b", r"\bpossibly\b", r"\bit seems\b", r"\bprobably\b",
        r"\bвозможно\b", r"\bможет быть\b", r"\bнаверное\b", r"\bвероятно\b",
        r"\bмүмкін\b", r"\bбәлкім\b", r"\bшамасы\b", r"\bсияқты\b",
    ],
    "politeness": [
        r"\bplease\b", r"\bthank you\b", r"\bthanks\b", r"\bkindly\b", r"\bhappy to help\b",
        r"\bпожалуйста\b", r"\bспасибо\b", r"\bблагодарю\b", r"\bрад помочь\b",
        r"\bрахмет\b", r"\bөтінемін\b", r"\bқұрметті\b", r"\bқуаныштымын\b",
    ],
    "exclamations": [r"!"],
    "emoji": [
        "[\U0001F300-\U0001FAFF\U00002600-\U000027BF\U0001F1E6-\U0001F1FF]",
    ],
    "lists": [r"(?m)^[ \t]*(?:[-*\u2022]|\d+[.)])[ \t]+"],
}


def style_markers(
    texts: Sequence[str],
    markers: Mapping[str, Sequence[str]] | None = None,
    tok: Any = None,
    n_tokens: Sequence[int] | None = None,
) -> dict:
    """Style marker rates per 100 generated tokens over a list of generations.

    Token counts come from ``n_tokens`` (e.g. ``generate(..., return_n_tokens=True)``), else from
    re-tokenising with ``tok``, else whitespace words. Returns ``{per_100: {marker: rate},
    counts: {marker: n}, n_tokens: total}``.
    """
    marks = STYLE_MARKERS if markers is None else markers
    texts = list(texts)
    if n_tokens is not None:
        total = int(sum(n_tokens))
    elif tok is not None:
        total = sum(len(x) for x in tok(texts, add_special_tokens=False)["input_ids"]) if texts else 0
    else:
        total = sum(len(t.split()) for t in texts)
    counts = {
        name: sum(len(re.findall(p, t, flags=re.IGNORECASE)) for t in texts for p in pats)
        for name, pats in marks.items()
    }
    per_100 = {k: (100.0 * v / total if total else math.nan) for k, v in counts.items()}
    return {"per_100": per_100, "counts": counts, "n_tokens": total}
