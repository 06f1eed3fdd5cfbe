"""The `tokens` stage's stored result, as the report, `compare` and `mechdiff serve` read it.

On disk (inside a run directory):

- ``tokens.json``: ``{"schema": SCHEMA, "headline": {...}, "texts": [TextSummary as dict, ...], ...}``
- ``tokens/per_token.safetensors``: one flat float32/int64 tensor per :data:`TOKEN_FIELDS` entry,
  every text's rows concatenated; ``row_offsets`` (int64 ``[n_texts + 1]``) gives text ``i`` the
  rows ``row_offsets[i]:row_offsets[i + 1]``. A row is one token of the base tokenization where the
  tokenizers agree, one aligned span where they differ (``TextSummary.unit``).

:func:`load_texts` turns both back into :class:`TextDivergence` objects; nothing else parses them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

SCHEMA = "mechdiff.tokens/1"

#: per-row fields stored in per_token.safetensors (all float32 except start/end/rank: int64)
TOKEN_FIELDS = (
    "start", "end",            # character offsets of the row's text in TextSummary.text
    "kl_bt", "kl_tb",          # KL(base || tuned), KL(tuned || base) of the next-token distributions
                               # that predict this row, masked to the shared vocabulary (nats)
    "kl_bt_full", "kl_tb_full",  # the same unmasked (NaN where the vocabularies differ)
    "dropped_base", "dropped_tuned",  # probability mass the shared-vocabulary mask removed
    "logp_base", "logp_tuned",  # log-prob of the row's actual text under each model (nats)
    "rank_in_base", "rank_in_tuned",  # rank (0 = top) of the actual next token in each model
)


@dataclass
class TokenRow:
    """One token (or aligned span) of a text and the two models' disagreement on it."""

    start: int
    end: int
    text: str
    kl_bt: float
    kl_tb: float
    kl_bt_full: float
    kl_tb_full: float
    dropped_base: float
    dropped_tuned: float
    logp_base: float
    logp_tuned: float
    rank_in_base: int
    rank_in_tuned: int


@dataclass
class TextSummary:
    """One text: a prompt with one model's greedy response, or a neutral text."""

    idx: int
    id: str
    set: str                   # "prompts" | "neutral"
    responder: str | None      # "base" | "tuned": whose greedy response was teacher-forced; None: neutral
    category: str
    lang: str
    topic: str
    text: str                  # the whole text the rows index into (prompt as rendered + response)
    response_start: int        # character offset where the response begins (0 for neutral texts)
    unit: str                  # "token" (shared tokenization) | "span" (aligned across tokenizers)
    n_rows: int
    mean_kl_bt: float          # over the response rows (all rows for neutral texts)
    mean_kl_tb: float
    coverage: float = 1.0      # share of characters inside aligned boundaries (1.0 for "token")


@dataclass
class TextDivergence:
    """A :class:`TextSummary` with its rows."""

    summary: TextSummary
    rows: list[TokenRow] = field(default_factory=list)


def load_texts(run_dir: str | Path) -> list[TextDivergence]:
    """Every text of a run's ``tokens`` stage with its rows; [] where the stage did not run."""
    import json

    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    meta_path, tensor_path = run_dir / "tokens.json", run_dir / "tokens" / "per_token.safetensors"
    if not meta_path.is_file() or not tensor_path.is_file():
        return []
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("schema") != SCHEMA:
        from mechdiff.errors import DataError
        raise DataError(f"{meta_path}: schema {meta.get('schema')!r}, expected {SCHEMA!r}; "
                        "rerun the tokens stage into a new --out")
    t = load_file(str(tensor_path))
    offs = t["row_offsets"].tolist()
    cols = {k: t[k].tolist() for k in TOKEN_FIELDS}
    out = []
    for i, s in enumerate(meta["texts"]):
        summ = TextSummary(**s)
        rows = [TokenRow(text=summ.text[cols["start"][j]:cols["end"][j]],
                         **{k: cols[k][j] for k in TOKEN_FIELDS})
                for j in range(offs[i], offs[i + 1])]
        out.append(TextDivergence(summ, rows))
    return out
