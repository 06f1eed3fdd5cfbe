"""Fair cross-tokenizer comparison: shared vocabulary, prompt filter, logit masks.

Two tokenizers are compared through the *strings* their tokens stand for, not through raw
vocabulary entries. Every token is normalised to the text it decodes to:

* byte-level BPE (GPT-2, Llama-3): each character of a token stands for one byte (GPT-2's
  ``bytes_to_unicode`` table; ``Ġ`` is a space, ``Ċ`` a newline); the bytes are decoded as UTF-8.
* SentencePiece: ``▁`` is a space; byte-fallback tokens ``<0xNN>`` are the byte NN.
* Special tokens (and other added tokens) are kept by their literal content.

Bytes that are not valid UTF-8 on their own (a piece of a multi-byte character) are decoded with
``surrogateescape``, so a byte-level token for byte 0xD0 and a SentencePiece ``<0xD0>`` normalise
to the same string on both sides. The unknown token is never part of the shared vocabulary (an
``<unk>`` in a prompt means the tokenizer could not represent that text).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Sequence

import torch

from mechdiff.errors import DataError

__all__ = [
    "bytes_to_unicode",
    "detect_scheme",
    "normalise_token",
    "normalised_vocab",
    "SharedVocab",
    "shared_vocab",
    "shared_ratio",
    "prompt_ratios",
    "filter_prompts",
    "allowed_mask",
    "mask_logits",
    "shared_logits",
]

SP_SPACE = "\u2581"  # ▁
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


@lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _decode_bytes(data: bytes) -> str:
    return data.decode("utf-8", errors="surrogateescape")


def _is_byte_level_string(s: str) -> bool:
    table = _unicode_to_bytes()
    return bool(s) and all(ch in table for ch in s)


def normalise_token(s: str, scheme: str = "auto", special: bool = False) -> str:
    """Map one vocabulary entry to the text it stands for.

    ``scheme`` is ``"byte_level"``, ``"sentencepiece"``, ``"plain"`` or ``"auto"``. ``"auto"`` guesses
    per string (``<0xNN>`` or ``▁`` -> SentencePiece; only byte-level table characters and at least
    one remapped character such as ``Ġ``/``Ċ`` -> byte-level; otherwise plain). Prefer passing the
    tokenizer's scheme (``detect_scheme``): a plain ``"é"`` is ambiguous on its own.
    ``special=True`` returns the literal unchanged.
    """
    if special:
        return s
    m = _BYTE_FALLBACK.match(s)
    if m and scheme in ("auto", "sentencepiece"):
        return _decode_bytes(bytes([int(m.group(1), 16)]))
    if scheme == "auto":
        if SP_SPACE in s:
            scheme = "sentencepiece"
        elif _is_byte_level_string(s):
            scheme = "byte_level"
        else:
            scheme = "plain"
    if scheme == "byte_level":
        table = _unicode_to_bytes()
        if all(ch in table for ch in s):
            return _decode_bytes(bytes(table[ch] for ch in s))
        return s  # not a byte-level string (e.g. a literal added token)
    if scheme == "sentencepiece":
        return s.replace(SP_SPACE, " ")
    return s


def _backend_json(tok: Any) -> dict | None:
    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        return None
    try:
        return json.loads(backend.to_str())
    except Exception:  # pragma: no cover - exotic backends
        return None


def _types_in(node: Any) -> set[str]:
    out: set[str] = set()
    if isinstance(node, dict):
        t = node.get("type")
        if isinstance(t, str):
            out.add(t)
            if t == "Replace":
                pat = node.get("pattern", {})
                if isinstance(pat, dict) and pat.get("String") == SP_SPACE:
                    out.add("Metaspace")
        for v in node.values():
            out |= _types_in(v)
    elif isinstance(node, list):
        for v in node:
            out |= _types_in(v)
    return out


def detect_scheme(tok: Any) -> str:
    """``"byte_level"``, ``"sentencepiece"`` or ``"plain"`` for a HF tokenizer."""
    spec = _backend_json(tok)
    if spec is not None:
        types = _types_in(spec.get("pre_tokenizer")) | _types_in(spec.get("decoder"))
        if "ByteLevel" in types:
            return "byte_level"
        if "Metaspace" in types or (spec.get("model") or {}).get("byte_fallback"):
            return "sentencepiece"
    # Fall back to vocabulary statistics (slow tokenizers, unusual backends).
    vocab = tok.get_vocab()
    n_sp = sum(1 for t in vocab if t.startswith(SP_SPACE) or _BYTE_FALLBACK.match(t))
    n_bl = sum(1 for t in vocab if t.startswith("Ġ"))
    if n_sp == 0 and n_bl == 0:
        return "plain"
    return "sentencepiece" if n_sp >= n_bl else "byte_level"


def _special_and_added(tok: Any) -> tuple[set[str], set[str], int | None]:
    special = set(getattr(tok, "all_special_tokens", []) or [])
    added: set[str] = set()
    dec = getattr(tok, "added_tokens_decoder", None) or {}
    for _, t in dec.items():
        content = getattr(t, "content", str(t))
        added.add(content)
        if getattr(t, "special", False):
            special.add(content)
    unk = getattr(tok, "unk_token_id", None)
    return special, added, unk


def normalised_vocab(tok: Any, scheme: str | None = None) -> tuple[dict[str, int], int]:
    """``{normalised string: lowest id}`` for a tokenizer (unknown token excluded) and the number
    of ids that collapsed onto a string already taken by a lower id."""
    scheme = scheme or detect_scheme(tok)
    special, added, unk = _special_and_added(tok)
    out: dict[str, int] = {}
    dups = 0
    for token, idx in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
        if unk is not None and idx == unk:
            continue
        literal = token in special or token in added
        s = normalise_token(token, scheme=scheme, special=literal)
        if s in out:
            dups += 1
            continue
        out[s] = idx
    return out, dups


@dataclass
class SharedVocab:
    """Shared normalised strings between tokenizer A (base) and B (tuned).

    ``a_ids[i]`` and ``b_ids[i]`` are the ids of ``strings[i]`` in A and B (common index order,
    sorted by A's id). ``a_to_b``/``b_to_a`` map ids both ways; ``allowed_a``/``allowed_b`` are the
    shared id sets.
    """

    strings: list[str]
    a_ids: torch.Tensor
    b_ids: torch.Tensor
    a_to_b: dict[int, int]
    b_to_a: dict[int, int]
    allowed_a: set[int]
    allowed_b: set[int]
    vocab_a: int
    vocab_b: int
    scheme_a: str = "plain"
    scheme_b: str = "plain"
    duplicates_a: int = 0
    duplicates_b: int = 0
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.strings)

    def report(self) -> dict:
        n = len(self.strings)
        return {
            "vocab_a": self.vocab_a,
            "vocab_b": self.vocab_b,
            "pct_increase": 100.0 * (self.vocab_b - self.vocab_a) / self.vocab_a if self.vocab_a else math.nan,
            "shared": n,
            "shared_pct_of_a": 100.0 * n / self.vocab_a if self.vocab_a else math.nan,
            "shared_pct_of_b": 100.0 * n / self.vocab_b if self.vocab_b else math.nan,
            "duplicates_a": self.duplicates_a,
            "duplicates_b": self.duplicates_b,
            "scheme_a": self.scheme_a,
            "scheme_b": self.scheme_b,
        }


def shared_vocab(tok_a: Any, tok_b: Any) -> SharedVocab:
    """Shared vocabulary of two tokenizers by normalised string (lowest id wins on each side)."""
    scheme_a, scheme_b = detect_scheme(tok_a), detect_scheme(tok_b)
    va, dup_a = normalised_vocab(tok_a, scheme_a)
    vb, dup_b = normalised_vocab(tok_b, scheme_b)
    pairs = sorted((ia, vb[s], s) for s, ia in va.items() if s in vb)
    strings = [s for _, _, s in pairs]
    a_ids = torch.tensor([p[0] for p in pairs], dtype=torch.long)
    b_ids = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    return SharedVocab(
        strings=strings,
        a_ids=a_ids,
        b_ids=b_ids,
        a_to_b={int(a): int(b) for a, b, _ in pairs},
        b_to_a={int(b): int(a) for a, b, _ in pairs},
        allowed_a={int(p[0]) for p in pairs},
        allowed_b={int(p[1]) for p in pairs},
        vocab_a=len(tok_a),
        vocab_b=len(tok_b),
        scheme_a=scheme_a,
        scheme_b=scheme_b,
        duplicates_a=dup_a,
        duplicates_b=dup_b,
    )


def _as_id_tensor(allowed: Any) -> torch.Tensor:
    if isinstance(allowed, torch.Tensor):
        if allowed.dtype == torch.bool:
            return allowed.nonzero().flatten()
        return allowed.flatten().long()
    return torch.tensor(sorted(int(i) for i in allowed), dtype=torch.long)


def allowed_mask(allowed_ids: Any, vocab_size: int, device: Any = None) -> torch.Tensor:
    """Boolean ``[vocab_size]`` mask, True on allowed ids (ids >= vocab_size are ignored)."""
    if isinstance(allowed_ids, torch.Tensor) and allowed_ids.dtype == torch.bool:
        m = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        n = min(vocab_size, allowed_ids.numel())
        m[:n] = allowed_ids[:n].to(device)
        return m
    ids = _as_id_tensor(allowed_ids).to(device)
    ids = ids[(ids >= 0) & (ids < vocab_size)]
    m = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    m[ids] = True
    return m


def _encode_many(tok: Any, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(x) for x in tok(list(texts), add_special_tokens=False)["input_ids"]]


def shared_ratio(text_or_ids: str | Sequence[int] | torch.Tensor, tok: Any, allowed: Any) -> float:
    """Fraction of a prompt's tokens (under ``tok``, no special tokens added) in ``allowed``.

    An empty prompt has ratio 0.0.
    """
    if isinstance(text_or_ids, str):
        ids = _encode_many(tok, [text_or_ids])[0]
    elif isinstance(text_or_ids, torch.Tensor):
        ids = [int(i) for i in text_or_ids.flatten().tolist()]
    else:
        ids = [int(i) for i in text_or_ids]
    if not ids:
        return 0.0
    allowed_set = allowed if isinstance(allowed, (set, frozenset)) else set(_as_id_tensor(allowed).tolist())
    return sum(1 for i in ids if i in allowed_set) / len(ids)


def _prompt_text(p: Any) -> str:
    if isinstance(p, str):
        return p
    if isinstance(p, dict):
        if "text" in p:
            return str(p["text"])
        if "question" in p:
            return str(p["question"])
    raise DataError(f"cannot read a prompt text from {type(p).__name__}: give strings or dicts with a 'text' key")


def _prompt_category(p: Any) -> str:
    if isinstance(p, dict):
        return str(p.get("category", "all"))
    return "all"


def prompt_ratios(prompts: Sequence[Any], tok_a: Any, tok_b: Any, shared: SharedVocab) -> list[tuple[float, float]]:
    """``(ratio under A, ratio under B)`` for each prompt (batched tokenisation)."""
    texts = [_prompt_text(p) for p in prompts]
    ra = [shared_ratio(ids, tok_a, shared.allowed_a) for ids in _encode_many(tok_a, texts)]
    rb = [shared_ratio(ids, tok_b, shared.allowed_b) for ids in _encode_many(tok_b, texts)]
    return list(zip(ra, rb))


def filter_prompts(
    prompts: Sequence[Any],
    tok_a: Any,
    tok_b: Any,
    shared: SharedVocab,
    min_shared_ratio: float = 1.0,
) -> tuple[list[Any], dict]:
    """Keep prompts whose tokens are in the shared vocabulary under BOTH tokenizers at a ratio
    ``>= min_shared_ratio``. Prompts are strings or dicts with ``text`` (and optional ``category``).

    Returns ``(kept, report)``; the report has total/kept counts overall and per category and the
    ratio distribution. Raises ``DataError`` when nothing survives, naming the best ratio reached.
    """
    if not 0.0 <= min_shared_ratio <= 1.0:
        raise DataError(f"min_shared_ratio must be in [0, 1], got {min_shared_ratio}")
    prompts = list(prompts)
    if not prompts:
        raise DataError("filter_prompts got no prompts: load a prompt set first")
    ratios = prompt_ratios(prompts, tok_a, tok_b, shared)
    both = [min(a, b) for a, b in ratios]
    eps = 1e-9
    kept = [p for p, r in zip(prompts, both) if r >= min_shared_ratio - eps]
    by_cat: dict[str, dict[str, int]] = {}
    for p, r in zip(prompts, both):
        c = by_cat.setdefault(_prompt_category(p), {"kept": 0, "total": 0})
        c["total"] += 1
        c["kept"] += int(r >= min_shared_ratio - eps)
    sorted_r = sorted(both)
    median = sorted_r[len(sorted_r) // 2] if len(sorted_r) % 2 else 0.5 * (
        sorted_r[len(sorted_r) // 2 - 1] + sorted_r[len(sorted_r) // 2]
    )
    report = {
        "total": len(prompts),
        "kept": len(kept),
        "kept_pct": 100.0 * len(kept) / len(prompts),
        "min_shared_ratio": min_shared_ratio,
        "by_category": by_cat,
        "best_ratio": sorted_r[-1],
        "median_ratio": median,
        "mean_ratio_a": sum(a for a, _ in ratios) / len(ratios),
        "mean_ratio_b": sum(b for _, b in ratios) / len(ratios),
    }
    if not kept:
        best = sorted_r[-1]
        suggest_one = math.floor(best * 100) / 100
        suggest_half = math.floor(median * 100) / 100
        raise DataError(
            f"0/{len(prompts)} prompts have >= {min_shared_ratio:.2f} of their tokens in the shared "
            f"vocabulary under both tokenizers; the best ratio achieved is {best:.3f} "
            f"(median {median:.3f}). Try --min_shared_ratio {suggest_one:.2f} (keeps at least one "
            f"prompt) or {suggest_half:.2f} (keeps about half)."
        )
    return kept, report


def mask_logits(logits: torch.Tensor, allowed_ids: Any) -> torch.Tensor:
    """Set logits outside ``allowed_ids`` to -inf (works on ``[..., V]``)."""
    mask = allowed_mask(allowed_ids, logits.shape[-1], device=logits.device)
    return logits.masked_fill(~mask, float("-inf"))


def shared_logits(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Gather ``[..., V]`` logits to the shared common order ``[..., S]`` (``ids`` = a_ids or b_ids)."""
    ids = torch.as_tensor(ids, dtype=torch.long, device=logits.device)
    if ids.numel() and int(ids.max()) >= logits.shape[-1]:
        raise DataError(
            f"shared id {int(ids.max())} is outside the logits' vocabulary ({logits.shape[-1]}): "
            "pass the ids of the tokenizer that belongs to this model"
        )
    return logits.index_select(-1, ids)
